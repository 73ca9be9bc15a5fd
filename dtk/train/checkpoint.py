"""Training checkpoints: written whole or not at all, rotated, and found again on resume.

``OUT/checkpoints/step-00001000/`` holds

    trainable.safetensors   the trained parameters (LoRA or full UNet), fp32
    ema.safetensors         their EMA, when --ema-decay > 0
    optimizer.pt            optimizer, LR-schedule, RNG and fp16 grad-scaler state (tensors and numbers only)
    method.pt               the method's own state (e.g. a discriminator), if any
    state.json              step, examples seen, RNG, config — written last: the completeness marker

A checkpoint is written into a temporary sibling directory and renamed into
place, so a crash or a full disk never leaves a directory that looks
complete; older checkpoints are removed only after the new one is in place.
``.pt`` files are our own and are read back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dtk.errors import BadInput, RunFailure

MARKER = "state.json"
_NAME = re.compile(r"^step-(\d+)$")


CHECKPOINTS = "checkpoints"


def checkpoint_root(out: Path) -> Path:
    return out / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(out: Path, resume: str | None) -> Path | None:
    """``--resume``: None → start fresh; ``auto`` → the newest complete checkpoint, if any; else that path."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = complete_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise BadInput(f"--resume {resume}: no such checkpoint directory")
    if not (path / MARKER).is_file():
        raise BadInput(f"--resume {resume}: an incomplete checkpoint (no {MARKER}; it was interrupted while "
                       "being written); use an earlier one or --resume auto")
    return path


def save_checkpoint(out: Path, step: int, *, trainable: dict, ema: dict | None, optimizer_state: dict,
                    method_state: dict | None, state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep``."""
    from dtk.io import save_safetensors

    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(tmp / "trainable.safetensors", trainable)
        if ema is not None:
            save_safetensors(tmp / "ema.safetensors", ema)
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        if method_state:
            _torch_save(method_state, tmp / "method.pt")
        _write_json(tmp / MARKER, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or getattr(e, "strerror", None):   # atomic_write's named disk failure too
            previous = complete_checkpoints(out)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise RunFailure(f"could not write checkpoint {final} ({e.strerror or e}); {kept}") from None
        raise
    for old in complete_checkpoints(out)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out: Path) -> None:
    """Checkpoints whose writing was killed (``.step-N.tmp-PID``): never complete, only taking space."""
    root = checkpoint_root(out)
    if root.is_dir():
        for tmp in root.glob(".step-*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def set_aside_newer(out: Path, resume: Path) -> list[Path]:
    """Resuming from an older checkpoint starts a new branch: newer ones are renamed ``*.abandoned``
    (kept, but no longer found by ``--resume auto`` nor rotated against the new branch)."""
    moved = []
    step = int(_NAME.match(resume.name).group(1)) if _NAME.match(resume.name) else None
    if step is None or resume.parent.resolve() != checkpoint_root(out).resolve():
        return moved
    for p in complete_checkpoints(out):
        if int(_NAME.match(p.name).group(1)) > step:
            target = p.with_name(p.name + ".abandoned")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(p, target)
            moved.append(target)
    return moved


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    try:
        state = json.loads((path / MARKER).read_text())
        ckpt = {"state": state, "trainable": load_file(str(path / "trainable.safetensors")),
                "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu", mmap=True)}
        ema = path / "ema.safetensors"
        ckpt["ema"] = load_file(str(ema)) if ema.exists() else None
        method = path / "method.pt"
        ckpt["method"] = (torch.load(method, weights_only=True, map_location="cpu", mmap=True)
                          if method.exists() else None)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files of any kind
        raise BadInput(f"--resume {path}: unreadable checkpoint ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}); resume from an earlier one") from None
    return ckpt


def _torch_save(obj, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
