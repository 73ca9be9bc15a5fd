"""Slurm's SIGUSR1 ("time is nearly up") before a training loop can act on it: noted, not fatal.

By default SIGUSR1 kills a process. `dtk` notes it instead; a training loop that starts later saves a
checkpoint at its first step boundary (and exits 75 to be requeued); other commands carry on."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("dtk")
received: list[str] = []
TRAINING = [False]   # whether the running command trains (set as it starts): what the signal will do differs


def note(signum, frame) -> None:
    received.append(signal.Signals(signum).name)
    if TRAINING[0]:
        log.warning("dtk: received %s; the run checkpoints at its first step boundary and exits 75", received[-1])
    else:
        log.warning("dtk: received %s (a time-limit warning); carrying on (SIGTERM stops the run)", received[-1])


def install() -> None:
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, note)
