"""NPO sampling: the unconditional / negative branch of CFG runs the model plus a negative (NPO) LoRA.

ε̂ = ε_neg(x_t, ∅) + s·(ε_pos(x_t, c) − ε_neg(x_t, ∅)), θ_neg = θ_pos + A·δ_NPO.

The NPO LoRA is loaded as one more adapter ("npo") on the same UNet; the two
branches are two UNet evaluations per step, the positive one with that adapter
at weight 0, so the positive model is exactly the model (its own LoRAs are
fused into its weights when it loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtk.errors import BadInput

ADAPTER = "npo"


@dataclass
class NPOBranch:
    npo_scale: float
    spec: str

    def positive(self, pipe) -> None:
        pipe.set_adapters([ADAPTER], adapter_weights=[0.0])

    def negative(self, pipe) -> None:
        pipe.set_adapters([ADAPTER], adapter_weights=[self.npo_scale])


def root_pipeline(ref) -> Path:
    """The diffusers pipeline (or single file) a model ultimately stands on, for comparing bases."""
    return Path(ref.path).resolve()


def npo_model_dir(spec: str):
    """An NPO model dir (``dtk train-npo`` output): its ModelRef and its own LoRA file."""
    from dtk.diffusion.loading import resolve_model

    path = Path(spec).expanduser()
    manifest = path / "dtk.json"
    if not manifest.is_file():
        raise BadInput(f"--npo {spec}: not a dtk train-npo output (no dtk.json)")
    ref = resolve_model(str(path))
    if ref.manifest.get("command") != "train-npo":
        raise BadInput(f"--npo {spec}: made by `dtk {ref.manifest.get('command', '?')}`, not `dtk train-npo`")
    own = ref.manifest.get("loras") or []
    if not own:
        raise BadInput(f"--npo {spec}: holds no LoRA (NPO sampling takes a LoRA from train-npo)")
    # its own LoRA, not the first of ref.loras: an NPO trained on a LoRA model dir (e.g. a DPO run) lists
    # that model's LoRAs before its own there
    return ref, path / own[0]["path"]


def attach_npo(model, spec: str, scale: float) -> None:
    """Load the NPO LoRA of ``spec`` as an adapter of the model (``model.npo``)."""
    ref, npo_lora = npo_model_dir(spec)
    if model.family == "pixel":
        raise BadInput(f"--npo {spec}: NPO sampling is for SD/SDXL models with classifier-free guidance")
    if root_pipeline(ref) != root_pipeline(model.ref):
        raise BadInput(f"--npo {spec}: made for the base model {ref.manifest.get('base_model')} "
                       f"({root_pipeline(ref)}), but the model is {model.ref.spec} ({root_pipeline(model.ref)})")
    from dtk.diffusion.lora import lora_file

    pipe = model.pipe
    try:
        pipe.load_lora_weights(str(lora_file(npo_lora)), adapter_name=ADAPTER)
    except Exception as e:  # noqa: BLE001 - keys or shapes of another architecture
        raise BadInput(f"--npo {spec}: its LoRA does not fit {model.ref.spec} ({type(e).__name__})") from None
    if ADAPTER not in {n for names in pipe.get_list_adapters().values() for n in names}:
        raise BadInput(f"--npo {spec}: none of its LoRA weights match a layer of {model.ref.spec}")
    model.npo = NPOBranch(float(scale), spec)
    model.npo.positive(pipe)
