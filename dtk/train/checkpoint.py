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


# ---------------------------------------------------------------------------
# A run's checkpoint and resume


def _state_of(named) -> dict:
    return {n: p.detach().float().cpu().contiguous() for n, p in named}


def save(state) -> Path:
    """Checkpoint ``state`` (a ``dtk.train.state.TrainingState``) at its step: the main process writes."""
    import torch

    run, method, named, optimizer, scheduler, ema = (state.run, state.method, state.named, state.optimizer,
                                                     state.scheduler, state.ema)
    step, seen, out = state.step, state.seen, state.out
    accelerator = run.accelerator
    path = checkpoint_root(out) / checkpoint_name(step)
    if accelerator.is_main_process:
        record = {"step": step, "examples_seen": seen, "world_size": accelerator.num_processes,
                  "config": {**resume_keys(run), "data_examples": len(run.data), "method": method.describe()},
                  "method": method.name}
        save_checkpoint(out, step, trainable=_state_of(named), ema=ema.shadow if ema else None,
                        optimizer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                         "torch_rng": torch.get_rng_state(),
                                         # dropout masks on a GPU come from its own generator
                                         **({"cuda_rng": torch.cuda.get_rng_state(accelerator.device)}
                                            if accelerator.device.type == "cuda" else {}),
                                         **({"grad_scaler": accelerator.scaler.state_dict()}
                                            if accelerator.scaler is not None else {})},
                        method_state=method.state_dict(), state=record, keep=run.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def resume_keys(run) -> dict:
    """Settings a checkpoint cannot be resumed under different values of."""
    config, spec = run.config, run.model.ref.spec
    local = Path(spec).expanduser()
    model = str(local.resolve()) if spec not in ("demo", "demo-pixel") and local.exists() else spec
    return {"model": model, "resolution": run.resolution, "full": config.full, "lora_rank": config.lora_rank,
            "lora_alpha": config.alpha, "lora_targets": list(config.lora_targets), "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "seed": config.seed, "ema": config.ema_decay > 0,
            "optimizer": config.optimizer}


def restore(path, state) -> None:
    """Load the checkpoint at ``path`` into ``state`` (weights, optimiser, LR schedule, RNG, EMA, the method's own
    state, step and examples seen), after checking it was saved with this run's settings."""
    import torch

    run, method, named, optimizer, scheduler, ema = (state.run, state.method, state.named, state.optimizer,
                                                     state.scheduler, state.ema)
    config, accelerator, data_size = run.config, run.accelerator, len(run.data)
    ckpt = load_checkpoint(path)
    saved_state = ckpt["state"]
    saved = saved_state.get("config", {})
    now = {**resume_keys(run), "data_examples": data_size, "method": json.loads(json.dumps(method.describe()))}
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if saved.get("world_size", accelerator.num_processes) * saved.get("batch_size", 0) != \
            accelerator.num_processes * config.batch_size and "batch_size" not in diff:
        diff.append("processes × batch size")
    if "method" in diff:   # every recorded setting agrees, but some are not recorded: an earlier dtk's checkpoint
        old, new = saved["method"], now["method"]
        unrecorded = sorted(set(new) - set(old))
        if unrecorded and all(old[m] == new.get(m) for m in old):
            raise BadInput(f"--resume {path}: made by an earlier dtk, which did not record {', '.join(unrecorded)}; "
                           "start the run again (without --resume)")
    if diff:
        shown = []
        for k in diff:
            if k == "method":  # the method's own settings: name the ones that changed
                old, new = saved[k], now[k]
                shown += [f"{m}={old.get(m)}" for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]
            elif k in saved:
                shown.append(f"{k}={saved[k]}")
        raise BadInput(f"--resume {path}: saved with other {', '.join(diff)} than this run ({', '.join(shown)})")
    params = dict(named)
    missing = set(params) - set(ckpt["trainable"])
    if missing:
        raise BadInput(f"--resume {path}: lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ckpt["trainable"][n].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
    scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    # this run's --lr and --weight-decay apply from here on (e.g. a lower --lr after a NaN)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
        group.update(initial_lr=config.lr, lr=config.lr * factor, weight_decay=config.weight_decay)
    torch.set_rng_state(ckpt["optimizer"]["torch_rng"])
    if accelerator.device.type == "cuda" and "cuda_rng" in ckpt["optimizer"]:
        torch.cuda.set_rng_state(ckpt["optimizer"]["cuda_rng"], accelerator.device)
    if accelerator.scaler is not None and "grad_scaler" in ckpt["optimizer"]:
        accelerator.scaler.load_state_dict(ckpt["optimizer"]["grad_scaler"])
    if ema is not None:
        if ckpt["ema"] is None:
            raise BadInput(f"--resume {path}: has no EMA state but --ema-decay is set")
        ema.shadow = {n: t.to(accelerator.device) for n, t in ckpt["ema"].items()}
    if ckpt["method"]:
        method.load_state_dict(ckpt["method"])
    state.step, state.seen = int(saved_state["step"]), int(saved_state["examples_seen"])
