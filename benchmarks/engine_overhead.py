#!/usr/bin/env python3
"""Benchmark: a training step through dtk's engine vs a bare hand-written loop, side by side.

    python benchmarks/engine_overhead.py [--objective reflow|pcm] [--model demo] [--batch-size 32] [--lora] [--save]

Both loops train the same UNet on the same data (reflow pairs; their latents
for PCM) with the same objective — Rectified Diffusion's x₀ pseudo-Huber loss,
or PCM's consistency loss (teacher CFG step, online target, edge jumps) —
AdamW and gradient clipping. The engine run also does its data order,
per-example randomness, metrics and the checks it makes every step.
Reported: median seconds per step after warm-up, and the engine's overhead.
`--save` writes benchmarks/results/engine_overhead-OBJECTIVE.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402


def make_pairs(model_spec, out: Path, n: int) -> None:
    from dtk.demo.shapes import make_split
    from dtk.pairs import PairOptions, run_pairs
    from dtk.data.prompts import PromptItem

    _, captions, _ = make_split(n, seed=3)
    run_pairs(PairOptions(prompts=[PromptItem(c) for c in captions], model=model_spec, out=str(out), steps=4,
                          batch_size=64, device="cpu"))


def engine_times(model_spec, pairs: Path, out: Path, args) -> list[float]:
    from dtk.methods.pcm import PhasedConsistency
    from dtk.methods.reflow import RectifiedDiffusion
    from dtk.train.config import TrainConfig
    from dtk.train.engine import train

    stamps: list[float] = []
    base = RectifiedDiffusion if args.objective == "reflow" else PhasedConsistency

    class Timed(base):
        def loss(self, batch, run):
            stamps.append(time.perf_counter())
            return super().loss(batch, run)

    method = Timed(empty_prompt_prob=0.0) if args.objective == "reflow" else Timed(cfg_range=(1.0, 1.0))
    train(method, TrainConfig(
        out=str(out), model=model_spec, data=str(pairs), max_steps=args.warmup + args.steps + 1,
        batch_size=args.batch_size, lr=1e-5, full=not args.lora, lora_rank=16, checkpoint_every=10**9,
        log_every=10, device="cpu"))
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]


def bare_times(model_spec, pairs: Path, args) -> list[float]:
    """The same objective as a plain PyTorch loop on the diffusers pipeline, nothing else."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    from dtk.diffusion.loading import resolve_model
    from dtk.data.pairs import read_shard_meta

    pipe = StableDiffusionPipeline.from_pretrained(str(resolve_model(model_spec).path), safety_checker=None,
                                                   torch_dtype=torch.float32)  # the demo ships fp16 weights
    unet = pipe.unet
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if args.lora:
        unet.requires_grad_(False)
        from dtk.train.config import DEFAULT_LORA_TARGETS

        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=list(DEFAULT_LORA_TARGETS)))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    noise, latent, captions = [], [], []
    for f in sorted(pairs.glob("pairs-*.safetensors")):
        t = load_file(str(f))
        noise.append(t["noise"])
        latent.append(t["latent"])
        captions += read_shard_meta(f)["prompts"]
    noise, latent = torch.cat(noise), torch.cat(latent)
    abar = pipe.scheduler.alphas_cumprod.double()
    teacher = None
    if args.objective == "pcm":
        import copy

        teacher = copy.deepcopy(unet).requires_grad_(False).eval() if not args.lora else None
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
    cache = {}
    times = []
    g = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(captions), (args.batch_size,), generator=g)
        caps = [captions[i] for i in idx.tolist()]
        with torch.no_grad():
            for c in set(caps) - set(cache):
                cache[c] = pipe.encode_prompt(c, "cpu", 1, False)[0]
        cond = torch.cat([cache[c] for c in caps])
        gens = [torch.Generator().manual_seed(step * 1000 + j) for j in range(args.batch_size)]
        if args.objective == "reflow":
            ts = torch.cat([torch.randint(0, 1000, (1,), generator=gg) for gg in gens])
            a = abar[ts].float().view(-1, 1, 1, 1)
            x0, z = latent[idx], noise[idx]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * z
            eps = unet(x_t, ts, encoder_hidden_states=cond).sample
            x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            loss = (torch.sqrt((x0_hat - x0) ** 2 + 1e-6) - 1e-3).mean()
        else:
            loss = bare_pcm_loss(unet, teacher, latent[idx], cond, uncond.expand_as(cond), abar, gens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        float(loss)
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def bare_pcm_loss(unet, teacher, x0, cond, uncond, abar, gens, n=50, k=4, w=1.0):
    """PCM's consistency loss written out by hand (N = 50, K = 4, edges 0/239/499/739, online target)."""
    import torch

    idx = torch.cat([torch.randint(0, n, (1,), generator=gg) for gg in gens])
    t = (idx + 1) * (1000 // n) - 1
    t_prev = (t - 1000 // n).clamp(min=0)
    s = torch.tensor([0, 239, 499, 739])[(idx[:, None] >= torch.tensor([0, 12, 25, 37])).sum(1) - 1]
    eps0 = torch.stack([torch.randn(x0.shape[1:], generator=gg) for gg in gens])

    def a_s(tt):
        ab = abar[tt].float().view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt()

    def jump(x, eps, t_from, t_to):
        (a1, s1), (a2, s2) = a_s(t_from), a_s(t_to)
        return a2 * (x - s1 * eps) / a1 + s2 * eps

    a, sg = a_s(t)
    x_t = a * x0 + sg * eps0
    student = jump(x_t, unet(x_t, t, encoder_hidden_states=cond).sample, t, s)
    with torch.no_grad():
        net = teacher if teacher is not None else unet
        if teacher is None:
            unet.disable_adapters()
        e_u, e_c = net(torch.cat([x_t, x_t]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        if teacher is None:
            unet.enable_adapters()
        x_prev = jump(x_t, e_c + w * (e_c - e_u), t, t_prev)
        target = jump(x_prev, unet(x_prev, t_prev, encoder_hidden_states=cond).sample, t_prev, s)
    return (torch.sqrt((student - target) ** 2 + 1e-6) - 1e-3).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", choices=("reflow", "pcm"), default="reflow")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternate engine and bare runs this many times")
    ap.add_argument("--lora", action="store_true", help="LoRA (rank 16) instead of full fine-tuning")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries, setup_logging

    setup_logging(quiet=True)
    quiet_libraries()
    import torch

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="dtk-engine-bench-"))
    make_pairs(args.model, work / "pairs", 512)
    engine, bare = [], []
    for r in range(args.rounds):  # interleaved, so that machine drift hits both alike
        engine += engine_times(args.model, work / "pairs", work / f"run{r}", args)
        bare += bare_times(args.model, work / "pairs", args)
    e, b = statistics.median(engine), statistics.median(bare)
    lines = [
        f"model: {args.model}, {'LoRA rank 16' if args.lora else 'full UNet'}, batch {args.batch_size}, "
        f"{args.rounds}×{args.steps} timed steps per loop after {args.warmup} warm-up steps, CPU fp32",
        f"machine: {machine()}",
        "",
        "| loop | s/step (median) | s/step (best) |",
        "|---|---:|---:|",
        f"| bare hand-written loop | {b:.4f} | {min(bare):.4f} |",
        f"| dtk engine ({'train-reflow' if args.objective == 'reflow' else 'distill-pcm'} objective) | {e:.4f} | "
        f"{min(engine):.4f} |",
        "",
        f"engine overhead: {100 * (e / b - 1):+.1f}% (median), target ≤ 5%",
    ]
    report(f"engine_overhead-{args.objective}{'-lora' if args.lora else ''}", "training engine overhead", args, lines)

if __name__ == "__main__":
    main()
