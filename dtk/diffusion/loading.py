"""Find and load a model from whatever ``--model`` names.

Accepted, in the order they are tried:
  * nothing / ``demo``      — the bundled demo model (offline, tiny);
    ``demo-pixel``            — the bundled class-conditional pixel-space demo;
  * a dtk output directory  — ``dtk.json`` with ``kind: model``: its base model
                              plus the LoRA / UNet weights it holds, and the
                              sampler it recommends;
  * a diffusers pipeline directory (``model_index.json``);
  * a single-file ``.safetensors`` checkpoint (original SD/SDXL layout);
  * a hub id (``org/name``), found in the local Hugging Face cache only —
    dtk never downloads at run time, so Slurm jobs and cron behave the same
    with and without network.

SD1.x/2.x (``sd``) and SDXL (``sdxl``) are both first-class; pixel-space
``UNet2DModel`` pipelines in the layout of diffusers' DDPM checkpoints
(``pixel``: unconditional or class-conditional, no VAE, no text) load too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtk.errors import BadInput
from dtk.hub import cached_snapshot, looks_like_hub_id

SD, SDXL, PIXEL = "sd", "sdxl", "pixel"


@dataclass
class ModelRef:
    """Where a model's pieces are; resolving one reads only small JSON files."""

    spec: str                       # what the user typed ("demo" for the default)
    path: Path                      # a diffusers pipeline dir, or a single file
    family: str                     # "sd", "sdxl" or "pixel"
    single_file: bool = False
    loras: list[tuple[Path, float]] = field(default_factory=list)
    unet_dir: Path | None = None    # full UNet weights replacing the base UNet
    # LoRAs whose UNet part is already in unet_dir (fused before training): applied to the text encoders only
    text_encoder_loras: list[tuple[Path, float]] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=dict)   # recommended settings
    manifest: dict[str, Any] = field(default_factory=dict)  # the dtk.json, if any
    dirs: list[Path] = field(default_factory=list)          # the model dirs it is built from, itself first


