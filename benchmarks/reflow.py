#!/usr/bin/env python3
"""Benchmark: Rectified Diffusion on the demo model — teacher vs rectified vs phased, with `dtk eval`.

    python benchmarks/reflow.py --work /tmp/reflow-bench [--save]

Runs, as a user would (every step is a dtk command, printed before it runs):

1. `python -m dtk.demo.shapes`: a folder of training-split shapes images with captions;
2. `dtk reflow-pairs`: teacher pairs for those captions (DPM-Solver 25 steps, the teacher's guidance);
3. `dtk train-reflow` on the pairs, and `dtk train-reflow --phased 4` on the images;
4. `dtk eval`: the teacher (DDIM trailing) at 1/2/4/25 steps, rectified at 1/2/4, phased at 4.

Prints a markdown table (and with --save writes benchmarks/results/reflow.md):
FD-real, FD-teacher and accuracy per model and step count, training images
seen and wall time, against the targets of the paper's SD1.5 ratios
(rectified 1-step FD-real ≤ 1.5× the teacher's 25-step, 2-step ≤ 1.2×).
Steps already done in --work (their dtk.json exists) are not redone, so
`--continue-steps 9000,9000` after an earlier run adds only the continuation
stages (each from the previous stage's weights, the lr schedule restarted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report, step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="working directory (data, runs, evals)")
    ap.add_argument("--images", type=int, default=10000, help="training images for the phased variant")
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--guidance", type=float, default=None, help="teacher guidance for pairs [the teacher's]")
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--phased-steps", type=int, default=1500)
    ap.add_argument("--long-steps", type=int, default=9000, help="a longer rectified run (0 = none)")
    ap.add_argument("--continue-steps", default="",
                    help="comma-separated stages after reflow-long, each this many more steps from the previous "
                         "stage's weights with the lr schedule restarted (reflow-long2, reflow-long3, ...)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--num-images", type=int, default=1000, help="benchmark images per model and step count")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.diffusion.loading import resolve_model

    teacher_guidance = args.guidance or resolve_model(None).sampler["guidance"]
    w = Path(args.work)
    dtk = [sys.executable, "-m", "dtk"]
    times: dict = {}
    step([sys.executable, "-m", "dtk.demo.shapes", "--out", w / "images", "--num", args.images, "--seed", 7],
         w / "images" / "captions.txt", times, "images")
    step([*dtk, "reflow-pairs", "--prompts", w / "images" / "captions.txt", "--num", args.pairs, "--guidance",
          teacher_guidance, "--batch-size", 64, "--out", w / "pairs"], w / "pairs" / "dtk.json", times, "pairs")
    train = ["--full", "--batch-size", args.batch_size, "--lr", args.lr, "--ema-decay", 0.999,
             "--lr-schedule", "cosine", "--warmup-steps", 100, "--checkpoint-every", 500, "--log-every", 100]
    step([*dtk, "train-reflow", "--data", w / "pairs", "--out", w / "reflow", "--max-steps", args.train_steps, *train],
         w / "reflow" / "dtk.json", times, "reflow")
    step([*dtk, "train-reflow", "--data", w / "images", "--phased", 4, "--out", w / "phased", "--max-steps",
          args.phased_steps, *train], w / "phased" / "dtk.json", times, "phased")
    # the pairs carry the teacher's guidance already: the paper's extra 1.5 at sampling is measured beside 1.0
    evals = {"teacher": ["--scheduler", "ddim-trailing", "--steps", "1,2,4,25"],
             "reflow": ["--model", w / "reflow", "--steps", "1,2,4"],
             "reflow-g1": ["--model", w / "reflow", "--steps", "1,2,4", "--guidance", "1.0"],
             "phased": ["--model", w / "phased", "--steps", "4"],
             "phased-g1": ["--model", w / "phased", "--steps", "4", "--guidance", "1.0"]}
    if args.long_steps:
        step([*dtk, "train-reflow", "--data", w / "pairs", "--out", w / "reflow-long", "--max-steps", args.long_steps,
              *train], w / "reflow-long" / "dtk.json", times, "reflow-long")
        evals["reflow-long-g1"] = ["--model", w / "reflow-long", "--steps", "1,2,4", "--guidance", "1.0"]
    stages = [int(v) for v in args.continue_steps.split(",") if v] if args.long_steps else []
    previous = "reflow-long"
    for i, more in enumerate(stages, start=2):
        name = f"reflow-long{i}"
        step([*dtk, "train-reflow", "--model", w / previous, "--allow-other-teacher", "--data", w / "pairs",
              "--out", w / name, "--max-steps", more, *train], w / name / "dtk.json", times, name)
        evals[f"{name}-g1"] = ["--model", w / name, "--steps", "1,2,4", "--guidance", "1.0"]
        previous = name
    for name, opts in evals.items():
        step([*dtk, "eval", *opts, "--num-images", args.num_images, "--out", w / f"eval-{name}"],
             w / f"eval-{name}" / "eval.json", times, f"eval-{name}")

    results = {name: json.loads((w / f"eval-{name}" / "eval.json").read_text()) for name in evals}
    teacher25 = next(r for r in results["teacher"]["rows"] if r["steps"] == 25)
    runs = {name: name.removesuffix("-g1") for name in evals if name != "teacher"}
    trained = {name: json.loads((w / run / "dtk.json").read_text())["training"] for name, run in runs.items()}
    for i in range(2, len(stages) + 2):  # a continuation: count what its starting points saw too
        before, this = trained["reflow-long-g1" if i == 2 else f"reflow-long{i - 1}-g1"], trained[f"reflow-long{i}-g1"]
        trained[f"reflow-long{i}-g1"] = {k: this[k] + before[k] for k in ("examples_seen", "seconds")}
    rows = []
    for name, res in results.items():
        for r in res["rows"]:
            seen = trained[name]["examples_seen"] if name in trained else None
            secs = trained[name]["seconds"] if name in trained else None
            rows.append(f"| {name} | {r['steps']} | {r['guidance']:g} | {r['fd_real']:.1f} | "
                        f"{r['fd_real'] / teacher25['fd_real']:.2f} | "
                        f"{r['fd_teacher']:.1f} | {r['accuracy']:.3f} | "
                        f"{seen if seen is not None else '—'} | {f'{secs / 60:.0f} min' if secs else '—'} |")
    best = {}
    for name in runs:  # the best rectified (pairs) row per step count
        if name.startswith("reflow"):
            for r in results[name]["rows"]:
                best[r["steps"]] = min(best.get(r["steps"], float("inf")), r["fd_real"] / teacher25["fd_real"])
    ratio = best
    pairs_min = times.get("pairs")
    lines = [
        f"demo teacher, shapes-v1 benchmark ({args.num_images} images per row; FD noise floor "
        f"{results['teacher']['noise_floor']:.1f}); sampling: the teacher with DDIM trailing at its guidance "
        f"{teacher_guidance:g}, the retrained models with their dtk.json recommendation",
        f"pairs: {args.pairs} from {args.images} training captions, DPM-Solver 25 steps, guidance {teacher_guidance:g}"
        + (f" ({pairs_min / 60:.0f} min)" if pairs_min else ""),
        f"training: full UNet, batch {args.batch_size}, lr {args.lr:g} cosine, EMA 0.999; "
        f"rectified {args.train_steps} steps (reflow-long: {args.long_steps}"
        + "".join(f"; reflow-long{i}: {more} more from the previous run's weights, the lr schedule restarted"
                  for i, more in enumerate(stages, start=2)) + "), phased (K=4, online teacher) "
        f"{args.phased_steps} steps; *-g1 rows sample with guidance 1.0 instead of the recommended 1.5",
        f"machine: {machine()}",
        "",
        "| model | steps | guidance | FD-real | ÷ teacher 25-step | FD-teacher | accuracy | training images | training time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"targets (best rectified row): 1-step FD-real ≤ 1.5× teacher 25-step: {ratio.get(1, float('nan')):.2f}× "
        f"({'met' if ratio.get(1, 9) <= 1.5 else 'NOT met'}); "
        f"2-step ≤ 1.2×: {ratio.get(2, float('nan')):.2f}× ({'met' if ratio.get(2, 9) <= 1.2 else 'NOT met'})",
    ]
    report("reflow", "Rectified Diffusion on the demo model", args, lines)

if __name__ == "__main__":
    main()
