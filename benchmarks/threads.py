#!/usr/bin/env python3
"""Benchmark: seconds per image of `dtk sample` at each CPU thread count, on an idle and on a busy machine,
and the count dtk's automatic choice (dtk/threads.py) picks in each case.

    python benchmarks/threads.py --save          # demo model, 25 steps, batch 1; busy = 0, 1 and 2 spinning procs

"Busy" starts that many processes that spin on a core for the whole measurement, as other jobs on a shared
machine would. Generation only (model loading excluded), after a warm-up image; the rows of one condition
are measured alternately, so that drift hits them alike. Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

SPIN = "while True: pass"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--busy", default="0,1,2", help="numbers of spinning processes, one condition each")
    ap.add_argument("--threads", default=None, help="thread counts to time [1..CPUs available]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries

    quiet_libraries()
    import torch

    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.sampling import Request, generate, settings_for
    from dtk.threads import available_cpus, choose_threads

    ref = resolve_model(args.model)
    model = load_model(ref, torch.device("cpu"), torch.float32)
    settings = settings_for(model, steps=args.steps)
    request = [Request("a large red circle on a white background", seed=0)]
    counts = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, available_cpus() + 1))

    rows = []
    for busy in [int(b) for b in args.busy.split(",")]:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            time.sleep(1.0)   # the spinners are running
            auto, why = choose_threads(None, env={})
            times: dict[int, list[float]] = {t: [] for t in counts}
            for t in counts:   # warm-up at every count
                torch.set_num_threads(t)
                generate(model, settings, request)
            for _ in range(args.repeats):
                for t in counts:
                    torch.set_num_threads(t)
                    t0 = time.perf_counter()
                    generate(model, settings, request)
                    times[t].append(time.perf_counter() - t0)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
        best = min(statistics.median(v) for v in times.values())
        for t in counts:
            med = statistics.median(times[t])
            rows.append((busy, t, med, med / best, "auto" if t == auto else "", why if t == auto else ""))

    lines = [
        f"model: {ref.spec}, {settings.scheduler} {settings.steps} steps, guidance {settings.guidance}, batch 1, "
        f"fp32 CPU; median of {args.repeats}",
        f"machine: {machine()}",
        "",
        "| other busy processes | threads | s/image | × the condition's best | dtk's choice | why |",
        "|---:|---:|---:|---:|---|---|",
        *[f"| {b} | {t} | {s:.3f} | {r:.2f} | {a} | {w} |" for b, t, s, r, a, w in rows],
    ]
    report("threads", "sample speed by CPU threads, idle and busy", args, lines)


if __name__ == "__main__":
    main()