def resolve_model(spec: str | None, _within: tuple[Path, ...] = ()) -> ModelRef:
    if spec in (None, "", "demo"):
        from dtk.demo import DEMO_MODEL_DIR

        if not (DEMO_MODEL_DIR / "model_index.json").exists():
            raise BadInput(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; rebuild it with "
                           "`python -m dtk.demo.build` or pass --model")
        return _from_dir("demo", DEMO_MODEL_DIR)
    if spec == "demo-pixel":
        from dtk.demo import DEMO_PIXEL_DIR

        if not (DEMO_PIXEL_DIR / "model_index.json").exists():
            raise BadInput(f"the bundled pixel demo model is missing from {DEMO_PIXEL_DIR}; rebuild it with "
                           "`python -m dtk.demo.build --pixel`")
        return _from_dir("demo-pixel", DEMO_PIXEL_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_dir(spec, path, _within)
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise BadInput(f"--model {spec}: pickled checkpoints are not loaded (they can run code); "
                           "convert it to .safetensors first")
        if path.suffix != ".safetensors":
            raise BadInput(f"--model {spec}: expected a directory or a .safetensors file")
        return ModelRef(spec=spec, path=path, family=_single_file_family(path), single_file=True)
    if looks_like_hub_id(spec):
        return _from_dir(spec, cached_snapshot(spec))
    raise BadInput(f"--model {spec}: no such file or directory")


def _from_dir(spec: str, path: Path, within: tuple[Path, ...] = ()) -> ModelRef:
    if path.resolve() in within:
        raise BadInput(f"--model {within[0]}: its chain of base models comes back to {path} (a model trained "
                       "into its own base's folder?)")
    manifest_path = path / "dtk.json"
    manifest = {}
    if manifest_path.exists():
        from dtk.io import read_json

        manifest = read_json(manifest_path)
    has_pipeline = (path / "model_index.json").exists()
    if manifest and manifest.get("kind") != "model" and not has_pipeline:
        raise BadInput(f"--model {spec}: {manifest_path} describes a '{manifest.get('command', '?')}' output, not a model")
    if manifest:
        _check_manifest(manifest, manifest_path, spec)
    if manifest.get("base_model"):   # from any directory: a relative one is read from the model dir
        manifest["base_model"] = base_model_spec(manifest["base_model"], path, manifest_path, spec,
                                                 must_exist=not has_pipeline)   # else only a record
    consistency = (manifest.get("sampler") or {}).get("consistency") or {}
    if consistency.get("guide"):   # the guide a consistency model names, the same way (loaded when sampled)
        consistency["guide"] = base_model_spec(consistency["guide"], path, manifest_path, spec,
                                               "sampler.consistency.guide", must_exist=False)
    if has_pipeline:
        ref = ModelRef(spec=spec, path=path, family=_pipeline_family(path))
    elif manifest.get("base_model"):
        base = manifest["base_model"]
        try:
            ref = resolve_model(base, (*within, path.resolve()))
        except BadInput as e:   # named from the dtk.json that names it (a chain of models names each link)
            raise BadInput(f"--model {spec}: {manifest_path}: base_model {base}: "
                           f"{str(e).removeprefix(f'--model {base}: ')}") from None
        ref.spec = spec
    else:
        raise BadInput(f"--model {spec}: not a diffusers pipeline (no model_index.json) nor a dtk model dir (no dtk.json)")
    ref.dirs = [path.resolve(), *ref.dirs]
    inherited = {k: ref.manifest[k] for k in ("classes",) if k in ref.manifest}  # a tuned model keeps its labels
    ref.manifest = {**inherited, **manifest}
    ref.sampler = {**ref.sampler, **{k: v for k, v in (manifest.get("sampler") or {}).items() if v is not None}}
    if manifest.get("unet"):
        # a saved full UNet already holds its base model's LoRAs (fused before training); their text-encoder
        # parts were not saved with it, so they still apply there
        ref.text_encoder_loras, ref.loras = ref.text_encoder_loras + ref.loras, []
    for entry in manifest.get("loras") or []:
        lora_path = path / entry["path"]
        if not lora_path.exists():
            raise BadInput(f"--model {spec}: dtk.json names {lora_path}, which is missing")
        ref.loras.append((lora_path, float(entry.get("scale", 1.0))))
    if manifest.get("unet"):
        ref.unet_dir = path / manifest["unet"]
        if not ref.unet_dir.is_dir():
            raise BadInput(f"--model {spec}: dtk.json names UNet weights in {ref.unet_dir}, which is missing")
    return ref


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_consistency(value) -> bool:
    """σ_max, σ_min, σ_data, t_mid: numbers; boundaries: a list of numbers; guide: a model (a string)."""
    if not isinstance(value, dict):
        return False
    for key, x in value.items():
        if x is None:
            continue
        if key == "guide":
            ok = isinstance(x, str)
        elif key == "boundaries":
            ok = isinstance(x, list) and all(map(_is_number, x))
        else:
            ok = _is_number(x)
        if not ok:
            return False
    return True


# sampler fields a model dir may recommend: a check of each value (None: not given)
SAMPLER_FIELDS = {
    "scheduler": (lambda v: isinstance(v, str), "a scheduler name"),
    "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "guidance": (_is_number, "a number"),
    "timesteps": (_is_int_list, "a list of whole numbers"),
    "timesteps_for_steps": (lambda v: isinstance(v, dict) and all(_is_int_list(t) for t in v.values()),
                            "an object of step count → list of timesteps"),
    "consistency": (_is_consistency, "an object of numbers (sigma_max, t_mid, ...), boundaries and guide"),
    "schedule": (lambda v: isinstance(v, dict), "an object of scheduler config values"),
}


def _check_manifest(manifest: dict, manifest_path: Path, spec: str) -> None:
    """The fields of a model dir's dtk.json that loading reads, each of the type it must be: refused here, in
    one line naming the file and the field, rather than as a TypeError (or a wrong model) later."""
    def bad(field: str, value, want: str) -> BadInput:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "…"
        return BadInput(f"--model {spec}: {manifest_path}: '{field}' is {shown}, expected {want}")

    for key in ("base_model", "unet"):
        value = manifest.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise bad(key, value, "a path" + (" or hub id" if key == "base_model" else "") + " (a string)")
    loras = manifest.get("loras")
    if loras is not None:
        if not isinstance(loras, list):
            raise bad("loras", loras, 'a list of {"path": ..., "scale": ...} objects')
        for i, entry in enumerate(loras):
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]):
                raise bad(f"loras[{i}]", entry, 'an object with a "path" string')
            if "scale" in entry and not _is_number(entry["scale"]):
                raise bad(f"loras[{i}].scale", entry["scale"], "a finite number")
    sampler = manifest.get("sampler")
    if sampler is not None:
        if not isinstance(sampler, dict):
            raise bad("sampler", sampler, "an object of sampler settings (scheduler, steps, guidance, ...)")
        for key, (ok, want) in SAMPLER_FIELDS.items():
            if sampler.get(key) is not None and not ok(sampler[key]):
                raise bad(f"sampler.{key}", sampler[key], want)
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise bad("classes", classes, "a list of class names")


