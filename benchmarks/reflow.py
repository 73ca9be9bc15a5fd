#!/usr/bin/env python3
"""Benchmark: Rectified Diffusion on the demo model — teacher vs rectified vs phased, with `dtk eval`.

    python benchmarks/reflow.py --work /tmp/reflow-bench [--save]

Runs, as a user would (every step is a dtk command, printed before it runs):

1. `python -m dtk.demo.shapes`: a folder of training-split shapes images with captions;
2. `dtk reflow-pairs`: teacher pairs for those captions (DPM-Solver 25 steps, the teacher's guidance);
3. `dtk train-reflow` on the pairs, and `dtk train-reflow --phased 4` on the images;
4. `dtk eval`: the teacher (DDIM trailing) at 1/2/4/25 steps at each `--teacher-guidance` (default: 1
   and its own), rectified at 1/2/4, phased at 4.

Prints a markdown table (and with --save writes benchmarks/results/reflow.md):
FD-real, FD-teacher and accuracy per model and step count, training images
seen and wall time, against the targets of the paper's SD1.5 ratios
(rectified 1-step FD-real ≤ 1.5× the teacher's 25-step, 2-step ≤ 1.2×), and the
before/after ratio at 1 and 2 steps with each side at its best guidance (a
teacher's 1-step sample at its own guidance 2 is far worse than at guidance 1,
so comparing a rectified model at guidance 1 with that would flatter it).
`--teacher-only` runs just the teacher rows (no data, no training; saved as
benchmarks/results/reflow-teacher-guidance.md).
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
    ap.add_argument("--continue-steps", default=None,
                    help="comma-separated stages after reflow-long, each this many more steps from the previous "
                         "stage's weights with the lr schedule restarted (reflow-long2, reflow-long3, ...)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--num-images", type=int, default=1000, help="benchmark images per model and step count")
    ap.add_argument("--teacher-guidance", default=None,
                    help="comma-separated guidance values the teacher rows are sampled at, besides its own [1]")
    ap.add_argument("--teacher-steps", default="1,2,4,25", help="step counts of the teacher rows")
    ap.add_argument("--teacher-only", action="store_true",
                    help="only the teacher rows (no images, pairs or training): the before side of every ratio")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.diffusion.loading import resolve_model

    own_guidance = resolve_model(None).sampler["guidance"]
    teacher_guidance = args.guidance or own_guidance
    # always with its own guidance: the "÷ teacher 25-step" column's reference
    sweep = sorted({own_guidance, *(float(v) for v in (args.teacher_guidance or "1").split(",") if v.strip())})
    w = Path(args.work)
    dtk = [sys.executable, "-m", "dtk"]
    times: dict = {}
    # the teacher at its own guidance is "teacher" (its dtk.json recommendation, no --guidance); every other
    # guidance g is "teacher-g{g}": a before/after ratio takes each side at its best setting, not the teacher's
    # default against the student's best
    evals = {("teacher" if g == own_guidance else f"teacher-g{g:g}"):
             ["--scheduler", "ddim-trailing", "--steps", args.teacher_steps]
             + ([] if g == own_guidance else ["--guidance", f"{g:g}"]) for g in sweep}
    if args.teacher_only:
        report_teacher(args, w, dtk, evals, times, own_guidance)
        return
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
    evals.update({"reflow": ["--model", w / "reflow", "--steps", "1,2,4"],
                  "reflow-g1": ["--model", w / "reflow", "--steps", "1,2,4", "--guidance", "1.0"],
                  "phased": ["--model", w / "phased", "--steps", "4"],
                  "phased-g1": ["--model", w / "phased", "--steps", "4", "--guidance", "1.0"]})
    if args.long_steps:
        step([*dtk, "train-reflow", "--data", w / "pairs", "--out", w / "reflow-long", "--max-steps", args.long_steps,
              *train], w / "reflow-long" / "dtk.json", times, "reflow-long")
        evals["reflow-long-g1"] = ["--model", w / "reflow-long", "--steps", "1,2,4", "--guidance", "1.0"]
    stages = [int(v) for v in (args.continue_steps or "").split(",") if v] if args.long_steps else []
    previous = "reflow-long"
    for i, more in enumerate(stages, start=2):
        name = f"reflow-long{i}"
        step([*dtk, "train-reflow", "--model", w / previous, "--allow-other-teacher", "--data", w / "pairs",
              "--out", w / name, "--max-steps", more, *train], w / name / "dtk.json", times, name)
        evals[f"{name}-g1"] = ["--model", w / name, "--steps", "1,2,4", "--guidance", "1.0"]
        previous = name
    results = run_evals(args, w, dtk, evals, times)
    teacher25 = next(r for r in results["teacher"]["rows"] if r["steps"] == 25)
    runs = {name: name.removesuffix("-g1") for name in evals if not name.startswith("teacher")}
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
        f"{args.phased_steps} steps; *-g1 rows sample with guidance 1.0 instead of the recommended 1.5; "
        f"teacher-gN rows: the teacher (DDIM trailing) at guidance N instead of its own {own_guidance:g}",
        f"machine: {machine()}",
        "",
        "| model | steps | guidance | FD-real | ÷ teacher 25-step | FD-teacher | accuracy | training images | training time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"targets (best rectified row): 1-step FD-real ≤ 1.5× teacher 25-step: {ratio.get(1, float('nan')):.2f}× "
        f"({'met' if ratio.get(1, 9) <= 1.5 else 'NOT met'}); "
        f"2-step ≤ 1.2×: {ratio.get(2, float('nan')):.2f}× ({'met' if ratio.get(2, 9) <= 1.2 else 'NOT met'})",
        "",
        *before_after(results, [n for n in runs if n.startswith("reflow")]),
    ]
    report("reflow", "Rectified Diffusion on the demo model", args, lines)


def run_evals(args, w: Path, dtk: list, evals: dict, times: dict) -> dict:
    for name, opts in evals.items():
        step([*dtk, "eval", *opts, "--num-images", args.num_images, "--out", w / f"eval-{name}"],
             w / f"eval-{name}" / "eval.json", times, f"eval-{name}")
    return {name: json.loads((w / f"eval-{name}" / "eval.json").read_text()) for name in evals}


def best_rows(results: dict, names: list[str]) -> dict:
    """Per step count, the row (with its eval's name) of lowest FD-real among ``names``' evals."""
    best: dict = {}
    for name in names:
        for r in results[name]["rows"]:
            if r["steps"] not in best or r["fd_real"] < best[r["steps"]][1]["fd_real"]:
                best[r["steps"]] = (name, r)
    return best


def before_after(results: dict, students: list[str]) -> list[str]:
    """The 1/2/4-step before/after ratios, each side at its best guidance (and that guidance named)."""
    teacher = best_rows(results, [n for n in results if n.startswith("teacher")])
    student = best_rows(results, students)
    lines = []
    for s in (1, 2, 4):
        if s in teacher and s in student:
            (_, t), (sn, r) = teacher[s], student[s]
            x = t["fd_real"] / r["fd_real"]
            lines.append(f"{s}-step before/after, each at its best guidance: teacher (DDIM trailing) at guidance "
                         f"{t['guidance']:g} FD-real {t['fd_real']:.1f}, {sn} at guidance {r['guidance']:g} "
                         f"{r['fd_real']:.1f}: " + (f"{x:.2f}× lower" if x >= 1 else f"{1 / x:.2f}× higher"))
    return lines


def report_teacher(args, w: Path, dtk: list, evals: dict, times: dict, own_guidance: float) -> None:
    """--teacher-only: the teacher rows at every --teacher-guidance, with its best guidance per step count."""
    results = run_evals(args, w, dtk, evals, times)
    for unused in ("images", "pairs", "guidance", "train_steps", "phased_steps", "long_steps", "continue_steps",
                   "batch_size", "lr"):  # the saved command names only what these rows depend on
        setattr(args, unused, None)
    teacher25 = next((r for r in results["teacher"]["rows"] if r["steps"] == 25), None)
    rows = []
    for name, res in results.items():
        for r in res["rows"]:
            ratio = f"{r['fd_real'] / teacher25['fd_real']:.2f}" if teacher25 else "—"
            rows.append(f"| {name} | {r['steps']} | {r['guidance']:g} | {r['fd_real']:.1f} | {ratio} | "
                        f"{r['fd_teacher']:.1f} | {r['accuracy']:.3f} |")
    best = best_rows(results, list(results))
    noise_floor = next(iter(results.values()))["noise_floor"]
    took = ", ".join(f"{k}: {v / 60:.1f} min" for k, v in times.items() if v)
    guidances = ", ".join(f"{g:g}" for g in sorted({r["guidance"] for x in results.values() for r in x["rows"]}))
    lines = [
        f"demo teacher, shapes-v1 benchmark ({args.num_images} images per row; FD noise floor {noise_floor:.1f}); "
        f"DDIM trailing at guidance {guidances} "
        f"(its own: {own_guidance:g}; FD-teacher against its own 25-step DPM-Solver++ samples at guidance "
        f"{own_guidance:g}, as in reflow.md)" + (f"; eval wall time {took}" if took else ""),
        f"machine: {machine()} (this script's process; each `dtk eval` picks its own thread count, fewer "
        "when other work keeps CPUs busy, and says so on stderr)",
        "",
        "| model | steps | guidance | FD-real | ÷ teacher 25-step (own guidance) | FD-teacher | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "best guidance per step count (lowest FD-real): "
        + "; ".join(f"{s} step{'s' if s > 1 else ''}: {r['guidance']:g} ({r['fd_real']:.1f})"
                    for s, (_, r) in sorted(best.items())),
    ]
    report("reflow-teacher-guidance", "Rectified Diffusion benchmark: the teacher at each guidance", args, lines)


if __name__ == "__main__":
    main()
