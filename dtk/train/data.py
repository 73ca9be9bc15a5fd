"""The order in which training reads its data, and batches of examples."""

from __future__ import annotations

from typing import Any


class BatchOrder:
    """Which examples make up micro-batch ``m`` of optimizer step ``s`` on process ``r``.

    The examples are read as one endless stream: epoch ``e`` is a permutation
    drawn from ``(seed, e)``, and the global batch of step ``s`` is positions
    ``[s·G, (s+1)·G)`` of the stream, G = batch × grad_accum × world. So the
    order depends only on the step, resuming at step ``s`` is exact, and one
    process with batch 4 sees the same examples as two with batch 2.
    """

    def __init__(self, size: int, seed: int, batch: int, grad_accum: int, world: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.batch, self.grad_accum, self.world = batch, grad_accum, world
        self._perm: tuple[int, Any] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch * self.grad_accum * self.world

    def _epoch(self, e: int):
        if self._perm is None or self._perm[0] != e:
            import torch

            from dtk.seeds import derive_seed

            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, e))
                perm = torch.randperm(self.size, generator=g).tolist()
            else:
                perm = list(range(self.size))
            self._perm = (e, perm)
        return self._perm[1]

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world + rank) * self.batch
        return list(range(start, start + self.batch))

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        return [self._epoch(p // self.size)[p % self.size] for p in self.positions(step, micro, rank)]


def collate(examples: list[dict]) -> dict:
    import torch

    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
