#!/usr/bin/env python3
"""Benchmark: DPO, NPO (from pairs) and Self-NPO on the demo model, judged by the shapes reward.

    python benchmarks/dpo.py --work /tmp/dpo-bench [--steps 500] [--save]

Every step is a dtk command (printed before it runs):

1. two-shape training captions of the shapes grammar (where the demo is weakest), the
   base model's samples of them (`dtk sample --num-per-prompt 4`) and their preference pairs
   (`dtk score --pairs-out`, the shapes reward; ranked by its continuous shapes/confidence
   by default, since attribute accuracy ties for most pairs of one caption);
2. `dtk dpo`, `dtk train-npo --from-pairs` on those pairs, `dtk train-npo --self`
   on the captioned images (no labels), all LoRA with the same steps and batch;
3. every configuration samples the same held-out captions with the same seeds
   (`dtk sample`, `--npo` for the negative branch) and is scored (`dtk score`).

Reported: mean reward and win rate over the base (same caption and seed; ties ½)
for base, DPO, base+NPO, DPO+NPO and base+Self-NPO (its EMA teacher or its student as the
negative model), and the seed-to-seed noise
of the benchmark (the base model with other seeds). --save writes
benchmarks/results/dpo.md. Steps already done in --work are not redone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report, step  # noqa: E402


def write_two_shape_folder(out: Path, n: int, seed: int, split: str) -> None:
    """Images + captions of two shapes only (a training folder, and captions.txt as a prompt list)."""
    import numpy as np
    from PIL import Image

    from dtk.demo import shapes

    if (out / "captions.txt").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng, caps = np.random.default_rng(seed), []
    while len(caps) < n:
        attrs = shapes.sample_attributes(rng)
        if len(attrs["shapes"]) == 2 and shapes.is_heldout(attrs) == (split == "heldout"):
            Image.fromarray(np.asarray(shapes.render(attrs, rng=rng))).save(out / f"{len(caps):06d}.png")
            (out / f"{len(caps):06d}.txt").write_text(shapes.caption(attrs) + "\n")
            caps.append(shapes.caption(attrs))
    (out / "captions.txt").write_text("".join(c + "\n" for c in caps))


def scores_of(manifest: Path) -> list[dict]:
    """The ``scores`` of every line of a scored manifest."""
    return [json.loads(line)["scores"] for line in manifest.read_text().splitlines() if line.strip()]


def lora_cosine(a: Path, b: Path) -> float:
    """Cosine between the weight changes (B·A of every layer, concatenated) of two LoRA model dirs."""
    import torch
    from safetensors.torch import load_file

    def delta(d: Path) -> torch.Tensor:
        w = load_file(str(d / "pytorch_lora_weights.safetensors"))
        return torch.cat([(w[k.replace("lora_A", "lora_B")].flatten(1) @ w[k].flatten(1)).flatten()
                          for k in sorted(w) if "lora_A" in k])

    return float(torch.nn.functional.cosine_similarity(delta(a), delta(b), dim=0))


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of the mean of the per-image differences a − b (same caption and seed)."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return (sum((x - m) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5


def win_rate(a: list[float], b: list[float]) -> float:
    return sum((x > y) + 0.5 * (x == y) for x, y in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--prompts", type=int, default=300, help="training captions (4 samples each make the pairs)")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out captions of the evaluation")
    ap.add_argument("--eval-seed", type=int, default=4, help="seed that draws the held-out captions")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate of every run (the demo is tiny)")
    ap.add_argument("--beta", type=float, default=2500.0)
    ap.add_argument("--pair-by", default="shapes/confidence",
                    help="score that ranks the pairs: shapes (attribute accuracy; many ties) or shapes/confidence")
    ap.add_argument("--tie-margin", type=float, default=0.01, help="score differences up to this are ties")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    w = Path(args.work)
    # done steps are reused: only under the same training settings (pairs made otherwise would be reported as
    # these); another evaluation (--eval-prompts, --eval-seed) reuses the trained runs in its own folders
    settings = {k: getattr(args, k) for k in ("prompts", "steps", "batch_size", "lr", "beta", "pair_by",
                                               "tie_margin")}
    recorded = w / "settings.json"
    done = {k: v for k, v in json.loads(recorded.read_text()).items() if k in settings} if recorded.exists() else {}
    if (recorded.exists() and done != settings) or (not recorded.exists() and (w / "samples").exists()):
        sys.exit(f"dpo.py: {w} holds a run with other settings ({recorded}); use a fresh --work")
    w.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings))
    dtk = [sys.executable, "-m", "dtk"]
    times: dict = {}
    # two-shape captions: where the demo is weakest (shape2 accuracy ~0.84), so preferences have room to act
    write_two_shape_folder(w / "train", args.prompts, seed=3, split="train")
    evaluation = w / f"eval-{args.eval_prompts}-seed{args.eval_seed}"
    write_two_shape_folder(evaluation / "heldout", args.eval_prompts, seed=args.eval_seed, split="heldout")
    step([*dtk, "sample", "--prompts", w / "train" / "captions.txt", "--num-per-prompt", 4, "--batch-size", 16,
          "--out", w / "samples"], w / "samples" / "dtk.json", times, "samples")
    step([*dtk, "score", "--data", w / "samples" / "samples.jsonl", "--pair-by", args.pair_by, "--tie-margin",
          args.tie_margin, "--pairs-out", w / "pairs.parquet"],
         w / "pairs.parquet", times, "pairs")
    lora = ["--max-steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--lora-rank", 8,
            "--checkpoint-every", 250, "--log-every", 50, "--resume", "auto"]   # a stopped run goes on where it was
    step([*dtk, "dpo", "--data", w / "pairs.parquet", "--beta", args.beta, *lora, "--out", w / "dpo"],
         w / "dpo" / "dtk.json", times, "dpo")
    step([*dtk, "train-npo", "--from-pairs", "--data", w / "pairs.parquet", "--beta", args.beta, *lora,
          "--out", w / "npo"], w / "npo" / "dtk.json", times, "npo")
    # Self-NPO exporting its EMA teacher, and the same run exporting the student (the default, what the public
    # code saves; the papers do not say which)
    step([*dtk, "train-npo", "--self", "--negative", "ema", "--data", w / "train", *lora, "--out", w / "self-npo"],
         w / "self-npo" / "dtk.json", times, "self-npo")
    step([*dtk, "train-npo", "--self", "--negative", "student", "--data", w / "train", *lora,
          "--out", w / "self-npo-student"], w / "self-npo-student" / "dtk.json", times, "self-npo-student")
    # a stronger Self-NPO: teacher guidance −3 (−1 is the SD1.x default), 5× the lr, the student exported
    step([*dtk, "train-npo", "--self", "--negative", "student", "--teacher-guidance", -3, "--data", w / "train",
          *lora, "--lr", 5 * args.lr, "--out", w / "self-npo-strong"], w / "self-npo-strong" / "dtk.json", times,
         "self-npo-strong")

    configs = {"base": [], "base (other seeds)": ["--seed", 1], "DPO": ["--model", w / "dpo"],
               "base+NPO": ["--npo", w / "npo"], "DPO+NPO": ["--model", w / "dpo", "--npo", w / "npo"],
               "base+Self-NPO": ["--npo", w / "self-npo-student"],
               "base+Self-NPO (EMA teacher)": ["--npo", w / "self-npo"],
               "base+Self-NPO (student, w −3, 5× lr)": ["--npo", w / "self-npo-strong"]}
    scores, confidence = {}, {}
    for name, extra in configs.items():
        out = evaluation / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        step([*dtk, "sample", "--prompts", evaluation / "heldout" / "captions.txt", "--batch-size", 16, *extra,
              "--out", out], out / "dtk.json", times, f"sample-{name}")
        step([*dtk, "score", "--data", out / "samples.jsonl", "--out", out / "scored.jsonl"],
             out / "scored.jsonl", times, f"score-{name}")
        scored = scores_of(out / "scored.jsonl")
        scores[name] = [s["shapes"] for s in scored]
        confidence[name] = [s["shapes/confidence"] for s in scored]

    # the reward's ceiling: the held-out captions' own renders, scored like the samples
    renders = evaluation / "heldout" / "renders.jsonl"
    renders.write_text("".join(json.dumps({"path": str(png), "prompt": png.with_suffix(".txt").read_text().strip()})
                               + "\n" for png in sorted((evaluation / "heldout").glob("*.png"))))
    step([*dtk, "score", "--data", renders, "--out", evaluation / "heldout" / "scored.jsonl"],
         evaluation / "heldout" / "scored.jsonl", times, "score-renders")
    rendered = [s["shapes"] for s in scores_of(evaluation / "heldout" / "scored.jsonl")]

    base = scores["base"]
    mean = {name: sum(s) / len(s) for name, s in scores.items()}
    # the noise a margin must beat: the base model against itself with other seeds, or two standard errors
    # of a difference of two means over independent seeds, whichever is larger
    n = len(base)
    sd = (sum((x - mean["base"]) ** 2 for x in base) / max(1, n - 1)) ** 0.5
    noise = max(abs(mean["base (other seeds)"] - mean["base"]), 2 * sd * (2 / n) ** 0.5)
    rows = [f"| {name} | {mean[name]:.4f} | {mean[name] - mean['base']:+.4f} | {paired_se(s, base):.4f} | "
            f"{win_rate(s, base):.3f} | "
            f"{sum(confidence[name]) / n:.4f} | {win_rate(confidence[name], confidence['base']):.3f} |"
            for name, s in scores.items()]

    def verdict(a, b):
        margin = mean[a] - mean[b]
        return (f"{a} − {b} = {margin:+.4f} ({'met' if margin > noise else 'NOT met'}: noise {noise:.4f}; "
                f"paired standard error {paired_se(scores[a], scores[b]):.4f})")

    n_pairs = json.loads((w / "dpo" / "dtk.json").read_text())["data"]
    lines = [
        f"demo model; pairs: {args.prompts} two-shape training captions × 4 samples scored by the shapes reward, ranked by "
        f"{args.pair_by} (differences ≤ {args.tie_margin:g} are ties) → "
        f"{n_pairs['examples']} pairs ({n_pairs.get('ties_dropped', 0)} ties dropped); every run LoRA rank 8, "
        f"{args.steps} steps × batch {args.batch_size}, lr {args.lr:g}; DPO/NPO β {args.beta:g}; evaluation: "
        f"{args.eval_prompts} held-out two-shape captions, one image each, the same seeds for every configuration",
        f"machine: {machine()}",
        "",
        "| configuration | mean reward | vs base | paired SE | win rate vs base | mean confidence | "
        "confidence win rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "reward: the shapes reward (attribute accuracy, the fraction of the caption's attributes the demo "
        "classifier reads back); confidence: its shapes/confidence (the mean probability of the stated values); "
        f"the reward of the held-out captions' own renders, its ceiling here: {sum(rendered) / len(rendered):.4f}",
        f"seed-to-seed noise: {noise:.4f} in mean reward (the larger of |base − base with other seeds| and two "
        "standard errors of a difference of means over independent seeds); paired SE: the standard error of the "
        "per-image differences from the base (same caption and seed), for reference — the targets use the noise",
        "",
        f"cosine between the DPO and the NPO LoRA's weight changes: {lora_cosine(w / 'dpo', w / 'npo'):+.3f} "
        "(−1: NPO is DPO negated, so DPO+NPO's negative branch is close to the base model)",
        "",
        "targets (margins larger than the noise):",
        f"- DPO > base: {verdict('DPO', 'base')}",
        f"- DPO+NPO > DPO: {verdict('DPO+NPO', 'DPO')}",
        f"- Self-NPO > base: {verdict('base+Self-NPO', 'base')}; exporting the EMA teacher: "
        f"{verdict('base+Self-NPO (EMA teacher)', 'base')}; stronger: "
        f"{verdict('base+Self-NPO (student, w −3, 5× lr)', 'base')}",
    ]
    report("dpo", "DPO, NPO and Self-NPO on the demo model", args, lines)


if __name__ == "__main__":
    main()
