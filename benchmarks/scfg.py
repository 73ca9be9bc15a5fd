#!/usr/bin/env python3
"""Benchmark: S-CFG (`dtk sample --guidance-rule scfg`) against plain CFG at equal guidance, on the demo model.

    python benchmarks/scfg.py --save        # 200 images per setting, guidance 3 and 7.5, 25 steps dpm++2m

Every setting samples the same held-out captions of the shapes benchmark (`dtk eval`'s shapes-v1: its
captions, seeds, classifier features and real renderings, from dtk.evaluate.shapes_benchmark) with the same
seeds, and is measured as `dtk eval` measures a model: attribute accuracy (the shapes reward) and the
Fréchet distance of classifier features to real renderings of the same captions (FD-real; read it against
the noise floor, two real renderings). Δ accuracy is S-CFG's minus CFG's over the same caption/seed pairs,
± 1.96 standard errors of that paired difference. Seconds per image: generation only (decoding included,
model loading and scoring excluded), after a warm-up batch; the two rules of one guidance alternate batch by
batch (which goes first alternating too), so that another job's load on a shared machine hits both alike.
--save writes benchmarks/results/scfg.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

ATTRIBUTES = ("count", "background", "shape1", "color1", "size1", "position1", "shape2", "color2", "size2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--guidances", default="3,7.5")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default="dpm++2m")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.sampling import Request, generate, settings_for, to_uint8
    from dtk.eval.metrics import fd
    from dtk.eval.rewards import ShapesReward
    from dtk.evaluate import shapes_benchmark

    device = torch.device("cpu")
    ref = resolve_model(args.model)
    model = load_model(ref, device, torch.float32)
    bench = shapes_benchmark(args.num_images, device)
    shapes = ShapesReward(device)   # the same classifier, for the per-attribute hits
    requests = [Request(c, s) for c, s in zip(bench.captions, bench.seeds)]

    def sample(both: dict) -> dict:
        """Every request under each rule's settings, the rules alternating batch by batch: rule → (images,
        seconds per image)."""
        images, seconds = {r: [] for r in both}, {r: 0.0 for r in both}
        for k, i in enumerate(range(0, len(requests), args.batch_size)):
            for rule in (list(both) if k % 2 == 0 else list(both)[::-1]):
                t0 = time.perf_counter()
                batch = to_uint8(generate(model, both[rule], requests[i:i + args.batch_size]))
                seconds[rule] += time.perf_counter() - t0
                images[rule] += [Image.fromarray(a) for a in batch]
        return {r: (images[r], seconds[r] / len(requests)) for r in both}

    for rule in ("cfg", "scfg"):   # warm-up
        generate(model, settings_for(model, scheduler=args.scheduler, steps=args.steps, guidance=3.0,
                                     guidance_rule=rule), requests[:args.batch_size])

    rows = []
    for guidance in [float(g) for g in args.guidances.split(",")]:
        per_rule = {}
        made = sample({rule: settings_for(model, scheduler=args.scheduler, steps=args.steps, guidance=guidance,
                                          guidance_rule=rule) for rule in ("cfg", "scfg")})
        for rule, (images, seconds) in made.items():
            rewards = bench.reward(images, bench.captions)
            hits = shapes(images, bench.captions)
            per_rule[rule] = rewards
            row = {"rule": rule, "guidance": guidance, "accuracy": sum(rewards) / len(rewards),
                   "fd_real": fd(bench.features(images), bench.real_features), "seconds": seconds,
                   "attributes": {a: _mean([h[f"shapes/{a}"] for h in hits if f"shapes/{a}" in h])
                                  for a in ATTRIBUTES}}
            if rule == "scfg":
                diff = [s - c for s, c in zip(rewards, per_rule["cfg"])]
                mean = sum(diff) / len(diff)
                sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / max(1, len(diff) - 1))
                row["delta"] = (mean, 1.96 * sd / math.sqrt(len(diff)))
            rows.append(row)
            print(f"{rule} guidance {guidance:g}: accuracy {row['accuracy']:.4f}, FD-real {row['fd_real']:.2f}, "
                  f"{seconds:.3f} s/image", file=sys.stderr, flush=True)

    lines = [
        f"model: {ref.spec}, {args.scheduler} {args.steps} steps, {args.num_images} held-out captions of "
        f"shapes-v1 with their seeds per setting (the same for every row), batch {args.batch_size}, fp32 CPU",
        f"machine: {machine()}",
        "",
        "| rule | guidance | attribute accuracy | Δ accuracy vs cfg (paired, ±1.96 SE) | FD-real | s/image |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['rule']} | {r['guidance']:g} | {r['accuracy']:.4f} | "
          + (f"{r['delta'][0]:+.4f} ± {r['delta'][1]:.4f}" if "delta" in r else "—")
          + f" | {r['fd_real']:.2f} | {r['seconds']:.3f} |" for r in rows],
        "",
        f"FD noise floor (two real renderings of the same {args.num_images} captions): {bench.noise_floor:.2f}",
        "",
        "Per attribute (fraction correct among the images whose caption states it):",
        "",
        "| rule | guidance | " + " | ".join(ATTRIBUTES) + " |",
        "|---|---:|" + "---:|" * len(ATTRIBUTES),
        *[f"| {r['rule']} | {r['guidance']:g} | "
          + " | ".join("—" if r["attributes"][a] is None else f"{r['attributes'][a]:.3f}" for a in ATTRIBUTES)
          + " |" for r in rows],
    ]
    report("scfg", "S-CFG against CFG at equal guidance (demo model)", args, lines)


def _mean(values):
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    main()