def base_model_spec(base: str, model_dir: Path, manifest_path: Path | None = None, spec: str | None = None,
                    field: str = "base_model", must_exist: bool = True) -> str:
    """A model dir's ``base_model`` as a spec that works from any directory. An absolute path, a hub id or a
    bundled name (``demo``) stays as written; a relative path is read from the model dir (so a folder of
    models can move as a whole). dtk wrote absolute paths before, so older dirs are unchanged; a relative one
    that exists only from the current directory (how earlier versions read it) still works, with a warning.
    One found nowhere is refused naming the file, unless not ``must_exist`` (then it stays as written)."""
    import logging
    import os

    if base in ("demo", "demo-pixel"):
        return base
    path = Path(base).expanduser()
    if path.is_absolute():
        return base
    beside = model_dir / path
    if beside.exists():
        return os.path.abspath(beside)
    where = f"--model {spec}: {manifest_path}" if manifest_path is not None else str(model_dir)
    if path.exists():
        logging.getLogger("dtk").warning("%s: %s %s is not in %s; read from the current directory, as earlier "
                                         "dtk did (write it relative to the model dir, or absolute)",
                                         where, field, base, model_dir)
        return os.path.abspath(path)
    if looks_like_hub_id(base) or not must_exist:
        return base
    raise BadInput(f"{where}: {field} {base}: no such directory (looked in {model_dir}, where a relative "
                   "path is read from)")


def _pipeline_family(path: Path) -> str:
    from dtk.io import read_json

    index = read_json(path / "model_index.json")
    name = index.get("_class_name", "pipeline")
    supported = "dtk loads SD/SDXL pipelines and pixel-space DDPM/DDIM pipelines for now"
    if "unet" not in index:   # SD3, Flux, CogVideoX, …: not an SD pipeline, whatever else it holds
        raise BadInput(f"--model {path}: {name} denoises with a transformer, not a UNet; {supported}")
    if "motion_adapter" in index or "Video" in name or "AnimateDiff" in name:
        raise BadInput(f"--model {path}: {name} is a video model; {supported}")
    if "XL" in name or "text_encoder_2" in index:
        return SDXL
    if "vae" not in index and "text_encoder" not in index:
        if index.get("_class_name") in ("DDPMPipeline", "DDIMPipeline"):
            return PIXEL  # a pixel-space UNet2DModel and its scheduler
        raise BadInput(f"--model {path}: a {index.get('_class_name', 'pipeline')} is not supported "
                       "(SD/SDXL pipelines and pixel-space DDPM/DDIM pipelines are)")
    return SD


