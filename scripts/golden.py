#!/usr/bin/env python3
"""Golden outputs: what today's code produces, so that a refactor (issue #24) can prove it changed nothing.

    python scripts/golden.py record --out benchmarks/results/golden.json --work /tmp/golden     # ~6 min, 2 CPUs
    python scripts/golden.py check --against benchmarks/results/golden.json --work /tmp/golden2  # ~6 min

Both run one plan of real `dtk` processes (`dtk --threads 1 CMD --device cpu`, fixed seeds, DTK_* variables
cleared, paths relative to WORK) and hash what they write: `dtk sample` with several schedulers, guidance 1
and >1, a negative prompt, LoRAs, --npo, the tiny SD/SDXL test models and every trained model; a 20-step run
(batch 2) of every training command; reflow pairs; `dtk score`; `dtk eval --num-images 16 --steps 1,4`.
Recorded: PNGs: sha256 of the file and of the decoded pixels; safetensors: sha256 of the tensors' names,
dtypes, shapes and bytes, with max|w|, Σw and Σ|w|; numbers (final losses, scores, eval metrics) as they are.

`check` prints what differs and exits 1. Differences of at most 1e-6 × max(1, |x|) are "same up to float
order", listed apart and exit 0 (1 with --strict); weights are judged by max|Δw| against the recorded run's
files when its WORK still holds them, else by Δmax|w| and ΔΣw; pixels by at most one level. --rev REV runs
the code of a git revision (`git archive` into WORK/src) rather than the installed tree (the record was made
with --rev HEAD: the commit is in it); --only NAME runs the steps named so (with what they need) and
compares only their items.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a large yellow star at the top on a white background", "a large red triangle on a gray background",
           "a small red circle on the right on a gray background",
           "a large purple square at the bottom on a black background"]
TOL = 1e-6


@dataclass
class Step:
    name: str          # also its output directory in WORK
    argv: list         # a dtk command (CMD ARGS...), ["python", MODULE, ARGS...] or ["build", TINY_MODEL]
    collect: str = ""  # what is recorded: png | tensors | train | score | eval | "" (nothing)
    needs: tuple = ()  # steps to run first, besides those whose outputs argv names


def dtk(cmd, *args, out=None):
    return [cmd, "--device", "cpu", *(["--out", out] if out else []), *args]


def train(name, cmd, *args):
    return Step(name, dtk(cmd, "--max-steps", "20", "--batch-size", "2", "--seed", "0", *args, out=name), "train")


def sample(name, *args, prompts=PROMPTS[:2], steps="8"):
    return Step(name, dtk("sample", *(["--steps", steps] if steps else []), *args, *prompts, out=name), "png")


def plan() -> list[Step]:
    return [
        Step("data/shapes", ["python", "dtk.demo.shapes", "--out", "data/shapes", "--num", "16"]),
        Step("data/pixel", ["python", "dtk.demo.pixel", "--out", "data/pixel", "--num", "16"]),
        Step("data/tiny-sd", ["build", "tiny-sd"], "tensors"),
        Step("data/tiny-sdxl", ["build", "tiny-sdxl"], "tensors"),
        Step("data/tiny-lora", ["build", "tiny-lora"], "tensors", needs=("data/tiny-sd",)),
        Step("reflow-pairs", dtk("reflow-pairs", "--num", "8", "--steps", "8", "--batch-size", "4", *PROMPTS[:2],
                                 out="reflow-pairs"), "tensors"),
        sample("prefs-images", "--num-per-prompt", "2", prompts=PROMPTS),
        Step("score", dtk("score", "--data", "prefs-images/samples.jsonl", "--out", "score/scored.jsonl",
                          "--pairs-out", "score/pairs.parquet"), "score"),
        train("train-reflow", "train-reflow", "--data", "reflow-pairs"),
        train("train-reflow-phased", "train-reflow", "--phased", "4", "--data", "data/shapes"),
        train("distill-pcm", "distill-pcm", "--data", "data/shapes"),
        train("distill-pcm-adv", "distill-pcm", "--adversarial", "--data", "data/shapes"),
        train("distill-lcm", "distill-pcm", "--method", "lcm", "--data", "data/shapes"),
        train("tune-sct", "tune-sct", "--model", "demo-pixel", "--full", "--bank-size", "8", "--data", "data/pixel"),
        train("tune-ect", "tune-sct", "--model", "demo-pixel", "--full", "--target", "ect", "--data", "data/pixel"),
        train("dpo", "dpo", "--data", "score/pairs.parquet"),
        train("dpo-tiny-sdxl", "dpo", "--model", "data/tiny-sdxl", "--data", "score/pairs.parquet"),
        train("train-npo", "train-npo", "--from-pairs", "--data", "score/pairs.parquet"),
        train("train-npo-self", "train-npo", "--self", "--data", "data/shapes"),
        sample("sample/dpm++2m"),
        sample("sample/ddim", "--scheduler", "ddim"),
        sample("sample/euler", "--scheduler", "euler"),
        sample("sample/guidance-1", "--guidance", "1"),
        sample("sample/negative", "--guidance", "4", "--negative-prompt", "a small blue circle"),
        sample("sample/lora", "--lora", "train-reflow:0.8"),
        sample("sample/npo", "--npo", "train-npo"),
        sample("sample/npo-self", "--npo", "train-npo-self", "--npo-scale", "0.5"),
        sample("sample/tiny-sd-lora", "--model", "data/tiny-sd", "--lora", "data/tiny-lora", steps="4"),
        sample("sample/tiny-sdxl", "--model", "data/tiny-sdxl", "--guidance", "3", steps="4"),
        *[sample(f"sample/from-{m}", "--model", m, steps="") for m in    # each model's own sampler
          ("train-reflow", "train-reflow-phased", "distill-pcm", "distill-pcm-adv", "distill-lcm", "dpo")],
        sample("sample/from-distill-lcm-2", "--model", "distill-lcm", steps="2"),
        *[sample(f"sample/from-{m}", "--model", m, "--class", "0", "--class", "star", steps="", prompts=[])
          for m in ("tune-sct", "tune-ect")],
        Step("eval", dtk("eval", "--model", "demo", "--model", "distill-pcm", "--num-images", "16", "--steps", "1,4",
                         out="eval"), "eval"),
    ]


def cmdline(s: Step) -> list:
    if s.argv[0] == "build":
        return ["tests/tiny_models.py", s.argv[1]]  # built in this process
    return ["python", "-m", *(s.argv[1:] if s.argv[0] == "python" else ["dtk", "--threads", "1", *s.argv])]


def build(what: str, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny_models import build_tiny_pipeline, make_tiny_lora

    torch.set_num_threads(1)
    if what == "tiny-lora":
        make_tiny_lora(work / "data/tiny-sd", work / "data/tiny-lora")
    else:
        build_tiny_pipeline(what, work / "data" / what)


# --------------------------------------------------------------------------------------------- what is recorded
def png_item(path: Path) -> dict:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"))
    pixels = hashlib.sha256(repr(px.shape).encode() + px.tobytes()).hexdigest()
    return {"kind": "png", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "pixels": pixels,
            "pixel_sum": int(px.sum(dtype=np.int64))}


def tensors_item(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    h, tensors = hashlib.sha256(), sorted(load_file(str(path)).items())
    for key, t in tensors:
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    w = torch.cat([t.double().reshape(-1) for _, t in tensors] + [torch.zeros(1, dtype=torch.float64)])
    return {"kind": "tensors", "sha256": h.hexdigest(), "tensors": len(tensors), "numel": w.numel() - 1,
            "max_abs": w.abs().max().item(), "sum": w.sum().item(), "abs_sum": w.abs().sum().item()}


def collect(step: Step, work: Path) -> dict:
    out, items = work / step.name, {}

    def add(path: Path, item: dict) -> None:
        items[str(path.relative_to(work))] = {**item, "step": step.name}

    def number(path: Path, value) -> None:
        add(path, {"kind": "number", "value": value})

    if step.collect in ("png", "eval"):
        for p in sorted(out.glob("*.png")):
            if p.name != "plot.png":         # matplotlib's bytes, not dtk's
                add(p, png_item(p))
    if step.collect in ("tensors", "train"):
        for p in sorted(out.rglob("*.safetensors")):
            if "checkpoints" not in p.relative_to(out).parts:
                add(p, tensors_item(p))
    if step.collect == "train":
        meta = json.loads((out / "dtk.json").read_text())
        number(out / "dtk.json:final_loss", meta["training"]["final"]["loss"])
        add(out / "dtk.json:sampler", {"kind": "json", "value": meta.get("sampler")})
    if step.collect == "score":
        import pyarrow.parquet as pq

        for row in map(json.loads, (out / "scored.jsonl").read_text().splitlines()):
            for k, v in sorted(row["scores"].items()):
                number(out / f"scored.jsonl:{row['path']}:{k}", v)
        labels = pq.read_table(out / "pairs.parquet").column("label_0").to_pylist()
        add(out / "pairs.parquet:label_0", {"kind": "json", "value": labels})
    if step.collect == "eval":
        ev = json.loads((out / "eval.json").read_text())
        number(out / "eval.json:noise_floor", ev["noise_floor"])
        for row in ev["rows"]:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "steps":
                    number(out / f"eval.json:{row['model']}:{row['steps']}:{k}", v)
    return items


# ------------------------------------------------------------------------------------------------------ running
def select(only: list[str]) -> list[Step]:
    """The steps named (all without --only) and those they need, in the plan's order."""
    steps = {s.name: s for s in plan()}
    chosen, todo = set(), [n for n in steps if not only or any(n.startswith(o) for o in only)]
    while todo:                     # what a step needs: its `needs` and the steps whose outputs its argv names
        chosen.add(n := todo.pop())
        todo += [*steps[n].needs, *(a.split(":")[0].rsplit("/", k)[0] for a in steps[n].argv[1:] for k in (0, 1))]
        todo = [t for t in todo if t in steps and t not in chosen]
    return [s for s in steps.values() if s.name in chosen]


