"""LoRAs on a loaded model: diffusers/peft or kohya files, each with a scale."""

from __future__ import annotations

import contextlib

from pathlib import Path

from dtk.diffusion.loading import LoadedModel
from dtk.errors import BadInput

LORA_FILE = "pytorch_lora_weights.safetensors"


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); a path may itself contain ':' (then it is taken whole)."""
    import math

    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            value = float(scale)
        except ValueError:
            if Path(path).exists():
                raise BadInput(f"--lora {spec}: scale '{scale}' is not a number (PATH[:SCALE])") from None
            return spec, 1.0
        if not math.isfinite(value):
            raise BadInput(f"--lora {spec}: the scale must be a finite number")
        return path, value
    return spec, 1.0


def check_lora_files(loras: list[tuple[str | Path, float]]) -> None:
    """Each ``--lora`` exists and is a readable safetensors file with tensors in it: checked in a moment,
    before a model takes tens of seconds to load."""
    from safetensors import safe_open

    for path, _ in loras:
        file = lora_file(path)
        try:
            with safe_open(str(file), framework="pt") as f:
                empty = not list(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged header
            raise BadInput(f"--lora {path}: not a readable .safetensors file ({' '.join(str(e).split())[:200]})") from None
        if empty:
            raise BadInput(f"--lora {path}: holds no tensors")


def lora_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for candidate in (p / LORA_FILE, p / "lora" / LORA_FILE):
            if candidate.exists():
                return candidate
        raise BadInput(f"--lora {path}: a directory without {LORA_FILE}")
    if not p.exists():
        raise BadInput(f"--lora {path}: no such file")
    if p.suffix != ".safetensors":
        raise BadInput(f"--lora {path}: expected a .safetensors file")
    return p


def apply_loras(model: LoadedModel, loras: list[tuple[str | Path, float]], text_encoders_only: bool = False) -> None:
    """Load every LoRA as its own adapter and fuse them all into the weights with their scales (with
    ``text_encoders_only``, only their text-encoder parts: the UNet already holds the rest)."""
    if not loras:
        return
    if model.family == "pixel":
        raise BadInput(f"--lora {loras[0][0]}: LoRAs are for SD/SDXL pipelines, {model.ref.spec!r} is a pixel-space model")
    pipe = model.pipe
    names, scales = [], []
    for i, (path, scale) in enumerate(loras):
        file = lora_file(path)
        _refuse_motion_lora(path, file, model)
        name = f"lora{i}"
        try:
            with _diffusers_silent():   # its own error lines would come before dtk's one-line error
                pipe.load_lora_weights(str(file), adapter_name=name)
        except Exception as e:  # noqa: BLE001 - shape or key mismatch: the file is for another model
            msg = " ".join(str(e).split())[:300]
            raise BadInput(f"--lora {path}: does not match the model {model.ref.spec!r} ({type(e).__name__}: {msg})") from None
        loaded = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
        if name not in loaded and not text_encoders_only:
            raise BadInput(f"--lora {path}: none of its weights match a layer of the model {model.ref.spec!r}")
        names.append(name)
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
    # fused into the weights, then the LoRA layers removed: sampling runs at the base model's speed (on the
    # demo model a LoRA layer per module costs ~40% of it); NPO adds its own adapter afterwards
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=encoders if text_encoders_only else ["unet", *encoders], adapter_names=names)
    pipe.unload_lora_weights()


def _refuse_motion_lora(path, file: Path, model: LoadedModel) -> None:
    """An AnimateDiff motion LoRA on an image model: diffusers would load its spatial part silently and drop the
    motion modules."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        motion = next((k for k in f.keys() if "motion_modules" in k), None)
    if motion is not None:
        raise BadInput(f"--lora {path}: a motion LoRA (AnimateDiff motion modules, e.g. {motion}); "
                       f"{model.ref.spec!r} is an image model")


# ---------------------------------------------------------------------------
# Saving: the diffusers/peft layout (with rank and alpha recorded, so a reader
# applies the LoRA at alpha/rank and not at 1), and the kohya layout that
# ComfyUI and A1111 read (``lora_unet_<module>.lora_down/.lora_up/.alpha``).


