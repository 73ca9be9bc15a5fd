#!/usr/bin/env python3
"""Benchmark: pairs per second of `dtk reflow-pairs` vs calling the diffusers pipeline directly.

    python benchmarks/pairs_throughput.py [--model demo] [--num 128] [--batch-size 64] [--repeats 3] [--save]

Both run the teacher's DPM-Solver (order 2), 25 steps, guidance 5, on per-pair
noise of their own (the same amount of work: one UNet call per step and batch
of 2 × the batch size), and keep the final latents; dtk also writes the shards.
Model loading is excluded; each side gets one warm-up batch first; the two are
timed alternately, --repeats times, so that load on a shared machine falls on
both; the table gives the median and the range.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--num", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries, setup_logging

    setup_logging(quiet=True)
    quiet_libraries()
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from dtk.demo.shapes import make_split
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.sampling import SamplerSettings
    from dtk.pairs import _write_shard
    from dtk.progress import Progress
    from dtk.data.prompts import PromptItem

    torch.set_num_threads(2)
    _, captions, _ = make_split(args.num, seed=5)
    model = load_model(resolve_model(args.model), torch.device("cpu"), torch.float32)
    size = model.default_size
    settings = SamplerSettings("dpm-solver", args.steps, args.guidance, size, size)

    class Opts:
        prompts = [PromptItem(c) for c in captions]
        seed, negative_prompt, batch_size = 0, "", args.batch_size

    work = Path(tempfile.mkdtemp(prefix="dtk-pairs-bench-"))
    record = {"bench": True}
    bar = Progress(0, "", enabled=False)
    _write_shard(work / "warm.safetensors", model, settings, Opts, range(args.batch_size), record, bar)

    pipe = model.pipe
    dtk_scheduler = pipe.scheduler
    pipe_scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min")
    shape = (model.unet.config.in_channels, size // model.vae_scale_factor, size // model.vae_scale_factor)

    def diffusers_batch(start, stop):
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(start, stop)])
        return pipe(captions[start:stop], latents=noise, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="latent").images

    pipe.scheduler = pipe_scheduler
    diffusers_batch(0, args.batch_size)
    dtk_rates, pipe_rates = [], []
    for _ in range(args.repeats):
        pipe.scheduler = dtk_scheduler
        t0 = time.perf_counter()
        _write_shard(work / "pairs.safetensors", model, settings, Opts, range(args.num), record, bar)
        dtk_rates.append(args.num / (time.perf_counter() - t0))
        (work / "pairs.safetensors").unlink()
        pipe.scheduler = pipe_scheduler
        t0 = time.perf_counter()
        for start in range(0, args.num, args.batch_size):
            diffusers_batch(start, min(args.num, start + args.batch_size))
        pipe_rates.append(args.num / (time.perf_counter() - t0))
    shutil.rmtree(work, ignore_errors=True)

    def cell(rates):
        return f"{statistics.median(rates):.2f} | {min(rates):.2f}–{max(rates):.2f}"

    lines = [
        f"model: {args.model} ({size}x{size}), DPM-Solver order 2, {args.steps} steps, guidance {args.guidance}, "
        f"{args.num} pairs in batches of {args.batch_size}, CPU fp32",
        f"machine: {machine()}",
        "",
        f"| path | pairs/s (median of {args.repeats}) | range |",
        "|---|---:|---:|",
        f"| diffusers pipeline __call__ (latents out, nothing written) | {cell(pipe_rates)} |",
        f"| dtk reflow-pairs (noise + latents, shard written) | {cell(dtk_rates)} |",
        "",
        f"dtk / diffusers: {statistics.median(dtk_rates) / statistics.median(pipe_rates):.2f}× (medians)",
    ]
    report("pairs_throughput", "reflow pair generation throughput", args, lines)

if __name__ == "__main__":
    main()