def run_plan(work: Path, only: list[str], rev: str | None) -> tuple[dict, dict]:
    steps = select(only)
    if work.exists() and any(work.iterdir()) and not (work / ".golden").exists():
        sys.exit(f"--work {work}: not empty and not made by this script; give a new or empty directory")
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    (work / ".golden").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTK_")}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    if rev:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work / "src")], input=tar, check=True)
        env["PYTHONPATH"] = str(work / "src")
    items, seconds = {}, {}
    for s in steps:
        t0 = time.time()
        print(f"[{datetime.datetime.now():%H:%M:%S}] {s.name}", file=sys.stderr, flush=True)
        if s.argv[0] == "build":
            build(s.argv[1], work)
        else:
            argv = [sys.executable, *cmdline(s)[1:]]
            r = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode:
                sys.exit(f"{s.name} failed ({r.returncode}): {shlex.join(argv[1:])}\n{r.stderr[-3000:]}")
        items.update(collect(s, work))
        seconds[s.name] = round(time.time() - t0, 1)

    def out(*argv):
        return subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True).stdout.strip()

    code = out(sys.executable, "-c", "import dtk, torch, diffusers; print(dtk.__file__, torch.__version__, "
               "diffusers.__version__)")
    about = dict(zip(("dtk", "torch", "diffusers"), code.split()), work=str(work.resolve()),
                 commit=out("git", "-C", str(ROOT), "rev-parse", rev or "HEAD"),
                 dtk_edits=[] if rev else out("git", "-C", str(ROOT), "status", "--short", "dtk").splitlines(),
                 python=sys.version.split()[0], seconds=seconds, total_seconds=round(sum(seconds.values()), 1),
                 steps={s.name: shlex.join(cmdline(s)) for s in steps})
    return about, items


