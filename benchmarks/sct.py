#!/usr/bin/env python3
"""Benchmark: ECT vs SCT (batch reference) vs SCT (bank) on the pixel demo, equal iterations and batch.

    python benchmarks/sct.py --work /tmp/sct-bench [--steps 400] [--save]

Every step is a dtk command (printed before it runs):

1. `python -m dtk.demo.pixel`: class-labelled 32×32 shapes (training split);
2. `dtk tune-sct --model demo-pixel` three times — `--target ect`, `--target stable`
   (the batch as reference set), `--target stable --bank-size B` — with the
   same steps, batch, learning rate and seed, full fine-tuning;
3. with `--guide-work DIR` (a shorter run of this benchmark), each run again
   exported from its final checkpoint with `--guide-with DIR/RUN --guidance W
   --t-mid T` (SCT's guidance by a worse version of the model itself);
4. `dtk eval` (shape-classes benchmark): the base model at 25/50 DDIM steps (the
   ceiling), each tuned model (and guided export) at 1 and 2 steps.

Also measured, without any network: the error of each training target x_r
against the posterior-mean target from a large reference set (4096 images of
the same class), per t — the variance SCT sets out to reduce.
Prints markdown tables; --save writes benchmarks/results/sct.md.
Steps already done in --work are not redone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report, step  # noqa: E402


def target_errors(batch: int, bank: int, big: int = 4096, trials: int = 8, seed: int = 0) -> list[dict]:
    """Mean squared error per dimension of each method's x_r against the big-reference posterior x_r."""
    import torch

    from dtk.demo.pixel import class_split
    from dtk.methods.sct import ect_r, stable_point

    images, labels = class_split(big, seed=seed + 11)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t_value in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        err = {"ect": 0.0, "sct-batch": 0.0, "sct-bank": 0.0}
        for _ in range(trials):
            idx = torch.randperm(big, generator=g)[: batch + bank]
            x0, y0 = x[idx[:batch]], y[idx[:batch]]
            t = torch.full((batch,), t_value, dtype=torch.float64)
            r = ect_r(t, stage=1)
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            x_t = x0 + t.view(-1, 1, 1, 1) * eps
            ideal, _ = stable_point(x_t, t, r, x, y0[:, None] == y[None, :])
            candidates = {"ect": x0 + r.view(-1, 1, 1, 1) * eps,
                          "sct-batch": stable_point(x_t, t, r, x0, y0[:, None] == y0[None, :])[0],
                          "sct-bank": stable_point(x_t, t, r, x[idx], y0[:, None] == y[idx][None, :])[0]}
            for name, x_r in candidates.items():
                err[name] += float((x_r - ideal).pow(2).mean()) / trials
        rows.append({"t": t_value, "dt_over_t": float(((t - r) / t)[0]), **err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--model", default="demo-pixel", help="the pixel-space base model (default: the bundled demo)")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=300, help="tuning steps of every run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bank-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--num-images", type=int, default=500, help="eval images per model and step count")
    ap.add_argument("--guide-work", default=None, metavar="DIR",
                    help="the work dir of a shorter run of this benchmark (same data and settings): each run is also "
                    "exported guided by its namesake there (SCT's guidance by a worse version of itself)")
    ap.add_argument("--guidance", type=float, default=3.0, help="w of the guided exports")
    ap.add_argument("--guided-t-mid", type=float, default=6.0, help="2-step re-noise σ of the guided exports")
    ap.add_argument("--results-name", default="sct", help="--save writes benchmarks/results/NAME.md")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    w = Path(args.work)
    dtk = [sys.executable, "-m", "dtk"]
    times: dict = {}
    step([sys.executable, "-m", "dtk.demo.pixel", "--out", w / "data", "--num", args.images, "--seed", 7],
         w / "data" / f"{args.images - 1:06d}.txt", times, "data")
    # ECT's CIFAR settings (lognormal −1.1/2.0), the Δt curriculum compressed into the run: 4 stages
    common = ["--model", args.model, "--data", w / "data", "--full", "--max-steps", args.steps, "--batch-size",
              args.batch_size, "--lr", args.lr, "--double", max(1, args.steps // 4), "--p-mean", -1.1,
              "--p-std", 2.0, "--ema-decay", 0.99, "--checkpoint-every", 500, "--log-every", 50]
    runs = {"ect": ["--target", "ect"], "sct-batch": ["--target", "stable"],
            "sct-bank": ["--target", "stable", "--bank-size", args.bank_size]}
    for name, extra in runs.items():
        step([*dtk, "tune-sct", *common, *extra, "--out", w / name], w / name / "dtk.json", times, name)
    evaluated = list(runs)
    if args.guide_work:   # the same weights, re-exported from the final checkpoint with the guide recorded
        for name, extra in runs.items():
            final = w / name / "checkpoints" / f"step-{args.steps:08d}"
            step([*dtk, "tune-sct", *common, *extra, "--resume", final, "--out", w / f"{name}-guided",
                  "--guide-with", Path(args.guide_work) / name, "--guidance", args.guidance,
                  "--t-mid", args.guided_t_mid], w / f"{name}-guided" / "dtk.json", times, f"{name}-guided")
            evaluated.append(f"{name}-guided")
    step([*dtk, "eval", "--model", args.model, "--steps", "25,50", "--num-images", args.num_images,
          "--out", w / "eval-base"], w / "eval-base" / "eval.json", times, "eval-base")
    for name in evaluated:
        step([*dtk, "eval", "--model", w / name, "--steps", "1,2", "--num-images", args.num_images,
              "--out", w / f"eval-{name}"], w / f"eval-{name}" / "eval.json", times, f"eval-{name}")

    base = {r["steps"]: r for r in json.loads((w / "eval-base" / "eval.json").read_text())["rows"]}
    res = {name: {r["steps"]: r for r in json.loads((w / f"eval-{name}" / "eval.json").read_text())["rows"]}
           for name in evaluated}
    trained = {name: json.loads((w / name.removesuffix("-guided") / "dtk.json").read_text())["training"]
               for name in evaluated}
    noise_floor = json.loads((w / "eval-base" / "eval.json").read_text())["noise_floor"]
    rows = [f"| base (DDIM) | {n} | {r['fd_real']:.1f} | {r['accuracy']:.3f} | — |" for n, r in sorted(base.items())]
    for name in evaluated:
        rows += [f"| {name} | {n} | {r['fd_real']:.1f} | {r['accuracy']:.3f} | {trained[name]['seconds'] / 60:.0f} min |"
                 for n, r in sorted(res[name].items())]
    errors = target_errors(args.batch_size, args.bank_size)
    err_rows = [f"| {e['t']:g} | {e['dt_over_t']:.3f} | {e['ect']:.2e} | {e['sct-batch']:.2e} | {e['sct-bank']:.2e} |"
                for e in errors]

    def fd(name, n):
        return res[name][n]["fd_real"]

    def beats(suffix=""):
        return [n for n in (1, 2) if min(fd(f"sct-batch{suffix}", n), fd(f"sct-bank{suffix}", n)) < fd(f"ect{suffix}", n)]

    best_sct = min((name for name in evaluated if name.startswith("sct")), key=lambda name: fd(name, 2))
    ratio = fd(best_sct, 2) / base[50]["fd_real"]
    guided = (f"; guided exports (`-guided`): the same weights, D_guide + {args.guidance:g}(D − D_guide) with the "
              f"namesake run of {args.guide_work} as the guide, 2-step re-noise σ {args.guided_t_mid:g}"
              if args.guide_work else "")
    lines = [
        f"pixel demo (class-conditional UNet2DModel, 32×32 shapes), shape-classes-v1 ({args.num_images} images per "
        f"row, FD noise floor {noise_floor:.1f}); every run: {args.images} images, full UNet, {args.steps} steps × "
        f"batch {args.batch_size}, lr {args.lr:g}, stage every {max(1, args.steps // 4)} steps (q = 4), "
        f"lognormal t (−1.1, 2.0), EMA 0.99; bank {args.bank_size}; 2-step re-noise σ 1.526{guided}",
        f"machine: {machine()}",
        "",
        "| model | steps | FD-real | accuracy | training time |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "target error: mean squared error per dimension of x_r against the posterior-mean x_r over 4096 references "
        f"of the same class (stage 1, batch {args.batch_size}, {8 * args.batch_size} draws per t)",
        "",
        "| t | Δt/t | ECT x₀ + rε | SCT, batch | SCT, bank |",
        "|---:|---:|---:|---:|---:|",
        *err_rows,
        "",
        "targets:",
        f"- SCT beats ECT on FD-real at 1 and 2 steps: at {beats()} of [1, 2] "
        f"({'met' if len(beats()) == 2 else 'NOT met'})"
        + (f"; guided, all three alike: at {beats('-guided')} of [1, 2]" if args.guide_work else ""),
        f"- SCT 2-step FD-real within 1.3× of the base model's 50-step: {best_sct} {ratio:.2f}× "
        f"({'met' if ratio <= 1.3 else 'NOT met'})",
    ]
    report(args.results_name, "ECT vs SCT on the pixel demo", args, lines)


if __name__ == "__main__":
    main()