def _adapter_config(module, adapter: str = "default") -> dict:
    config = module.peft_config[adapter].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()
            if isinstance(v, (str, int, float, bool, list, set, dict, type(None)))}


def lora_layers(module, adapter: str = "default") -> dict:
    """A peft-wrapped module's LoRA weights, peft keys (``<module>.lora_A.weight``), no prefix.

    Saved as they are: diffusers reads peft keys natively, while its older
    ``lora.down`` spelling covers attention layers only and mixes badly.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=adapter)


def save_lora(out_dir: str | Path, unet, family: str, text_encoder=None, adapter: str = "default",
              metadata: dict | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights``."""



    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir / ".lora-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _save_via_diffusers(tmp, out_dir, unet, family, text_encoder, adapter, metadata)
    finally:   # a failed export (a full disk) leaves no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_FILE


def _save_via_diffusers(tmp: Path, out_dir: Path, unet, family: str, text_encoder, adapter: str,
                        metadata: dict | None) -> None:
    """diffusers writes its layout (and its adapter metadata) into ``tmp``; dtk adds rank, alpha and the
    method, and writes the file atomically into ``out_dir``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from dtk.diffusion.loading import pipeline_class
    from dtk.io import save_safetensors

    pipeline_class(family).save_lora_weights(
        str(tmp), unet_lora_layers=lora_layers(unet, adapter),
        text_encoder_lora_layers=lora_layers(text_encoder, adapter) if text_encoder is not None else None,
        unet_lora_adapter_metadata=_adapter_config(unet, adapter),
        text_encoder_lora_adapter_metadata=_adapter_config(text_encoder, adapter) if text_encoder is not None else None,
        safe_serialization=True,
    )
    with safe_open(str(tmp / LORA_FILE), "pt") as f:
        file_meta = dict(f.metadata() or {})
    config = unet.peft_config[adapter]
    file_meta.update({"dtk.lora.rank": str(config.r), "dtk.lora.alpha": str(config.lora_alpha),
                      **{f"dtk.{k}": json.dumps(v) for k, v in (metadata or {}).items()}})
    save_safetensors(out_dir / LORA_FILE, load_file(str(tmp / LORA_FILE)), file_meta)


KOHYA_RENAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


@contextlib.contextmanager
def _diffusers_silent():
    import logging

    from diffusers.utils import logging as diffusers_logging

    if logging.getLogger("dtk").level <= logging.DEBUG:   # -v/-vv: the library's own messages are wanted
        yield
        return
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 10)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def to_kohya(layers: dict, alpha: float, prefix: str = "lora_unet_") -> dict:
    """peft LoRA weights of one module → kohya keys, with ``alpha`` per layer.

    ``down_blocks.0.attentions.0.proj_in.lora_A.weight`` becomes
    ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` (B → ``lora_up``).
    """
    import torch

    out = {}
    for key, value in layers.items():
        for peft_part, part in (("A", "down"), ("B", "up")):
            tail = f".lora_{peft_part}.weight"
            if key.endswith(tail):
                module = key[: -len(tail)]
                # SDXL's pooled-text/size MLP: kohya readers (diffusers included) know it by its original name
                module = KOHYA_RENAMES.get(module, module)
                name = prefix + module.replace(".", "_")
                out[f"{name}.lora_{part}.weight"] = value
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya(path: str | Path, unet, text_encoder=None, adapter: str = "default",
               text_encoder_2=None) -> Path:
    """Write one kohya-layout safetensors file (``lora_unet_``, ``lora_te1_``, ``lora_te2_``)."""
    from dtk.io import save_safetensors

    tensors = to_kohya(lora_layers(unet, adapter), unet.peft_config[adapter].lora_alpha)
    for module, prefix in ((text_encoder, "lora_te1_"), (text_encoder_2, "lora_te2_")):
        if module is not None:
            tensors.update(to_kohya(lora_layers(module, adapter), module.peft_config[adapter].lora_alpha, prefix))
    config = unet.peft_config[adapter]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
            "ss_network_alpha": str(config.lora_alpha), "dtk.lora.rank": str(config.r),
            "dtk.lora.alpha": str(config.lora_alpha)}
    save_safetensors(path, tensors, meta)
    return Path(path)
