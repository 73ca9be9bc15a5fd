"""Reproducible randomness that does not depend on how work is split.

A sample's seed is a function of ``(seed, global index)`` only, so a run
split into shards, or into different batch sizes, draws the same noise for
the same sample.
"""

from __future__ import annotations

import hashlib
import os

from dtk.errors import BadInput


def derive_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for item ``index`` of a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with 0 ≤ I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise BadInput(f"--shard {text}: need 0 <= I < N (shards are numbered from 0)")
    return i, n


def default_shard(env: dict | None = None) -> tuple[int, int]:
    """The shard implied by the launcher: a Slurm array, srun tasks, or torchrun/accelerate ranks."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # --array=MIN-MAX:STEP numbers its tasks MIN, MIN+STEP, ...: shard = (ID - MIN) / STEP
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        i, n = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= i < n:
            raise BadInput(f"SLURM_ARRAY_TASK_ID {env['SLURM_ARRAY_TASK_ID']}: shard {i} of {n}; dtk takes arrays "
                           "with one step (--array=0-N or MIN-MAX:STEP) and no gaps; pass --shard I/N")
        return i, n
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in env and world in env and int(env[world]) > 1:
            return int(env[rank]), int(env[world])
    return 0, 1


def shard_indices(total: int, shard: tuple[int, int]) -> list[int]:
    """The global indices shard ``I/N`` owns: every N-th, starting at I (balanced)."""
    i, n = shard
    return list(range(i, total, n))
