#!/usr/bin/env python3
"""Benchmark: seconds per image of `dtk sample`'s loop vs the diffusers pipeline call.

    python benchmarks/sample_speed.py                      # demo model, prints a markdown table
    python benchmarks/sample_speed.py --model DIR --steps 25 --batch-sizes 1,4 --save

Measures generation only (model loading excluded), after one warm-up batch,
fp32 on the CPU unless --device says otherwise. `--save` writes the table to
benchmarks/results/sample_speed.md together with the machine it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries

    quiet_libraries()
    import torch

    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.sampling import Request, generate, settings_for

    ref = resolve_model(args.model)
    model = load_model(ref, torch.device(args.device), torch.float32)
    settings = settings_for(model, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance)
    scheduler, guidance, size = settings.scheduler, settings.guidance, settings.height
    prompt = "a large red circle on a white background"

    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        requests = [Request(prompt, seed=i) for i in range(bs)]
        generate(model, settings, requests)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generate(model, settings, requests)
            times.append((time.perf_counter() - t0) / bs)
        rows.append(("dtk sample loop", bs, statistics.median(times), min(times)))

        # the same work through the diffusers pipeline's own __call__, for comparison
        from dtk.diffusion.schedulers import make_sampler

        pipe = model.pipe
        sampler = make_sampler(scheduler, pipe.scheduler.config, args.steps, None, model.device)
        if hasattr(sampler, "scheduler"):
            pipe.scheduler = sampler.scheduler
            kwargs = dict(prompt=[prompt] * bs, num_inference_steps=args.steps, guidance_scale=float(guidance),
                          height=size, width=size, output_type="np")
            pipe(**kwargs)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(bs)])
                times.append((time.perf_counter() - t0) / bs)
            rows.append(("diffusers pipeline __call__", bs, statistics.median(times), min(times)))

    lines = [
        f"model: {ref.spec} ({ref.family}, {size}x{size}), {scheduler}, {args.steps} steps, guidance {guidance} "
        f"(CFG: {'yes' if guidance > 1 else 'no'}), {args.device} fp32",
        f"machine: {machine()}",
        "",
        "| path | batch | s/image (median) | s/image (best) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {bs} | {med:.3f} | {best:.3f} |" for name, bs, med, best in rows],
    ]
    report("sample_speed", "sample speed", args, lines)


if __name__ == "__main__":
    main()
