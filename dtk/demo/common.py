"""Helpers the demo builds share (the image demo, ``dtk.demo.build``; the pixel demo, ``dtk.demo.pixel``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path


def log(msg):
    print(msg, flush=True)


def write_json_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path):
    """Move a fully written temp directory into place."""
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def to_tensor(images_uint8):
    import torch
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(255.0)


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * p))


def dir_size_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6
