"""LoRAs on a loaded model: diffusers/peft or kohya files, each with a scale."""

from __future__ import annotations

from pathlib import Path

from dtk.diffusion.loading import LoadedModel
from dtk.errors import BadInput

LORA_FILE = "pytorch_lora_weights.safetensors"


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); a path may itself contain ':'."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


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


def apply_loras(model: LoadedModel, loras: list[tuple[str | Path, float]]) -> None:
    """Load every LoRA as its own adapter and activate them all with their scales."""
    if not loras:
        return
    pipe = model.pipe
    names, scales = [], []
    for i, (path, scale) in enumerate(loras):
        file = lora_file(path)
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(str(file), adapter_name=name)
        except Exception as e:  # noqa: BLE001 - shape or key mismatch: the file is for another model
            msg = " ".join(str(e).split())[:300]
            raise BadInput(f"--lora {path}: does not match the model {model.ref.spec!r} ({type(e).__name__}: {msg})") from None
        loaded = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
        if name not in loaded:
            raise BadInput(f"--lora {path}: none of its weights match a layer of the model {model.ref.spec!r}")
        names.append(name)
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
