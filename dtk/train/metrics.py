"""Training metrics: windowed means of a run's logs, to stderr, metrics.jsonl and (when installed) TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("dtk")


class Metrics:
    """Windowed means of the logs, to stderr, metrics.jsonl and (when installed) TensorBoard."""

    def __init__(self, out: Path, name: str, main: bool, resume_step: int):
        self.name, self.main, self.window = name, main, {}
        self.path = out / "metrics.jsonl"
        self.writer = None
        if main:
            self._truncate_after(resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (the resumed run logs them again)."""
        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
        from dtk.io import atomic_write

        with atomic_write(self.path, "w") as f:
            f.write("".join(ln + "\n" for ln in keep))

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.window.setdefault(k, []).append(float(v))

    def flush(self, step: int, total: int, extra: dict, accelerator) -> dict:
        means = {k: sum(v) / len(v) for k, v in self.window.items()}
        if accelerator.num_processes > 1:  # every process logs the same keys: the mean over all of them
            values = accelerator.reduce(torch.tensor(list(means.values()), device=accelerator.device), "mean")
            means = dict(zip(means, values.tolist()))
        record = {"step": step, **means, **extra}
        self.window = {}
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.writer.add_scalar(k, v, step)
            shown = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
            log.info("%s: step %d/%d %s", self.name, step, total, shown)
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
