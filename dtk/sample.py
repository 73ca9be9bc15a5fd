"""``dtk sample`` as a library call: prompts in, PNGs + JSON Lines out."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dtk.data.prompts import NO_PROMPTS, PromptItem
from dtk.errors import BadInput
from dtk.io import write_grid
from dtk.seeds import same_shard_layout, shard_suffix

log = logging.getLogger("dtk")

@dataclass
class SampleOptions:
    prompts: list[PromptItem]
    model: str | None = None
    model_config: str | None = None
    out: str | None = None   # None: a new folder samples, samples-2, ... per run
    from_classes: bool = False   # the prompts came from --class (a class-conditional pixel model's labels)
    num_per_prompt: int = 1
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    guidance_rule: str = "cfg"   # "scfg": S-CFG (dtk.diffusion.scfg)
    scheduler: str | None = None
    timesteps: list[int] | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    guide_with: str | None = None
    npo: str | None = None
    npo_scale: float = 1.0
    seed: int = 0
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    dtype: str = "auto"
    grid: bool = False
    overwrite: bool = False


class RequestPlan:
    """Every image of the whole run by global index, each made when it is asked for: a shard of a run of a
    billion images holds its own few, never the whole list (which every shard would build, to pick from)."""

    def __init__(self, opts: SampleOptions, indices: range | None = None):
        self.opts = opts
        self.indices = range(len(opts.prompts) * opts.num_per_prompt) if indices is None else indices

    def shard(self, shard: tuple[int, int]) -> "RequestPlan":
        """The images shard ``I/N`` makes: every N-th, from I (as ``dtk.seeds.shard_indices``)."""
        i, n = shard
        return RequestPlan(self.opts, self.indices[i::n])

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return (self.request(index) for index in self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.request(index) for index in self.indices[i]]
        return self.request(self.indices[i])

    def request(self, index: int):
        from dtk.diffusion.sampling import Request
        from dtk.seeds import derive_seed

        opts = self.opts
        p, k = divmod(index, opts.num_per_prompt)
        item = opts.prompts[p]
        # A seed given with the prompt is used as is (k-th image: seed + k), so a
        # manifest line fed back in reproduces its image.
        seed = item.seed + k if item.seed is not None else derive_seed(opts.seed, index)
        neg = item.negative_prompt if item.negative_prompt is not None else opts.negative_prompt
        return Request(prompt=item.prompt, seed=seed, negative_prompt=neg, meta={"index": index})


def plan_requests(opts: SampleOptions) -> RequestPlan:
    """Every image of the whole run, by global index; seeds independent of sharding."""
    return RequestPlan(opts)


# One image's manifest record (about 600 bytes measured), kept until samples.jsonl is written.
RECORD_BYTES = 1024


def check_memory(opts: SampleOptions, unet: dict, vae: dict | None, height: int, width: int, device, dtype,
                 images: int, weights: int = 0) -> None:
    """Refuse, in one line naming the option to change and before any work, a run whose manifest, or one
    image, or one batch cannot fit in the memory available (``dtk.resources.check_fits``): ``unet``/``vae``
    are the models' configs, ``images`` this process's count, ``weights`` the bytes on disk of weights not
    loaded yet (fp32, or already this dtype: then fewer are needed)."""
    import torch

    from dtk.resources import check_fits, image_bytes

    per = torch.finfo(dtype).bits // 8
    image, host = image_bytes(unet, vae, height, width, dtype)
    prompt = max((len(p.prompt) + len(p.negative_prompt or opts.negative_prompt) for p in opts.prompts), default=0)
    records = images * (RECORD_BYTES + prompt)
    loading = weights * per // 4
    gpu = device.type == "cuda"
    check_fits(f"--num-per-prompt {opts.num_per_prompt}: {images} images in this process, their manifest records "
               "(split the run with --shard I/N)", records)
    batch = max(1, min(opts.batch_size, images))
    for n, what in ((1, f"--height {height} --width {width}: one {width}x{height} image"),
                    (batch, f"--batch-size {opts.batch_size}: a batch of {batch} {width}x{height} images")):
        if n == 1 or batch > 1:
            if gpu:
                check_fits(what, n * image + loading, device)
            check_fits(what, records + n * host + (0 if gpu else n * image + loading))
    if opts.grid and images:   # the contact sheet, made whole at the end (as _finish lays it out)
        cols = opts.num_per_prompt if opts.num_per_prompt > 1 else math.ceil(math.sqrt(images))
        sheet = cols * -(-images // cols) * height * width * 3
        check_fits(f"--grid: a contact sheet of {images} {width}x{height} images", records + sheet)


def run_sample(opts: SampleOptions, on_record=None) -> list[dict]:
    """Generate the images ``opts`` asks for; returns their records, each also passed to ``on_record`` as soon as
    its image is written (the CLI prints it: one JSON line per image)."""
    from dtk.device import resolve_device, resolve_dtype
    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import (check_size, guide_for, model_configs, native_size, resolve_model,
                                       vae_factor_of)
    from dtk.diffusion.sampling import settings_for
    from dtk.io import Replacing, prepare_out_dir

    model_spec = opts.model
    if model_spec is None and opts.npo:  # the NPO model dir names the base it was made for
        from dtk.diffusion.npo import npo_model_dir

        model_spec = npo_model_dir(opts.npo)[0].manifest.get("base_model")
    for name, value in (("--guidance", opts.guidance), ("--npo-scale", opts.npo_scale)):
        if value is not None and not math.isfinite(value):
            raise BadInput(f"{name} {value}: must be a finite number")
    ref = resolve_model(model_spec)
    # the arguments first: a refused --out must not hide a missing LoRA or prompt
    from dtk.diffusion.lora import check_lora_files

    check_lora_files(opts.loras)
    if ref.family != "pixel":
        if opts.from_classes:
            raise BadInput(f"--class: {ref.spec} is a text-to-image model, not a class-conditional one; give the "
                           "text as a prompt")
        if not opts.prompts:
            raise BadInput(NO_PROMPTS)
    suffix = shard_suffix(opts.shard)
    marker = f"dtk{suffix}.json"
    out = None
    if opts.out is None and opts.shard[1] > 1:
        raise BadInput(f"shard {opts.shard[0]}/{opts.shard[1]}: a sharded run needs --out, the one folder that "
                       "every shard writes into")
    lock = f".dtk{suffix}.lock"   # one writer per shard: the shards of one run write side by side
    if opts.out is not None:
        inputs = [("--model", d) for d in [ref.path, *ref.dirs]] + [("--lora", p) for p, _ in opts.loras] + \
            [("--npo", opts.npo), ("--guide-with", opts.guide_with)]
        out = prepare_out_dir(opts.out, overwrite=opts.overwrite, marker=marker, inputs=inputs, lock=lock)
        other = [m.name for m in sorted(out.glob("dtk*.json"))
                 if m.name != marker and not same_shard_layout(m.name, suffix)]
        if other:   # images of one numbering, two layouts: shards would overwrite another run's files piecemeal
            raise BadInput(f"--out {out}: holds a result made with another --shard layout ({other[0]}); remove it "
                           "or choose another directory")

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    check_size(vae_factor_of(ref), opts.height, opts.width)  # before loading any weights
    i, n = opts.shard   # this process's images, counted (never listed: a typo'd count must not fill memory)
    images = max(0, (max(1, len(opts.prompts)) * opts.num_per_prompt - i + n - 1) // n)
    configs = model_configs(ref)
    if configs is not None:   # what one batch will take, from the configs: before loading any weights
        unet_config, vae_config, weights = configs
        size = native_size(unet_config, vae_config)
        check_memory(opts, unet_config, vae_config, opts.height or size, opts.width or size, device, dtype, images,
                     weights)
    model = open_model(ref, device, dtype, opts.model_config, extra_loras=opts.loras,
                       guide=guide_for(opts.scheduler, opts.guide_with), npo=opts.npo, npo_scale=opts.npo_scale)
    if not opts.prompts:
        if model.family != "pixel" or model.unet.config.get("num_class_embeds"):
            raise BadInput(NO_PROMPTS + (" or --class" if model.family == "pixel" else ""))
        opts.prompts = [PromptItem("")]  # an unconditional model: --num-per-prompt images of nothing in particular
    settings = settings_for(model, scheduler=opts.scheduler, steps=opts.steps, timesteps=opts.timesteps,
                            guidance=opts.guidance, height=opts.height, width=opts.width,
                            guidance_rule=opts.guidance_rule)
    if model.family == "pixel":   # the class names and the size, before the first image is written
        from dtk.diffusion.conditioning import class_labels

        class_labels(model, sorted({p.prompt for p in opts.prompts}))
        factor = 2 ** (len(model.unet.config.get("block_out_channels", [0])) - 1)
        check_size(factor, settings.height, settings.width)
    if configs is None:   # a single-file checkpoint: its configs came with its weights
        check_memory(opts, dict(model.unet.config), dict(model.vae.config) if model.vae is not None else None,
                     settings.height, settings.width, device, dtype, images)
    if opts.npo and settings.scheduler == "consistency":
        raise BadInput(f"--npo {opts.npo}: the consistency sampler has no CFG branch for NPO to replace "
                       "(it guides with --guide-with); use a diffusion scheduler")
    if opts.npo and settings.guidance <= 1.0:
        raise BadInput(f"--npo {opts.npo}: NPO replaces the unconditional branch of CFG; it needs --guidance > 1 "
                       f"(this run: {settings.guidance:g})")
    if settings.guidance <= 1.0 and (opts.negative_prompt or any(p.negative_prompt for p in opts.prompts)):
        log.warning("sample: guidance %.2f ≤ 1 runs the conditional branch only; negative prompts have no effect",
                    settings.guidance)

    all_requests = plan_requests(opts)
    mine = all_requests.shard(opts.shard)
    if out is None:   # no --out: a new folder, never the previous run's
        from dtk.io import fresh_out_dir

        out = fresh_out_dir("samples")
        opts.out = str(out)
    log.info("sample: %d image%s%s with %s, %s %d step%s, guidance %.2f, %dx%d on %s, into %s/",
             len(mine), "" if len(mine) == 1 else "s",
             f" (shard {opts.shard[0]}/{opts.shard[1]} of {len(all_requests)})" if opts.shard[1] > 1 else "",
             ref.spec, settings.scheduler, settings.steps, "" if settings.steps == 1 else "s", settings.guidance,
             settings.width, settings.height, device, out)
    with Replacing(out, marker, lock=lock, overwrite=opts.overwrite):   # everything is accepted: only now is a replaced result set aside
        records = _generate_and_write(model, settings, mine, opts, out, on_record)
        _finish(out, marker, suffix, opts, ref, settings, records, len(all_requests))
    return records


def _generate_and_write(model, settings, requests, opts: SampleOptions, out: Path, on_record=None) -> list[dict]:
    from PIL import Image

    from dtk.diffusion.sampling import generate, to_uint8
    from dtk.logs import progress_enabled
    from dtk.progress import Progress

    records = []
    with Progress(len(requests), "sample", unit="img", enabled=progress_enabled()) as bar:
        for start in range(0, len(requests), opts.batch_size):
            batch = requests[start:start + opts.batch_size]
            images = to_uint8(generate(model, settings, batch))
            for req, arr in zip(batch, images):
                record = {
                    "path": str(out / f"{req.meta['index']:06d}.png"),
                    "index": req.meta["index"],
                    "prompt": req.prompt,
                    "negative_prompt": req.negative_prompt,
                    "seed": req.seed,
                    "steps": settings.steps,
                    "guidance": settings.guidance,
                    "scheduler": settings.scheduler,
                    "timesteps": settings.timesteps,
                    "width": settings.width,
                    "height": settings.height,
                    "model": model.ref.spec,
                    "loras": [[str(p), s] for p, s in opts.loras],
                    **({"guide": model.guide.ref.spec} if model.guide is not None else {}),
                    **({"npo": opts.npo, "npo_scale": opts.npo_scale} if model.npo is not None else {}),
                    **({"guidance_rule": settings.guidance_rule} if settings.guidance_rule != "cfg" else {}),
                }
                write_png(Path(record["path"]), Image.fromarray(arr), record)
                if on_record is not None:
                    on_record(record)
                records.append(record)
            bar.update(len(batch))
    return records


def write_png(path: Path, image, record: dict) -> None:
    """A PNG carrying its generation parameters (A1111-style ``parameters`` + a ``dtk`` JSON chunk)."""
    from PIL.PngImagePlugin import PngInfo

    from dtk.io import atomic_write

    info = PngInfo()
    params = record["prompt"]
    if record["negative_prompt"]:
        params += f"\nNegative prompt: {record['negative_prompt']}"
    params += (f"\nSteps: {record['steps']}, Sampler: {record['scheduler']}, CFG scale: {record['guidance']}, "
               f"Seed: {record['seed']}, Size: {record['width']}x{record['height']}, Model: {record['model']}")
    info.add_text("parameters", params)
    info.add_text("dtk", json.dumps({k: v for k, v in record.items() if k != "path"}))
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)


def _finish(out: Path, marker: str, suffix: str, opts, ref, settings, records, total: int) -> None:
    from dtk.io import run_record, write_json, write_jsonl

    files = [Path(r["path"]).name for r in records] + [f"samples{suffix}.jsonl"]
    if opts.grid and records:
        from PIL import Image

        cols = opts.num_per_prompt if opts.num_per_prompt > 1 else math.ceil(math.sqrt(len(records)))
        write_grid(out / f"grid{suffix}.png", [Image.open(r["path"]) for r in records], cols)
        files.append(f"grid{suffix}.png")
    write_jsonl(out / f"samples{suffix}.jsonl", records)
    # the guidance rule is recorded when it is not plain CFG: a default run's records stay as they were
    args = {k: v for k, v in asdict(opts).items() if k != "prompts" and (k != "guidance_rule" or v != "cfg")}
    sampler = {k: v for k, v in asdict(settings).items() if k != "guidance_rule" or v != "cfg"}
    write_json(out / marker, run_record(
        "sample", args, model=ref.spec, sampler=sampler, total_images=total,
        shard=list(opts.shard), files=files, manifest=f"samples{suffix}.jsonl",
    ))
