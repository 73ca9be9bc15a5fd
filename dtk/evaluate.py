"""``dtk eval``: quality per number of steps, for one or more models, on a fixed benchmark.

The shapes benchmark (``shapes-v1``): held-out captions of the demo grammar
with fixed seeds. For every model and step count it samples the same
captions with the same seeds and measures:

* ``accuracy``    — the demo classifier's attribute accuracy (the shapes reward);
* ``fd_real``     — Fréchet distance of classifier features to real procedural
                    images of the same captions (the FID analogue);
* ``fd_teacher``  — the same against the teacher's 25-step samples (with its own
                    recommended sampler and guidance) of the same captions and
                    seeds (the PCM paper's "FID-SD");
* ``consistency`` — mean feature cosine to the same model's samples at the
                    largest step count (PCM's 1-step vs 16-step measure);
* ``win_rate``    — with ``--baseline``: fraction of images whose reward beats
                    the baseline's image for the same caption/seed/steps (ties ½).

``noise_floor`` is the FD between two independent real renderings of the
same captions: the value a perfect generator would get, against which every
other FD is to be read.

The shape-classes benchmark (``shape-classes-v1``) does the same for
class-conditional pixel-space models (``demo-pixel`` and models tuned from it):
the shape names as labels, single-shape real images, accuracy = shape correct.
It is chosen when the teacher (default: ``demo-pixel`` for pixel models) is one.

The prompts benchmark (``--prompts FILE``, for real SD/SDXL models) uses CLIP
image features (``--clip-model``, from disk or the local hub cache) for the
Fréchet distances (``fd_real`` needs ``--real-dir``) and the CLIP score as
reward.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dtk.errors import BadInput

log = logging.getLogger("dtk")

SHAPES_BENCHMARK = "shapes-v1"
SHAPE_CLASSES_BENCHMARK = "shape-classes-v1"   # class-conditional pixel models (demo-pixel)
BENCHMARK_SEED = 20261122  # versioned with the benchmark name: change both or neither
TEACHER_STEPS = 25
GRID_COLUMNS = 8


@dataclass
class Benchmark:
    name: str
    captions: list[str]
    seeds: list[int]
    features: Callable            # PIL images -> [N, D] tensor
    reward: Callable              # (PIL images, captions) -> list[float]
    reward_name: str
    real_features: torch.Tensor | None = None
    noise_floor: float | None = None
    teacher: str | None = None    # the teacher model's spec (filled in by run_eval)


def shapes_benchmark(num_images: int, device) -> Benchmark:
    import numpy as np

    from dtk.demo import shapes
    from dtk.demo.classifier import features
    from dtk.eval.rewards import ShapesReward, images_to_tensor
    from dtk.seeds import derive_seed

    _, captions, attrs = shapes.make_split(num_images, seed=BENCHMARK_SEED, split="heldout")
    reward = ShapesReward(device)

    def featurize(images):
        return features(reward.model, images_to_tensor(images))

    def render(seed):  # the same captions, independently jittered renderings
        rng = np.random.default_rng(seed)
        return [shapes.render(a, rng=rng) for a in attrs]

    real = featurize(render(BENCHMARK_SEED + 1))
    from dtk.eval.metrics import fd

    return Benchmark(
        name=SHAPES_BENCHMARK, captions=captions,
        seeds=[derive_seed(BENCHMARK_SEED, i) for i in range(num_images)],
        features=featurize, reward=lambda ims, caps: [s["shapes"] for s in reward(ims, caps)],
        reward_name="accuracy", real_features=real,
        noise_floor=fd(real, featurize(render(BENCHMARK_SEED + 2))),
    )


def shape_classes_benchmark(teacher_ref, num_images: int, device) -> Benchmark:
    """Class-conditional pixel models (the pixel demo's layout): the labels are the shapes, balanced;
    real images are single shapes of those classes; features and reward (shape correct) from the demo
    classifier, on images upsampled to its 64×64."""
    import numpy as np

    from dtk.demo import pixel
    from dtk.demo.classifier import features
    from dtk.eval.metrics import fd
    from dtk.eval.rewards import ShapesReward, images_to_tensor
    from dtk.seeds import derive_seed

    if teacher_ref.manifest.get("classes") != pixel.CLASSES:
        raise BadInput(f"--teacher {teacher_ref.spec}: pixel-space models are evaluated on the shapes classes "
                       f"{pixel.CLASSES} (as demo-pixel); it names {teacher_ref.manifest.get('classes')}")
    labels = [i % len(pixel.CLASSES) for i in range(num_images)]
    reward = ShapesReward(device)

    def as_tensor(images):
        x = images_to_tensor(images)
        return torch.nn.functional.interpolate(x, size=64, mode="bilinear", align_corners=False)

    def featurize(images):
        return features(reward.model, as_tensor(images))

    def correct(images, captions, batch=256):
        pred = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = as_tensor(images[i:i + batch]).to(next(reward.model.parameters()).device)
                pred += reward.model(x)["shape1"].argmax(1).tolist()
        return [float(pixel.CLASSES[p] == c) for p, c in zip(pred, captions)]

    def real(seed):
        from PIL import Image

        return [Image.fromarray(a) for a in pixel.render_classes(np.array(labels), seed)]

    real_features = featurize(real(BENCHMARK_SEED + 1))
    return Benchmark(name=SHAPE_CLASSES_BENCHMARK, captions=[pixel.CLASSES[c] for c in labels],
                     seeds=[derive_seed(BENCHMARK_SEED, i) for i in range(num_images)], features=featurize,
                     reward=correct, reward_name="accuracy", real_features=real_features,
                     noise_floor=fd(real_features, featurize(real(BENCHMARK_SEED + 2))))


def prompts_benchmark(prompts: list[str], num_images: int, clip_model: str, real_dir: str | None,
                      device) -> Benchmark:
    from dtk.eval.rewards import ClipReward
    from dtk.seeds import derive_seed

    clip = ClipReward("clip", clip_model, device, option="--clip-model")
    captions = [prompts[i % len(prompts)] for i in range(num_images)]

    def featurize(images, batch=32):
        return torch.cat([clip.clip.embed(images[i:i + batch])[0].float().cpu() for i in range(0, len(images), batch)])

    real = None
    if real_dir:
        files = sorted(p for p in Path(real_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if len(files) < 2:
            raise BadInput(f"--real-dir {real_dir}: needs at least 2 images")
        from PIL import Image, UnidentifiedImageError

        def load(path):
            try:
                with Image.open(path) as im:
                    return im.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise BadInput(f"--real-dir {path}: not a readable image ({' '.join(str(e).split())})") from None

        real = featurize([load(p) for p in files])
    return Benchmark(name="prompts", captions=captions, seeds=[derive_seed(BENCHMARK_SEED, i) for i in range(num_images)],
                     features=featurize, reward=lambda ims, caps: [  # in --batch-size-like chunks, as the features
                         s["clip"] for i in range(0, len(ims), 32) for s in clip(ims[i:i + 32], caps[i:i + 32])],
                     reward_name="clip_score", real_features=real)


@dataclass
class EvalOptions:
    models: list[str]
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25])
    out: str | None = None   # None: a new folder eval, eval-2, ... per run
    num_images: int = 1000
    teacher: str | None = None
    baseline: str | None = None
    scheduler: str | None = None
    guidance: float | None = None
    prompts: str | None = None
    real_dir: str | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    format: str = "jsonl"
    overwrite: bool = False


def label_of(spec: str | None) -> str:
    return "demo" if spec in (None, "", "demo") else Path(spec).name or spec


def _sample_set(model, bench: Benchmark, steps: int, scheduler, guidance, batch_size: int, progress) -> list:
    from PIL import Image

    from dtk.diffusion.sampling import Request, generate, settings_for, to_uint8

    settings = settings_for(model, scheduler=scheduler, steps=steps, guidance=guidance)
    images = []
    for start in range(0, len(bench.captions), batch_size):
        reqs = [Request(c, s) for c, s in zip(bench.captions[start:start + batch_size], bench.seeds[start:start + batch_size])]
        images += [Image.fromarray(a) for a in to_uint8(generate(model, settings, reqs))]
        progress.update(len(reqs))
    return images, settings


def _check_memory(opts: EvalOptions, steps: list[int], refs: list, device, dtype) -> None:
    """Refuse, before any model loads, an evaluation whose images cannot fit in memory: a model's images at
    every step count are kept until its row is measured (beside the teacher's), and one --batch-size batch of
    them is generated at once (estimates as ``dtk.sample``'s, from the models' configs)."""
    from dtk.resources import check_fits
    from dtk.diffusion.loading import model_configs, native_size
    from dtk.resources import image_bytes

    sizes = []
    for ref in refs:
        configs = model_configs(ref)
        if configs is not None:
            sizes.append((native_size(configs[0], configs[1]), configs))
    if not sizes:
        return
    side, (unet, vae, _) = max(sizes, key=lambda s: s[0])
    held = opts.num_images * (len(steps) + 1) * (side * side * 3 + 1024)   # PIL images: pixels and object
    check_fits(f"--num-images {opts.num_images}: {opts.num_images * (len(steps) + 1)} {side}x{side} images kept at "
               f"once ({len(steps)} step count(s) of a model, and the teacher's)", held)
    batch = min(opts.batch_size, opts.num_images)
    image, host = image_bytes(unet, vae, side, side, dtype)
    what = f"--batch-size {opts.batch_size}: a batch of {batch} {side}x{side} images"
    if device.type == "cuda":
        check_fits(what, batch * image, device)
        check_fits(what, held + batch * host)
    else:
        check_fits(what, held + batch * (image + host))


def run_eval(opts: EvalOptions, on_record=None) -> list[dict]:
    from dtk.device import resolve_device, resolve_dtype
    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import guide_for, resolve_model
    from dtk.eval.metrics import fd, mean_cosine
    from dtk.io import prepare_out_dir
    from dtk.logs import progress_enabled
    from dtk.progress import Progress

    if not opts.models:
        raise BadInput("no model: give --model (repeatable)")
    steps = sorted(set(opts.steps))
    labels = [label_of(m) for m in opts.models]
    if len(set(labels)) != len(labels):
        raise BadInput(f"--model: two models share the name {labels}; give distinct directories")
    refs = [resolve_model(m) for m in opts.models]  # fail fast on a bad model before any sampling
    inputs = [("--model", d) for r in refs for d in [r.path, *r.dirs]] + \
        [("--teacher", opts.teacher), ("--baseline", opts.baseline), ("--prompts", opts.prompts),
         ("--real-dir", opts.real_dir)]
    out = None if opts.out is None else prepare_out_dir(opts.out, overwrite=opts.overwrite, inputs=inputs)
    teacher = opts.teacher
    if teacher is None and opts.prompts:   # your own prompts, your own models: the first one's base (or itself)
        teacher = refs[0].manifest.get("base_model") or opts.models[0]
        log.info("eval: FD-teacher against %s's %d-step samples (--teacher to choose another)", teacher,
                 TEACHER_STEPS)
    teacher_ref = resolve_model(teacher or ("demo-pixel" if refs[0].family == "pixel" else None))
    if any(r.family != teacher_ref.family for r in refs) and not opts.prompts:
        raise BadInput(f"--model: {', '.join(r.spec for r in refs if r.family != teacher_ref.family)} is not a "
                       f"{teacher_ref.family} model like the teacher {teacher_ref.spec}; evaluate each kind apart")
    baseline_ref = resolve_model(opts.baseline) if opts.baseline else None
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    _check_memory(opts, steps, [teacher_ref, *refs, *([baseline_ref] if baseline_ref else [])], device, dtype)
    if opts.prompts:
        from dtk.data.prompts import read_prompts

        bench = prompts_benchmark([p.prompt for p in read_prompts((), opts.prompts)], opts.num_images,
                                  opts.clip_model, opts.real_dir, device)
    elif teacher_ref.family == "pixel":
        bench = shape_classes_benchmark(teacher_ref, opts.num_images, device)
    else:
        bench = shapes_benchmark(opts.num_images, device)
    bench.teacher = teacher_ref.spec
    if bench.noise_floor is not None:
        log.info("eval: %s, %d images; FD noise floor (two real sets) %.3f", bench.name, opts.num_images, bench.noise_floor)

    n_sets = len(refs) * len(steps) + 1 + (len(steps) if baseline_ref else 0)
    rows, grids = [], {}
    with Progress(n_sets * opts.num_images, "eval", unit="img", enabled=progress_enabled()) as bar:
        teacher = open_model(teacher_ref, device, dtype)
        # the reference is the teacher as it is meant to be used: its own sampler and guidance, 25 steps
        teacher_images, _ = _sample_set(teacher, bench, TEACHER_STEPS, None, None, opts.batch_size, bar)
        teacher_features = bench.features(teacher_images)
        del teacher
        baseline_rewards = {}
        guide = guide_for(opts.scheduler)
        if baseline_ref:
            baseline = open_model(baseline_ref, device, dtype, guide=guide)
            for s in steps:
                ims, _ = _sample_set(baseline, bench, s, opts.scheduler, opts.guidance, opts.batch_size, bar)
                baseline_rewards[s] = bench.reward(ims, bench.captions)
            del baseline
        for label, ref in zip(labels, refs):
            model = open_model(ref, device, dtype, guide=guide)
            per_steps = {}
            for s in steps:
                images, settings = _sample_set(model, bench, s, opts.scheduler, opts.guidance, opts.batch_size, bar)
                per_steps[s] = (images, bench.features(images), bench.reward(images, bench.captions), settings)
            top = per_steps[steps[-1]][1]
            for s in steps:
                images, feats, rewards, settings = per_steps[s]
                row = {"model": label, "spec": ref.spec, "steps": s, "scheduler": settings.scheduler,
                       "timesteps": settings.timesteps, "guidance": settings.guidance,
                       bench.reward_name: sum(rewards) / len(rewards),
                       "fd_real": fd(feats, bench.real_features) if bench.real_features is not None else None,
                       "fd_teacher": fd(feats, teacher_features),
                       "consistency": mean_cosine(feats, top)}
                if baseline_ref:
                    b = baseline_rewards[s]
                    row["win_rate"] = sum((x > y) + 0.5 * (x == y) for x, y in zip(rewards, b)) / len(b)
                rows.append(row)
            grids[label] = [per_steps[s][0][:GRID_COLUMNS] for s in steps]
            del model
    if out is None:   # no --out: a new folder, never the previous run's
        from dtk.io import fresh_out_dir

        out = fresh_out_dir("eval")
        opts.out = str(out)
        log.info("eval: writing to %s/", out)
    _write_outputs(out, opts, bench, rows, grids, steps)
    if opts.format == "md":
        print(markdown_table(rows, bench))
    else:
        for row in rows:
            if on_record is not None:
                on_record(row)
    return rows


COLUMNS = [("model", "model", "{}"), ("steps", "steps", "{}"), ("accuracy", "accuracy", "{:.3f}"),
           ("clip_score", "CLIP score", "{:.2f}"), ("fd_real", "FD-real", "{:.2f}"),
           ("fd_teacher", "FD-teacher", "{:.2f}"), ("consistency", "consistency", "{:.3f}"),
           ("win_rate", "win rate", "{:.3f}")]


def _columns(rows):
    return [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def markdown_table(rows: list[dict], bench: Benchmark) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" if i < 1 else "---:" for i, _ in enumerate(cols)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols) + " |")
    if bench.noise_floor is not None:
        lines.append(f"\nFD noise floor (two real renderings of the same {len(bench.captions)} captions): {bench.noise_floor:.2f}")
    return "\n".join(lines)


def _write_outputs(out: Path, opts: EvalOptions, bench: Benchmark, rows, grids, steps) -> None:
    from dataclasses import asdict

    from dtk.io import Replacing, atomic_write, run_record, write_json

    with Replacing(out, overwrite=opts.overwrite):   # everything is measured: only now is a replaced result set aside
        table = markdown_table(rows, bench)
        if opts.format != "md":   # with --format md the table is on stdout already
            _print_rich_table(rows, bench)
        files = ["eval.json", "eval.md", "plot.png"]
        write_json(out / "eval.json", {"benchmark": bench.name, "num_images": len(bench.captions),
                                       "noise_floor": bench.noise_floor, "teacher": label_of(bench.teacher),
                                       "teacher_steps": TEACHER_STEPS, "rows": rows})
        with atomic_write(out / "eval.md", "w") as f:
            f.write(table + "\n")
        plot(out / "plot.png", rows, bench)
        for label, per_steps in grids.items():
            name = f"grid-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
            _write_grid(out / name, per_steps, steps)
            files.append(name)
        write_json(out / "dtk.json", run_record("eval", asdict(opts), benchmark=bench.name, files=files))


def _print_rich_table(rows, bench: Benchmark) -> None:
    from rich.console import Console
    from rich.table import Table

    from dtk.logs import progress_enabled

    if not progress_enabled():
        return
    cols = _columns(rows)
    table = Table(title=f"dtk eval — {bench.name}, {len(bench.captions)} images"
                  + (f", FD noise floor {bench.noise_floor:.2f}" if bench.noise_floor is not None else ""))
    for _, title, _ in cols:
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in rows:
        table.add_row(*["—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols])
    Console(stderr=True).print(table)


def plot(path: Path, rows: list[dict], bench: Benchmark) -> None:
    """Quality vs steps, one line per model, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.io import atomic_write

    metrics = [(k, t) for k, t, _ in _columns(rows) if k not in ("model", "steps", "consistency", "win_rate")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["steps"], r[key]) for r in rows if r["model"] == model and r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        if key == "fd_real" and bench.noise_floor is not None:
            ax.axhline(bench.noise_floor, color="gray", linestyle="--", linewidth=1, label="noise floor")
            ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["steps"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{bench.name}: quality vs steps")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _write_grid(path: Path, per_steps: list[list], steps: list[int]) -> None:
    """Rows: step counts (fewest first); columns: the first benchmark captions."""
    from PIL import Image, ImageDraw

    from dtk.io import atomic_write

    w, h = per_steps[0][0].size
    margin = 28
    sheet = Image.new("RGB", (margin + GRID_COLUMNS * w, len(per_steps) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (images, s) in enumerate(zip(per_steps, steps)):
        draw.text((2, r * h + h // 2 - 5), str(s), fill="black")
        for c, im in enumerate(images):
            sheet.paste(im, (margin + c * w, r * h))
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")