# ---------------------------------------------------------------------------------------------------- comparing
def compare(name: str, old: dict, new: dict | None, old_work: Path | None, new_work: Path) -> tuple[str, str]:
    """(same | float-order | DIFFERS | MISSING, detail) of one item."""
    kind, file = old["kind"], name.split(":")[0]
    if new is None:
        return "MISSING", "not produced"
    if kind in ("number", "json"):
        a, b = old["value"], new["value"]
        close = kind == "number" and abs(a - b) <= TOL * max(1.0, abs(a))
        return ("same", "") if a == b else ("float-order" if close else "DIFFERS", f"{a!r} → {b!r}")
    if old["sha256"] == new["sha256"]:
        return "same", ""
    there = old_work / file if old_work and (old_work / file).exists() else None
    if there and (png_item if kind == "png" else tensors_item)(there)["sha256"] != old["sha256"]:
        there = None                         # a later run's file in the recorded WORK
    if kind == "png":
        if old["pixels"] == new["pixels"]:
            return "DIFFERS", "same pixels, other PNG bytes (metadata)"
        if not there:
            return "DIFFERS", f"pixel sum {old['pixel_sum']} → {new['pixel_sum']}"
        import numpy as np
        from PIL import Image

        a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (there, new_work / file))
        d = int(np.abs(a - b).max()) if a.shape == b.shape else 255
        return ("float-order" if d <= 1 else "DIFFERS"), f"max |Δpixel| {d}"
    if (old["tensors"], old["numel"]) != (new["tensors"], new["numel"]):
        return "DIFFERS", f"{old['tensors']} tensors/{old['numel']} numbers → {new['tensors']}/{new['numel']}"
    tol = TOL * max(1.0, old["max_abs"])
    if there:
        from safetensors.torch import load_file

        a, b = load_file(str(there)), load_file(str(new_work / file))
        d = max(((a[k].double() - b[k].double()).abs().max().item() if k in b and a[k].shape == b[k].shape
                 else float("inf")) for k in a)
        return ("float-order" if d <= tol else "DIFFERS"), f"max |Δw| {d:.3g} (max |w| {old['max_abs']:.3g})"
    dmax, dsum = abs(old["max_abs"] - new["max_abs"]), abs(old["sum"] - new["sum"])
    close = dmax <= tol and dsum <= TOL * max(1.0, old["abs_sum"])
    return ("float-order" if close else "DIFFERS"), f"Δmax|w| {dmax:.3g}, ΔΣw {dsum:.3g} (max |Δw| ≥ Δmax|w|)"