def _single_file_family(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise BadInput(f"--model {path}: not a readable safetensors file ({e})") from None
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return SDXL
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return SD
    raise BadInput(f"--model {path}: not an SD/SDXL checkpoint (no model.diffusion_model.* weights); "
                   "LoRA files go to --lora")


# ---------------------------------------------------------------------------
# Loading weights


@dataclass
class LoadedModel:
    ref: ModelRef
    pipe: Any                 # a diffusers StableDiffusion(XL)/DDPM pipeline (never called directly)
    device: Any
    dtype: Any
    guide: "LoadedModel | None" = None   # a worse version of the model guiding its consistency sampling
    npo: Any = None                               # dtk.diffusion.npo.NPOBranch: the negative CFG branch

    @property
    def family(self) -> str:
        return self.ref.family

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return getattr(self.pipe, "vae", None)  # None: a pixel-space model

    @property
    def vae_scale_factor(self) -> int:
        vae = self.vae
        return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def classes(self) -> list[str] | None:
        """Class names of a class-conditional model (its dtk.json), if it names them."""
        return self.ref.manifest.get("classes")

    @property
    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.vae_scale_factor


def pipeline_class(family: str):
    from diffusers import DDPMPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {SDXL: StableDiffusionXLPipeline, PIXEL: DDPMPipeline}.get(family, StableDiffusionPipeline)


def load_model(ref: ModelRef, device, dtype, model_config: str | None = None) -> LoadedModel:
    """Load the pipeline's components on ``device`` in ``dtype``, offline."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dtk.logs import quiet_libraries

    quiet_libraries()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    cls = pipeline_class(ref.family)
    extra = {"safety_checker": None, "requires_safety_checker": False} if ref.family == SD else {}
    try:
        pipe = _from_files(cls, ref, dtype, model_config, extra)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - a broken model dir is bad input; say which
        hint = ""
        if ref.single_file and not model_config:
            hint = ("; a single-file checkpoint needs its architecture config: offline, pass --model-config "
                    "with a diffusers pipeline directory of the same architecture")
        raise BadInput(f"--model {ref.spec}: could not load ({type(e).__name__}: {_short(e)}){hint}") from None
    if ref.unet_dir is not None:  # the same class as the pipeline's own (UNet2DConditionModel, or UNet2DModel)
        try:
            pipe.unet = type(pipe.unet).from_pretrained(str(ref.unet_dir), torch_dtype=dtype, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - broken trained weights are bad input; say where
            raise BadInput(f"--model {ref.spec}: could not load its UNet from {ref.unet_dir} "
                           f"({type(e).__name__}: {_short(e)})") from None
    schedule = ref.sampler.get("schedule")
    if schedule:  # a model retrained under another noise schedule (e.g. train-reflow --beta-schedule)
        pipe.scheduler = pipe.scheduler.from_config({**pipe.scheduler.config, **schedule})
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(ref=ref, pipe=pipe, device=device, dtype=dtype)


def guide_for(scheduler: str | None, guide_with: str | None = None) -> str | bool | None:
    """``open_model``'s ``guide``: the one given; none for a chosen --scheduler other than the consistency
    sampler (the guide a consistency model records serves that sampler only); else the recorded one."""
    if guide_with is None and scheduler not in (None, "consistency"):
        return False
    return guide_with


def resolve_guide(spec: str, ref: ModelRef) -> ModelRef:
    """The guide of a consistency model (SCT: an earlier snapshot of itself): a model of the same shape."""
    from dtk.io import read_json

    try:
        guide = resolve_model(spec)
    except BadInput as e:
        raise BadInput(f"guide model: {e}") from None
    if guide.family != ref.family:
        raise BadInput(f"guide model {spec}: a {guide.family} model cannot guide the {ref.family} model {ref.spec}")
    configs = []
    for r in (ref, guide):
        config = (r.unet_dir or r.path / "unet") / "config.json"
        configs.append(read_json(config) if not r.single_file and config.exists() else {})
    for key in ("in_channels", "out_channels", "sample_size", "num_class_embeds"):
        if configs[0].get(key) != configs[1].get(key):
            raise BadInput(f"guide model {spec}: its UNet has {key} {configs[1].get(key)}, "
                           f"{ref.spec}'s has {configs[0].get(key)}")
    return guide


def vae_factor_of(ref: ModelRef) -> int | None:
    """The VAE's downsampling factor from its config alone (None when not readable without loading)."""
    from dtk.io import read_json

    config = ref.path / "vae" / "config.json"
    if ref.single_file or not config.exists():
        return None
    return 2 ** (len(read_json(config).get("block_out_channels", [0, 0, 0, 0])) - 1)


def check_size(factor: int | None, height: int | None, width: int | None) -> None:
    for name, v in (("--height", height), ("--width", width)):
        if factor and v is not None and v % factor:
            raise BadInput(f"{name} {v}: must be a multiple of {factor} for this model (its downsampling factor)")


def _from_files(cls, ref: ModelRef, dtype, model_config: str | None, extra: dict):
    import huggingface_hub.constants as hub

    # dtk never downloads at run time: diffusers' single-file loader would fetch a missing architecture
    # config despite local_files_only, so the hub is switched off for the load
    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        return _load_files(cls, ref, dtype, model_config, extra)
    finally:
        hub.HF_HUB_OFFLINE = offline


def _load_files(cls, ref: ModelRef, dtype, model_config: str | None, extra: dict):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch_dtype→dtype renames across diffusers versions
        if ref.single_file:
            kwargs = {"config": model_config} if model_config else {}
            return cls.from_single_file(str(ref.path), torch_dtype=dtype, local_files_only=True, **kwargs, **extra)
        return cls.from_pretrained(str(ref.path), torch_dtype=dtype, local_files_only=True, **extra)


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"


def native_size(unet: dict, vae: dict | None) -> int:
    """A model's native image size from its configs (as ``LoadedModel.default_size``)."""
    size = unet.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    return size * (2 ** (len(vae.get("block_out_channels") or [0]) - 1) if vae else 1)


def model_configs(ref) -> tuple[dict, dict | None, int] | None:
    """The UNet and VAE configs and the weights' bytes on disk of a model, read without loading it (None for
    a single-file checkpoint, whose configs come with its weights)."""
    from dtk.io import read_json

    if ref.single_file:
        return None
    unet_dir = ref.unet_dir or ref.path / "unet"
    if not (unet_dir / "config.json").is_file():
        return None
    vae = ref.path / "vae" / "config.json"
    weights = sum(f.stat().st_size for d in ("unet", "vae", "text_encoder", "text_encoder_2")
                  for f in ((ref.unet_dir if d == "unet" and ref.unet_dir else ref.path / d).glob("*.safetensors")))
    return read_json(unet_dir / "config.json"), read_json(vae) if vae.is_file() else None, weights
