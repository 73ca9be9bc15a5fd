"""SIGTERM and SIGUSR1 (Slurm's preemption and its time-limit warning) act at safe points, never mid-import.

A handler that raised wherever the signal landed turned SIGTERM during start-up into a RecursionError, an
"ImportError: cannot load module more than once" or SIGABRT, or lost it. So the handlers only note the signal:

* a training command stops at its next safe point — before the model loads, after it loads, at every step
  boundary (with a checkpoint) — and exits 75 to be requeued; an export under way is finished first;
* another command stops (``Terminated``, exit 143) at its next safe point (``check``: before the model
  loads, between batches); one that reaches none within ``GRACE_S`` (blocked reading stdin, say) is
  stopped where it is;
* SIGUSR1 never stops a command that does not train.

The handlers stay until the process ends: ``ignore_from_now`` as it exits, because Python's shutdown puts
the default (fatal) handlers back, and a SIGUSR1 then killed a finished run with 138.
"""

from __future__ import annotations

import logging
import signal

from dtk.errors import Terminated

log = logging.getLogger("dtk")
received: list[str] = []
TRAINING = [False]   # whether the running command trains (set as it starts): what a signal will do differs
GRACE_S = 10.0


def note(signum, frame) -> None:
    name = signal.Signals(signum).name
    received.append(name)
    if TRAINING[0]:
        log.warning("dtk: received %s; the run stops at its next safe point (with a checkpoint once it trains) "
                    "and exits 75", name)
    elif name == "SIGTERM":
        log.warning("dtk: received SIGTERM; stopping at the next safe point")
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, GRACE_S)   # a command that reaches none is stopped anyway
    else:
        log.warning("dtk: received %s (a time-limit warning); carrying on (SIGTERM stops the run)", name)


def _on_alarm(signum, frame) -> None:
    if terminate_requested():
        raise Terminated()


def install() -> None:
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), note)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _on_alarm)


def terminate_requested() -> bool:
    """SIGTERM came, and the command is not a training one (that stops on its own, with exit 75)."""
    return "SIGTERM" in received and not TRAINING[0]


def stop_requested() -> bool:
    """SIGTERM came (any command)."""
    return "SIGTERM" in received


def check() -> None:
    """A safe point of a command that does not train: stop here if SIGTERM came."""
    if terminate_requested():
        raise Terminated()


def ignore_from_now() -> None:
    """The process is ending with its result written: no signal may kill it on the way out."""
    for name in ("SIGTERM", "SIGUSR1", "SIGALRM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def reset() -> None:
    """A new command in this process (tests run many): nothing noted yet."""
    received.clear()
    TRAINING[0] = False
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)
