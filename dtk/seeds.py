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


def _env_int(env, name: str, default: int | None = None) -> int:
    """A launcher's variable as an integer (unset or empty: ``default``); anything else names the variable."""
    text = str(env.get(name, "")).strip()
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"{name}={env.get(name, '')!r}: not an integer (dtk reads its shard from it; pass "
                       "--shard I/N to choose one)") from None


def default_shard(env: dict | None = None) -> tuple[int, int]:
    """The shard implied by the launcher: a Slurm array, srun tasks, or torchrun/accelerate ranks. Values
    that make no shard (not integers, a rank outside its world) are refused naming the variable: a wrong
    shard would write another shard's files, or leave some undone, without a word."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # --array=MIN-MAX:STEP numbers its tasks MIN, MIN+STEP, ...: shard = (ID - MIN) / STEP
        task, n = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        first, step = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0), _env_int(env, "SLURM_ARRAY_TASK_STEP", 1)
        if n < 1:
            raise BadInput(f"SLURM_ARRAY_TASK_COUNT={n}: must be at least 1 (pass --shard I/N to choose a shard)")
        if step < 1:
            raise BadInput(f"SLURM_ARRAY_TASK_STEP={step}: must be at least 1 (pass --shard I/N to choose a shard)")
        i = (task - first) // step
        if (task - first) % step:   # off the grid: it would share a shard with the task below it
            raise BadInput(f"SLURM_ARRAY_TASK_ID {task}: not MIN + k*STEP (SLURM_ARRAY_TASK_MIN {first}, "
                           f"SLURM_ARRAY_TASK_STEP {step}); pass --shard I/N")
        if not 0 <= i < n:
            raise BadInput(f"SLURM_ARRAY_TASK_ID {task}: shard {i} of {n}; dtk takes arrays "
                           "with one step (--array=0-N or MIN-MAX:STEP) and no gaps; pass --shard I/N")
        return i, n
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in env and world in env:
            r, w = _env_int(env, rank), _env_int(env, world)
            if w < 1:
                raise BadInput(f"{world}={w}: must be at least 1 (pass --shard I/N to choose a shard)")
            if not 0 <= r < w:
                raise BadInput(f"{rank}={r} with {world}={w}: ranks run from 0 to {w - 1} (pass --shard I/N to "
                               "choose a shard)")
            if w > 1:
                return r, w
    return 0, 1


def shard_indices(total: int, shard: tuple[int, int]) -> list[int]:
    """The global indices shard ``I/N`` owns: every N-th, starting at I (balanced)."""
    i, n = shard
    return list(range(i, total, n))


def shard_suffix(shard: tuple[int, int]) -> str:
    i, n = shard
    return "" if n == 1 else f".shard-{i:05d}-of-{n:05d}"


def same_shard_layout(marker: str, suffix: str) -> bool:
    """Whether the output marker ``marker`` (``dtk*.json``) is one of the same ``--shard I/N`` layout as
    ``suffix``'s (another I of the same N); never for an unsharded run."""
    return bool(suffix) and marker.startswith("dtk.shard-") and marker.endswith(suffix[suffix.index("-of-"):] + ".json")
