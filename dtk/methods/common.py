"""Pieces several objectives share: the robust distance, caption dropping for CFG, SDXL pair sizes."""

from __future__ import annotations

import torch

from dtk.errors import BadInput


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """ρ(a, b) = √((a − b)² + c²) − c, elementwise, then the mean."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def check_empty_prompt_prob(p: float | None) -> None:
    """--empty-prompt-prob is a probability (None: the method's own default)."""
    if p is not None and not 0 <= p <= 1:
        raise BadInput(f"--empty-prompt-prob {p}: must be in [0, 1]")


def drop_captions(captions: list[str], keep: torch.Tensor) -> list[str]:
    """The empty prompt where ``keep`` is False (classifier-free guidance needs an unconditional model)."""
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def with_pair_sizes(batch: dict, cond):
    """SDXL: the size conditioning (time ids) reflow pairs were made with, which their latents match."""
    if "time_ids" in batch:
        cond.time_ids = batch["time_ids"].to(cond.time_ids.device, cond.time_ids.dtype)
    return cond
