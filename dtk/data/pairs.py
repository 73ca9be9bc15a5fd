"""Reflow pair shards (``dtk reflow-pairs`` output): their layout, and all shards of a folder as one dataset.

A folder holds ``pairs-000000.safetensors``, ``pairs-000001.safetensors`` … (pairs [0, S), [S, 2S) …,
S = --pairs-per-shard) and ``dtk.json``. A shard holds ``noise`` and ``latent`` [n, C, h, w] (latents already
scaled by the VAE factor), ``index`` [n] and for SDXL ``time_ids`` [n, 6]; its metadata (``dtk.pairs``) holds
the prompts and the generation settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dtk.errors import BadInput

SHARD_GLOB = "pairs-*.safetensors"


def shard_name(chunk: int) -> str:
    return f"pairs-{chunk:06d}.safetensors"


def is_pair_dir(path: Path) -> bool:
    return any(path.glob(SHARD_GLOB))


def read_shard_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            n = f.get_slice("index").get_shape()[0] if "index" in keys else 0
        info = json.loads(meta["dtk.pairs"])
        settings, prompts = info["settings"], info["prompts"]
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, or not ours
        raise BadInput(f"{path}: not a readable pair shard ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    missing = {"noise", "latent", "index"} - keys
    if missing:
        raise BadInput(f"{path}: not a pair shard (no {', '.join(sorted(missing))} tensor)")
    if n == 0 or len(prompts) != n:
        raise BadInput(f"{path}: empty pair shard" if n == 0 else f"{path}: {n} pairs but {len(prompts)} prompts")
    return {"settings": settings, "prompts": prompts, "pairs": n, "keys": keys}


class PairDataset:
    """All pair shards of a directory (a Slurm array's shards included) as one dataset."""

    kind = "pairs"

    def __init__(self, path: Path):
        self.name = str(path)
        files = sorted(path.glob(SHARD_GLOB))
        metas = [read_shard_meta(f) for f in files]
        self.settings = metas[0]["settings"]
        for f, m in zip(files, metas):
            diff = [k for k in self.settings if k != "probe" and m["settings"].get(k) != self.settings.get(k)]
            if diff:
                raise BadInput(f"--data {path}: {f.name} was made with other settings than {files[0].name} "
                               f"({', '.join(diff)})")
        expected = math.ceil(self.settings["num"] / self.settings["pairs_per_shard"])
        present = {int(f.stem.split("-")[1]) for f in files}
        missing = sorted(set(range(expected)) - present)
        if missing:
            raise BadInput(f"--data {path}: {len(missing)} of {expected} pair shards missing (e.g. "
                           f"{shard_name(missing[0])}); the generation is unfinished: rerun dtk reflow-pairs "
                           "with the same arguments to complete it")
        self.rows: list[tuple[Path, int, str]] = []
        for f, m in zip(files, metas):
            self.rows.extend((f, j, p) for j, p in enumerate(m["prompts"]))
        self._handles: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, f: Path):
        from safetensors import safe_open

        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f]

    def __getitem__(self, i: int) -> dict:
        f, j, prompt = self.rows[i]
        h = self._open(f)
        ex = {"noise": h.get_slice("noise")[j].float(), "latent": h.get_slice("latent")[j].float(), "caption": prompt}
        if self.settings.get("family") == "sdxl":
            ex["time_ids"] = h.get_slice("time_ids")[j].float()
        return ex

    def describe(self) -> dict:
        return {"data": self.name, "format": "reflow-pairs", "examples": len(self),
                "teacher": self.settings.get("model"), "solver": self.settings.get("solver"),
                "steps": self.settings.get("steps"), "guidance": self.settings.get("guidance")}