def check(args) -> int:
    rec = json.loads(args.against.read_text())
    old_work = Path(rec["about"]["work"])
    old_work = old_work if old_work.is_dir() and old_work.resolve() != args.work.resolve() else None
    about, new = run_plan(args.work, args.only, args.rev)
    old = {k: v for k, v in rec["items"].items() if v["step"] in about["seconds"]}
    rows = [(n, *compare(n, o, new.get(n), old_work, args.work)) for n, o in old.items()]
    rows += [(n, "DIFFERS", "not in the record") for n in new if n not in old]
    counts = {s: sum(r[1] == s for r in rows) for s in ("same", "float-order", "DIFFERS", "MISSING")}
    width = max((len(r[0]) for r in rows), default=0)
    for status in ("DIFFERS", "MISSING", "float-order"):
        if counts[status]:
            print(f"\n{status} ({counts[status]}):")
            for n, _, detail in (r for r in rows if r[1] == status):
                print(f"  {n:<{width}}  {detail}")
    print(f"\n{len(rows)} items: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
          f" [{about['total_seconds']:.0f} s; weights and pixels compared "
          f"{f'with the recorded files in {old_work}' if old_work else 'by their statistics'}]")
    return 1 if counts["DIFFERS"] + counts["MISSING"] + (counts["float-order"] if args.strict else 0) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("record", help="run the plan and write the record")
    rec.add_argument("--out", type=Path, required=True)
    chk = sub.add_parser("check", help="run the plan again and compare with a record (exit 1 if anything differs)")
    chk.add_argument("--against", type=Path, required=True)
    chk.add_argument("--strict", action="store_true", help="exit 1 for float-order differences too")
    for p in (rec, chk):
        p.add_argument("--work", type=Path, required=True, help="scratch directory (emptied first)")
        p.add_argument("--only", action="append", default=[], help="steps whose name starts so (and their needs)")
        p.add_argument("--rev", help="run this git revision's dtk (git archive into WORK/src)")
    args = ap.parse_args()
    if args.mode == "check":
        return check(args)
    about, items = run_plan(args.work, args.only, args.rev)
    about["recorded"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"about": about, "items": items}, indent=1) + "\n")
    kinds = {k: sum(v["kind"] == k for v in items.values()) for k in ("png", "tensors", "number", "json")}
    print(f"{len(items)} items ({', '.join(f'{v} {k}' for k, v in kinds.items())}) in {about['total_seconds']:.0f} s "
          f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
