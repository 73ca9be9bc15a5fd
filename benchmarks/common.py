"""What every benchmark script shares: the machine it ran on, and saving its table with the command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def save(name: str, title: str, args, table: str) -> Path:
    """Write ``results/NAME.md``: the title, the exact command (from ``args``) and the table."""
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                     for k, v in vars(args).items() if v is not None and v is not False and k != "save")
    out = RESULTS / f"{name}.md"
    out.write_text(f"# {title}\n\nCommand: `python benchmarks/{Path(sys.argv[0]).name} {flags}`\n\n{table}\n")
    print(f"wrote {out}")
    return out


def report(name: str, title: str, args, lines: list[str]) -> str:
    """Print a benchmark's table (its lines joined) and, with --save, write it as ``results/NAME.md``."""
    table = "\n".join(lines)
    print(table)
    if args.save:
        save(name, title, args, table)
    return table


def step(cmd: list, done: Path, times: dict, name: str) -> None:
    """Run one command of a benchmark pipeline (printed first), unless ``done`` exists; record its wall time."""
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd), file=sys.stderr, flush=True)
    if done.exists():
        print(f"  (done already: {done})", file=sys.stderr)
        times.setdefault(name, None)
        return
    t0 = time.time()
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)
    times[name] = time.time() - t0
