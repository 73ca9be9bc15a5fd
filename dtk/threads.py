"""How many CPU threads torch may use: the CPUs this process may run on, less what others keep busy.

torch's default is one thread per core of the machine. Inside a cgroup quota, a CPU affinity mask (Slurm,
taskset, containers) or beside other busy processes that oversubscribes, and OpenMP threads then wait on each
other: on a loaded 2-core machine `dtk sample` ran 15x slower with 2 threads than with 1. Precedence:
``--threads`` / ``DTK_THREADS``, then ``OMP_NUM_THREADS``, then the automatic choice below.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from dtk.errors import BadInput

log = logging.getLogger("dtk")


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``);
    None when there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (rounded up, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def busy_elsewhere() -> float:
    """Other tasks running right now: the kernel's count of runnable tasks (/proc/loadavg) less this one,
    the least of three looks 10 ms apart so that a passing blip is not counted. Not the 1-minute average:
    that still counts a dtk run that finished a moment ago (a Makefile of runs would each take 1 thread).
    Where /proc is missing (macOS), the 1-minute load average."""
    import time

    counts = []
    for _ in range(3):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            counts.append(max(0, int(running) - 1))
        except (OSError, IndexError, ValueError):
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return 0.0
        time.sleep(0.01)
    return float(min(counts))


def auto_threads(cpus: int, busy: float, confined: bool, local_processes: int = 1) -> int:
    """Threads per process: the CPUs not kept busy by others, shared by the processes a launcher started on
    this node; at least 1. A process ``confined`` to part of the machine (an affinity mask or a cgroup
    quota: Slurm, containers) owns its CPUs, so the machine-wide load is not held against it."""
    free = cpus if confined else cpus - int(busy + 0.5)
    return max(1, max(free, 1) // max(1, local_processes))


def parse_threads(text: str, source: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInput(f"{source}={text}: want a whole number of threads, 1 or more")
    return n


def choose_threads(requested: int | None = None, env: dict | None = None) -> tuple[int, str]:
    """(threads, why): ``requested`` (--threads/DTK_THREADS), else OMP_NUM_THREADS, else automatic."""
    env = os.environ if env is None else env
    if requested is not None:
        return requested, "as asked"
    if env.get("OMP_NUM_THREADS", "").strip():
        return parse_threads(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "from OMP_NUM_THREADS"
    cpus = available_cpus()
    confined = cpus < (os.cpu_count() or cpus)
    busy = 0.0 if confined else busy_elsewhere()
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        local = 1
    why = (f"{cpus} CPU(s) {'allotted' if confined else 'available'}"
           + ("" if confined else f", {busy:g} busy with other work")
           + (f", shared by {local} processes" if local > 1 else ""))
    return auto_threads(cpus, busy, confined, local), why + "; --threads or DTK_THREADS to change"


_UNSAID: list[str] = []   # the choice, said once the work starts (a refused input stays a one-line error)


def apply(requested: int | None = None) -> int:
    """Set torch's thread count once a command runs (not for --help or completion: torch loads here)."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    _UNSAID[:] = [f"dtk: {threads} CPU thread{'' if threads == 1 else 's'} ({why})"]
    return threads


def report() -> None:
    """Say on stderr how many threads were chosen, and why: once, as the real work begins."""
    if _UNSAID:
        log.info(_UNSAID.pop())
