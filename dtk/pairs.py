"""``dtk reflow-pairs``: noise → sample pairs from a teacher ODE, in safetensors shards.

Rectified Diffusion (Wang et al., ICLR 2025) retrains a model on matched
pairs (z, x₀): z the initial latent noise, x₀ the latent the teacher's ODE
solver reaches from it. Pair ``i`` uses prompt ``i mod P`` and noise from
``(seed, i)``, so any sharding gives the same pairs.

Layout of an output directory::

    pairs-000000.safetensors   pairs [0, S), S = --pairs-per-shard
    pairs-000001.safetensors   pairs [S, 2S) ...
    dtk.json                   (dtk.shard-I-of-N.json per process of a sharded run)

A shard holds ``noise`` and ``latent`` [n, C, h, w] (latents already scaled by
the VAE factor), ``index`` [n] and for SDXL ``time_ids`` [n, 6]; its metadata
holds the prompts and the generation settings. Shards are written whole
(atomic rename) in a fixed batch layout, so a shard's bytes do not depend on
how the work was split; a re-run with the same arguments skips finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dtk.data.pairs import SHARD_GLOB, read_shard_meta, shard_name
from dtk.diffusion.probe import model_probe, probes_match
from dtk.errors import BadInput

log = logging.getLogger("dtk")

# --solver → dtk sampler, always with trailing timestep spacing (whatever the
# model's scheduler config says): the ODE starts at t = T − 1, so the stored
# noise is the x_T that training puts at the top of the schedule.
SOLVERS = {"dpm-solver": "dpm-solver", "ddim": "ddim-trailing", "euler": "euler"}
SPACING = {"timestep_spacing": "trailing"}


# ---------------------------------------------------------------------------
# Generation


@dataclass
class PairOptions:
    prompts: list                       # dtk.data.prompts.PromptItem
    model: str | None = None
    model_config: str | None = None
    out: str = "pairs"
    num: int | None = None              # default: one pair per prompt
    solver: str = "dpm-solver"
    steps: int = 25
    guidance: float = 5.0
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 8
    pairs_per_shard: int = 256
    height: int | None = None
    width: int | None = None
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False


def _settings_record(opts: PairOptions, model, settings, num: int, prompts_hash: str, timesteps: list[int]) -> dict:
    """What makes the pairs what they are: equal records ⇔ interchangeable shards."""
    return {"model": model.ref.spec, "family": model.family, "solver": opts.solver, "scheduler": settings.scheduler,
            "steps": settings.steps, "timesteps": timesteps, "guidance": settings.guidance,
            "negative_prompt": opts.negative_prompt,
            "seed": opts.seed, "num": num, "pairs_per_shard": opts.pairs_per_shard,
            "height": settings.height, "width": settings.width,
            "latent_shape": [model.unet.config.in_channels, settings.height // model.vae_scale_factor,
                             settings.width // model.vae_scale_factor],
            "prompts_sha256": prompts_hash}


def run_pairs(opts: PairOptions, on_record=None) -> list[dict]:
    from dtk.device import resolve_device, resolve_dtype
    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import check_size, resolve_model, vae_factor_of
    from dtk.diffusion.sampling import SamplerSettings
    from dtk.io import Replacing, check_out_apart, lock_out, recover_set_aside, release_out, run_record, write_json
    from dtk.logs import progress_enabled
    from dtk.progress import Progress
    from dtk.seeds import shard_indices, shard_suffix

    if opts.solver not in SOLVERS:
        raise BadInput(f"--solver {opts.solver}: unknown (choose from {', '.join(SOLVERS)})")
    num = opts.num if opts.num is not None else len(opts.prompts)
    if num < 1:
        raise BadInput(f"--num {num}: need at least one pair")
    ref = resolve_model(opts.model)
    check_size(vae_factor_of(ref), opts.height, opts.width)
    out = Path(opts.out)
    if not str(opts.out).strip():
        raise BadInput("--out '': empty (an unset shell variable?); name the output directory")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    check_out_apart(out, [("--model", d) for d in [ref.path, *ref.dirs]])
    suffix = shard_suffix(opts.shard)
    lock = f".dtk{suffix}.lock"   # one writer per shard: the tasks of one Slurm array write side by side
    if lock_out(out, lock, create=False):   # another run writing here now: refused before the model loads
        try:
            recover_set_aside(out, f"dtk{suffix}.json")
        finally:
            release_out(out, lock)
    _refuse_other_results(out, opts.overwrite)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    _check_memory(opts, ref, device, dtype, num)   # before the model loads
    model = open_model(ref, device, dtype, opts.model_config)
    for m in (model.unet, model.vae, model.pipe.text_encoder):
        m.eval()
    size = model.default_size
    settings = SamplerSettings(scheduler=SOLVERS[opts.solver], steps=opts.steps, guidance=opts.guidance,
                               height=opts.height or size, width=opts.width or size)
    from dtk.diffusion.schedulers import make_sampler

    pipe = model.pipe
    pipe.scheduler = pipe.scheduler.from_config({**pipe.scheduler.config, **SPACING})
    timesteps = [int(t) for t in make_sampler(settings.scheduler, pipe.scheduler.config, settings.steps, None,
                                               device).timesteps]
    prompts_hash = hashlib.sha256(json.dumps([[p.prompt, p.negative_prompt, p.seed] for p in opts.prompts])
                                  .encode()).hexdigest()
    record = _settings_record(opts, model, settings, num, prompts_hash, timesteps)
    record["probe"] = model_probe(model)
    chunks = math.ceil(num / opts.pairs_per_shard)
    mine = shard_indices(chunks, opts.shard)
    replaced = _check_existing(out, record, opts.overwrite, mine, suffix, chunks)
    todo = [c for c in mine if not (out / shard_name(c)).exists() or replaced]
    if len(todo) < len(mine):
        log.info("reflow-pairs: %d of %d shard(s) already finished, skipped", len(mine) - len(todo), len(mine))
    total = sum(min(num, (c + 1) * opts.pairs_per_shard) - c * opts.pairs_per_shard for c in todo)
    log.info("reflow-pairs: %d pair(s) in %d shard(s)%s with %s, %s %d steps, guidance %.2f, %dx%d on %s",
             total, len(todo), f" (shard {opts.shard[0]}/{opts.shard[1]})" if opts.shard[1] > 1 else "",
             ref.spec, opts.solver, settings.steps, settings.guidance, settings.width, settings.height, device)
    written = []
    # --overwrite: the old pairs are set aside, and come back if this run stops before it is done
    with Replacing(out, f"dtk{suffix}.json", names=tuple(replaced), lock=lock) if replaced else \
            _locked(out, lock, opts.overwrite), Progress(total, "reflow-pairs", unit="pair", enabled=progress_enabled()) as bar:
        for chunk in mine:
            path = out / shard_name(chunk)
            first, last = chunk * opts.pairs_per_shard, min(num, (chunk + 1) * opts.pairs_per_shard)
            if chunk in todo:
                _write_shard(path, model, settings, opts, range(first, last), record, bar)
            line = {"path": str(path), "shard": chunk, "first_index": first, "pairs": last - first}
            if on_record is not None:
                on_record(line)
            written.append(line)
        args = {k: v for k, v in asdict(opts).items() if k != "prompts"}
        write_json(out / f"dtk{suffix}.json", run_record(
            "reflow-pairs", args, kind="pairs", settings=record, shards=chunks, shard=list(opts.shard),
            files=[Path(w["path"]).name for w in written]))
    return written


def _check_memory(opts: PairOptions, ref, device, dtype, num: int) -> None:
    """Refuse, in one line naming the option, a run whose list of shards, or one shard's tensors (held until
    the shard is written), or one UNet batch cannot fit in the memory available (``dtk.resources.check_fits``;
    estimates as ``dtk.sample.check_memory``'s, from the model's configs: nothing for a single file)."""
    import torch

    from dtk.resources import check_fits
    from dtk.diffusion.loading import model_configs, native_size

    chunks = -(-num // opts.pairs_per_shard)
    i, n = opts.shard
    mine = max(0, -(-(chunks - i) // n))
    check_fits(f"--num {num}: {mine} shard(s) of --pairs-per-shard {opts.pairs_per_shard} in this process, their "
               "records", mine * 1024)
    configs = model_configs(ref)
    if configs is None:
        return
    unet, vae, weights = configs
    size = native_size(unet, vae)
    height, width = opts.height or size, opts.width or size
    factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1) if vae else 1
    latent = (height // factor) * (width // factor)
    per = torch.finfo(dtype).bits // 8
    pairs = min(opts.pairs_per_shard, num)
    # noise and latent per pair, in batches, joined, then serialised: three copies at the end
    held = pairs * 2 * unet.get("in_channels", 4) * latent * per * 3
    layers = unet.get("layers_per_block", 2)
    layers = max(layers) if isinstance(layers, (list, tuple)) else int(layers)
    batch = min(opts.batch_size, pairs)
    unet_bytes = batch * 2 * (unet.get("block_out_channels") or [320])[0] * latent * per * (3 + layers)
    loading = weights * per // 4
    what = f"--pairs-per-shard {opts.pairs_per_shard}: a shard of {pairs} {width}x{height} pairs, held until written"
    if device.type == "cuda":
        check_fits(what, held)
        check_fits(f"--batch-size {opts.batch_size} --height {height} --width {width}: a batch of {batch}",
                   unet_bytes + loading, device)
    else:
        check_fits(what, held + loading)
        check_fits(f"--batch-size {opts.batch_size} --height {height} --width {width}: a batch of {batch}",
                   held + unet_bytes + loading)


@contextlib.contextmanager
def _locked(out: Path, lock: str, overwrite: bool):
    """This run's shards written under the output's lock (``dtk.io.lock_out``)."""
    from dtk.io import lock_out, release_out

    took = lock_out(out, lock, command="reflow-pairs")
    try:
        _refuse_other_results(out, overwrite)   # again: another command may have finished here meanwhile
        yield
    finally:
        if took:
            release_out(out, lock)


def _refuse_other_results(out: Path, overwrite: bool) -> None:
    """A finished result of another command (a model, samples) is never written into without --overwrite."""
    for marker in sorted(out.glob("dtk*.json")) if out.is_dir() else []:
        try:
            command = json.loads(marker.read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            command = None
        if command != "reflow-pairs" and not overwrite:
            raise BadInput(f"--out {out}: holds a finished {command or 'unknown'} result ({marker.name}); pass "
                           "--overwrite to replace it or choose another directory")


def _check_existing(out: Path, record: dict, overwrite: bool, mine: list[int], suffix: str, chunks: int) -> list[str]:
    """Shards already in ``out`` must come from the same settings. With --overwrite, the names of what the new
    run replaces (to be set aside, not deleted: ``Replacing``): this task's own shards (the other tasks of a
    Slurm array replace theirs) and, from every task, those beyond the new run's range and the records of
    another task count or of another command: nothing of the old run is left to mix with the new one."""
    from dtk.seeds import same_shard_layout

    existing = sorted(out.glob(SHARD_GLOB)) if out.is_dir() else []
    if overwrite:
        names = [shard_name(c) for c in mine if (out / shard_name(c)).exists()]
        for path in existing:
            number = path.name[len("pairs-"):-len(".safetensors")]
            if not number.isdigit() or int(number) >= chunks:
                names.append(path.name)
        for marker in sorted(out.glob("dtk*.json")) if out.is_dir() else []:   # ours, and any split another way
            if marker.name == f"dtk{suffix}.json" or not same_shard_layout(marker.name, suffix):
                names.append(marker.name)
        return names
    if not existing:
        return []
    theirs = read_shard_meta(existing[0])["settings"]
    diff = [k for k in record if k not in ("probe", "model") and theirs.get(k) != record[k]]
    if not probes_match(theirs.get("probe", []), record["probe"]):
        diff.insert(0, "model")
    if diff:
        raise BadInput(f"--out {out}: holds pairs made with other settings ({', '.join(diff)}); "
                       "pass --overwrite to replace them or choose another directory")
    return []


def _write_shard(path: Path, model, settings, opts: PairOptions, indices: range, record: dict, bar) -> None:
    import torch

    from dtk.diffusion.conditioning import encode_prompts
    from dtk.diffusion.sampling import Request, denoise, initial_noise
    from dtk.io import save_safetensors
    from dtk.seeds import derive_seed

    requests = []
    for i in indices:
        item = opts.prompts[i % len(opts.prompts)]
        cycle = i // len(opts.prompts)
        seed = item.seed + cycle if item.seed is not None else derive_seed(opts.seed, i)
        neg = item.negative_prompt if item.negative_prompt is not None else opts.negative_prompt
        requests.append(Request(prompt=item.prompt, seed=seed, negative_prompt=neg, meta={"index": i}))
    noise, latents, time_ids = [], [], []
    for start in range(0, len(requests), opts.batch_size):
        batch = requests[start:start + opts.batch_size]
        z, _ = initial_noise(model, [r.seed for r in batch], settings.height, settings.width)
        noise.append(z.cpu())
        latents.append(denoise(model, settings, batch, noise=z).cpu())
        if model.family == "sdxl":
            time_ids.append(encode_prompts(model, [""] * len(batch), settings.height, settings.width).time_ids.cpu())
        bar.update(len(batch))
    tensors = {"noise": torch.cat(noise), "latent": torch.cat(latents),
               "index": torch.tensor(list(indices), dtype=torch.int64)}
    if time_ids:
        tensors["time_ids"] = torch.cat(time_ids)
    if not torch.isfinite(tensors["latent"].float()).all():
        from dtk.errors import RunFailure

        raise RunFailure(f"{path.name}: the teacher produced non-finite latents (try --dtype fp32 or bf16)")
    # one metadata key: safetensors keeps metadata in a hash map, and one key keeps the bytes reproducible
    meta = {"dtk.pairs": json.dumps({"settings": record, "prompts": [r.prompt for r in requests],
                                     "seeds": [r.seed for r in requests]})}
    save_safetensors(path, tensors, meta)


# ---------------------------------------------------------------------------
# Reading
