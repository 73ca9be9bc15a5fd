"""THE training loop: one engine for every training command.

A method (``dtk.methods.*``) says what is specific to its paper — how a batch
becomes a loss, what a frozen teacher is, which sampler the result wants —
and the engine owns everything else: model loading, LoRA or full
fine-tuning, accelerate (DDP, mixed precision), gradient accumulation and
clipping, the optimiser and LR schedule, EMA, data order, checkpoints and
exact resume, preemption, NaN guards, metrics, validation images and export.

Randomness: every random draw a method makes for an example comes from that
example's own generator, seeded from (seed, position of the example in the
data stream). Results therefore do not depend on the batch split across
processes or accumulation steps, and a resumed run draws what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtk.errors import BadInput, DtkError, RunFailure
from dtk.train.config import DEFAULT_LORA_TARGETS, EXIT_PREEMPTED, TrainConfig

log = logging.getLogger("dtk")


class Preempted(DtkError):
    """SIGTERM/SIGUSR1: a checkpoint was saved; a requeued job continues with --resume auto."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"


# ---------------------------------------------------------------------------
# What a method sees


class PerExample:
    """Random draws with one generator per example (see the module docstring)."""

    def __init__(self, seeds: list[int], device):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def rand(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """Integers in [low, high) per example; ``high`` may be a tensor of per-example bounds."""
        highs = high.tolist() if isinstance(high, torch.Tensor) else [high] * len(self)
        lows = low.tolist() if isinstance(low, torch.Tensor) else [low] * len(self)
        return torch.cat([torch.randint(int(lo), int(hi), (1,), generator=g)
                          for g, lo, hi in zip(self.generators, lows, highs)]).to(self.device)


@dataclass
class Run:
    """The state a method works with. ``unet`` is the trained UNet as the engine wraps it (DDP);
    ``raw_unet`` the same weights unwrapped, for passes without gradients."""

    config: TrainConfig
    model: Any                        # dtk.diffusion.loading.LoadedModel: frozen VAE / text encoders
    accelerator: Any
    data: Any
    unet: Any = None
    raw_unet: Any = None
    step: int = 0
    rng: PerExample | None = None
    abar: torch.Tensor | None = None  # ᾱ_t, float64, on the device
    weight_dtype: torch.dtype = torch.float32
    ema: Any = None                   # the EMA of the trained weights (--ema-decay; set after Method.setup)
    _prompt_cache: dict = field(default_factory=dict)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def prediction_type(self) -> str:
        return self.model.pipe.scheduler.config.get("prediction_type", "epsilon")

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (α_t, σ_t) as [B,1,1,1] float32; t = −1 means ᾱ = 1 (clean)."""
        abar = torch.where(t >= 0, self.abar[t.clamp(min=0)], torch.ones_like(self.abar[0]))
        view = (-1, 1, 1, 1)
        return abar.sqrt().float().view(view), (1 - abar).sqrt().float().view(view)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], height: int | None = None, width: int | None = None):
        """Conditioning for ``captions`` (frozen text encoders), cached per distinct caption."""
        from dtk.diffusion.conditioning import Conditioning, encode_prompts

        h, w = height or self.resolution, width or self.resolution
        distinct = [c for c in dict.fromkeys(captions) if (c, h, w) not in self._prompt_cache]
        if distinct:
            if len(self._prompt_cache) + len(distinct) > 4096:  # bounded: big caption sets are not cached whole
                self._prompt_cache.clear()
                distinct = list(dict.fromkeys(captions))
            cond = encode_prompts(self.model, distinct, h, w)
            for i, c in enumerate(distinct):
                self._prompt_cache[(c, h, w)] = Conditioning(
                    *(None if v is None else v[i:i + 1]
                      for v in (cond.embeds, cond.pooled, cond.time_ids, cond.class_labels)))
        return Conditioning.cat([self._prompt_cache[(c, h, w)] for c in captions])

    def latents(self, batch: dict) -> torch.Tensor:
        """The clean latents x₀ of a batch: encoded images, or the final latents of reflow pairs."""
        if "latent" in batch:
            return batch["latent"].to(self.device)
        return self.encode_images(batch["image"])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (the posterior mean, so the same image gives the same latent)."""
        vae = self.model.vae
        if vae is None:  # a pixel-space model learns the images themselves
            return images.to(self.device).float()
        with torch.autocast(self.device.type, enabled=False):  # the VAE runs in its own dtype (fp32 for SDXL)
            latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).float()

    @property
    def resolution(self) -> int:
        return self.config.resolution or self.model.default_size

    def predict(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """One UNet evaluation → its raw output (ε, v or x₀ as the model predicts)."""
        return unet(x_t, t, return_dict=False, **cond.unet_kwargs())[0].float()

    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        from dtk.diffusion.schedule import to_x0_eps

        alpha, sigma = self.alpha_sigma(t)
        return to_x0_eps(output, x_t, alpha, sigma, self.prediction_type)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model inside: with LoRA training, the trained adapter switched off."""
        if self.config.full:
            raise RuntimeError("adapters_disabled() needs LoRA training; full fine-tuning keeps a frozen copy")
        self.raw_unet.disable_adapters()
        try:
            yield self.raw_unet
        finally:
            self.raw_unet.enable_adapters()

    def frozen_copy(self):
        """A frozen copy of the UNet as it is now (call in ``Method.setup``, before training)."""
        import copy

        unet = copy.deepcopy(self.raw_unet).requires_grad_(False).eval()
        return unet.to(self.weight_dtype)


class Method:
    """What a paper contributes. Subclasses override ``loss`` and ``sampler``; the rest is optional."""

    name = "train"                    # the command, e.g. "train-reflow"
    data_kinds: tuple[str, ...] = ("images",)   # what --data may hold: "images", "pairs"
    data_hints: dict[str, str] = {}             # kind of data refused → what to do instead
    export_ema = True                 # with --ema-decay, the EMA weights are the result (else the trained ones)

    def open_data(self, spec: str, *, resolution: int, allow_missing_captions: bool = False):
        """``--data`` as a dataset (methods with their own formats, e.g. preference pairs, override this)."""
        from dtk.train.data import open_dataset

        return open_dataset(spec, resolution=resolution, allow_missing_captions=allow_missing_captions)

    def check_data(self, data, run: Run) -> None:
        """Reject data this method cannot use (BadInput naming what and where)."""

    def setup(self, run: Run) -> None:
        """Called once the model exists and before any step: build teachers, constants."""

    def loss(self, batch: dict, run: Run) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, run: Run) -> dict[str, float]:
        """Called after each optimizer step: a second player's update (e.g. a discriminator); its logs."""
        return {}

    def sampler(self, run: Run) -> dict:
        """The recommended way to sample the result (dtk.json ``sampler``)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """The method's settings, recorded in dtk.json."""
        return {}


# ---------------------------------------------------------------------------
# Pieces of the loop


class EMA:
    """Exponential moving average of the trained parameters (fp32 shadow copies)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the model for the duration (validation, export, a method's EMA teacher).

        Autocast caches its half-precision casts of trainable weights until the region ends: the cache is
        dropped on both sides of the swap, or a later pass in the same region would see the other weights."""
        saved = {n: p.detach().clone() for n, p in self.params}
        torch.clear_autocast_cache()
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            torch.clear_autocast_cache()
            with torch.no_grad():
                for n, p in self.params:
                    p.copy_(saved[n])


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return f


def make_optimizer(params: list, config: TrainConfig):
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BadInput("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _StopSignals:
    """SIGTERM / SIGUSR1 (Slurm preemption) only set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        from dtk import signals

        self.requested = bool(signals.received)   # one that came while the model was loading
        signals.received.clear()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("train: received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Metrics:
    """Windowed means of the logs, to stderr, metrics.jsonl and (when installed) TensorBoard."""

    def __init__(self, out: Path, name: str, main: bool, resume_step: int):
        self.name, self.main, self.window = name, main, {}
        self.path = out / "metrics.jsonl"
        self.writer = None
        if main:
            self._truncate_after(resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (the resumed run logs them again)."""
        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
        from dtk.io import atomic_write

        with atomic_write(self.path, "w") as f:
            f.write("".join(ln + "\n" for ln in keep))

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.window.setdefault(k, []).append(float(v))

    def flush(self, step: int, total: int, extra: dict, accelerator) -> dict:
        means = {k: sum(v) / len(v) for k, v in self.window.items()}
        if accelerator.num_processes > 1:  # every process logs the same keys: the mean over all of them
            values = accelerator.reduce(torch.tensor(list(means.values()), device=accelerator.device), "mean")
            means = dict(zip(means, values.tolist()))
        record = {"step": step, **means, **extra}
        self.window = {}
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.writer.add_scalar(k, v, step)
            shown = " ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
            log.info("%s: step %d/%d %s", self.name, step, total, shown)
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------
# Setting up


def _prepare_out(out: Path, config: TrainConfig, main: bool) -> Path | None:
    """Check ``--out`` against ``--resume``/``--overwrite``; the checkpoint to resume from, if any (nothing is
    removed here: see _clear_out)."""
    from dtk.train.checkpoint import complete_checkpoints, find_resume

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    finished = (out / "dtk.json").exists()
    if finished and not config.overwrite:
        raise BadInput(f"--out {out}: holds a finished model (dtk.json); pass --overwrite to replace it "
                       "(with --resume auto to continue from its last checkpoint)")
    resume = find_resume(out, config.resume)
    existing = complete_checkpoints(out)
    if resume is None and existing and config.resume is None and not config.overwrite:
        raise BadInput(f"--out {out}: holds checkpoints of an unfinished run (newest {existing[-1].name}); "
                       "pass --resume auto to continue it or --overwrite to start over")
    return resume


def _newest_step(out: Path) -> int:
    from dtk.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(out)
    return int(found[-1].name.split("-")[-1]) if found else -1


def _clear_out(out: Path, config: TrainConfig, main: bool, resume: Path | None, command: str):
    """The folder made ready; what --overwrite replaces is set aside (``Replacing``), to be dropped once the
    new run has a checkpoint and put back if it stops before. Called once the model, the data, the method's
    settings and the resume state are all accepted."""
    from dtk.io import Replacing, lock_out
    from dtk.train.checkpoint import CHECKPOINTS, remove_stale_temporaries, set_aside_newer

    if not main:
        return None
    lock_out(out, command=command)   # made now if new; held until the run ends
    if _prepare_out(out, config, main) != resume:   # another run finished or checkpointed here meanwhile
        raise BadInput(f"--out {out}: another run wrote into it while this one was loading; run again to see what "
                       "it holds")
    replacing = None
    if config.overwrite:
        started_over = () if resume is not None else (CHECKPOINTS, "metrics.jsonl", "validation", "tensorboard")
        # the owner record says how far the folder was: a later checkpoint is this run's own
        owner = {"command": command, "checkpoint_step": _newest_step(out) if resume is not None else -1}
        replacing = Replacing(out, names=started_over, owner=owner).set_aside()
    remove_stale_temporaries(out)
    if resume is not None:
        for p in set_aside_newer(out, resume):
            log.warning("train: resuming from %s: the newer checkpoint is kept as %s", resume.name, p)
    return replacing


def _load_model(config: TrainConfig, ref, accelerator, weight_dtype):
    """The pipeline of ``ref`` with its LoRAs fused (they become part of the base), frozen, on the device."""
    from dtk.diffusion.loading import open_model

    model = open_model(ref, accelerator.device, torch.float32, config.model_config, guide=False)   # LoRAs fused
    pipe = model.pipe
    unet_config = pipe.unet.config
    if unet_config.get("out_channels", 0) == 2 * unet_config.get("in_channels", -1):
        # a learned-variance UNet (mean and variance channels): every objective here reads one prediction
        raise BadInput(f"--model {config.model}: its UNet predicts a learned variance too ({unet_config.out_channels} "
                       "output channels); dtk trains models with one prediction (ε, v or x₀) per channel")
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
            if name == "vae" and module.config.get("force_upcast", False):
                module.to(torch.float32)  # the SDXL VAE overflows in fp16
            elif name != "unet" or not config.full:
                module.to(weight_dtype)
    model.dtype = weight_dtype
    return model


def _add_trainable(unet, config: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Full fine-tuning: every UNet parameter; LoRA: a peft adapter on ``--lora-targets`` (fp32)."""
    if config.full:
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        if not hasattr(unet, "add_adapter"):
            raise BadInput(f"{type(unet).__name__} (a pixel-space model) takes no LoRA here: train it with --full")
        names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
        full_names = {n for n, _ in unet.named_modules()}
        unknown = [t for t in config.lora_targets
                   if t not in names and not any(fn.endswith("." + t) for fn in full_names)]
        present = [t for t in config.lora_targets if t not in unknown]
        # the default set names SD's modules: a pixel UNet2DModel has only some; names given explicitly must exist
        if (unknown and tuple(config.lora_targets) != DEFAULT_LORA_TARGETS) or not present:
            raise BadInput(f"--lora-targets: no module of this UNet is named {', '.join(unknown)}")
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=present))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    unet.train()
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# The loop


def _open_data(method: Method, config: TrainConfig, family: str, unet_config: dict, native: int):
    # an unconditional model reads no caption: a plain folder of images is its data
    unconditional = family == "pixel" and not unet_config.get("num_class_embeds")
    return method.open_data(config.data, resolution=config.resolution or native,
                            allow_missing_captions=config.allow_missing_captions or unconditional)


def _stop_if_terminated(when: str) -> None:
    """A safe point before training starts: SIGTERM (preemption) stops the run here, to be requeued."""
    from dtk import signals

    if signals.stop_requested():
        raise Preempted(f"SIGTERM {when}; nothing to save yet: requeue and rerun with --resume auto "
                        f"(exit {EXIT_PREEMPTED})")


def _launcher_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, srun with torchrun) says it started."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"WORLD_SIZE={text}: not a whole number (set by the launcher)") from None


def train(method: Method, config: TrainConfig) -> dict:
    """Run ``method`` under ``config``: the whole training command, with its output locked for its life."""
    from dtk.io import release_out

    try:
        return _train(method, config)
    finally:
        if str(config.out).strip() and Path(config.out).is_dir():
            release_out(config.out)


def _train(method: Method, config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dtk.diffusion.loading import model_configs, native_size, resolve_model
    from dtk.diffusion.schedule import alphas_cumprod
    from dtk.logs import quiet_libraries
    from dtk.seeds import derive_seed
    from dtk.train.data import collate

    config.check()
    if config.device not in ("auto", "cpu"):
        raise BadInput(f"--device {config.device}: training takes cpu or auto (accelerate's choice, one GPU per "
                       "process); choose GPUs with CUDA_VISIBLE_DEVICES")
    quiet_libraries()
    t_start = time.monotonic()
    if config.mixed_precision == "fp16" and (config.device == "cpu" or not torch.cuda.is_available()):
        # accelerate runs no fp16 autocast on the CPU, and fp16 frozen weights then meet fp32 activations
        raise BadInput("--mixed-precision fp16: needs a CUDA GPU; on the CPU use bf16 or no")
    AcceleratorState._reset_state()  # a process-wide singleton: let a second run in one process choose again
    world = _launcher_world_size()
    # a launcher's processes on a machine without CUDA join one process group on the CPU (gloo); accelerate
    # would otherwise start each as a lone process, and N copies would train into one --out
    cpu = config.device == "cpu" or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise BadInput(f"WORLD_SIZE={world}, but accelerate joined {accelerator.num_processes} process(es) "
                       f"({accelerator.distributed_type.name}); refusing to train {world} independent copies into "
                       "one --out (check the launcher's environment, or run one process)")
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # checkpoints and export read whole parameters from the main process: that needs DDP
        raise BadInput(f"accelerate is configured for {accelerator.distributed_type.name}; dtk's checkpoints "
                       "and export support DDP (the multi-GPU default): run `accelerate launch` with a DDP config")
    main = accelerator.is_main_process
    if config.data == "-" and accelerator.num_processes > 1:
        raise BadInput("--data -: stdin cannot be shared by several processes; give a file")
    out = Path(config.out)
    ref = resolve_model(config.model)
    if out.resolve() in ref.dirs:
        raise BadInput(f"--out {out}: is --model {config.model} or one of the models it is built on; "
                       "a run must not overwrite its own base")
    if main:
        from dtk.io import check_out_apart, lock_out, recover_set_aside

        check_out_apart(out, [("--model", d) for d in [ref.path, *ref.dirs]] + [("--data", config.data)])
        lock_out(out, create=False, command=method.name)   # one writer: another run training here is refused
        # what a killed --overwrite run had set aside comes back before any check, unless that run had
        # checkpoints of its own by then (they are newer: the folder is the new run's)
        recover_set_aside(out, progressed=lambda owner: _newest_step(out) > owner.get("checkpoint_step", -1))
    accelerator.wait_for_everyone()
    resume_from = _prepare_out(out, config, main)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    # the data first where the model's configs tell its size: a corrupt image is found before a 30-50 s load
    configs = model_configs(ref)
    data = _open_data(method, config, ref.family, configs[0], native_size(configs[0], configs[1])) if configs else None
    _stop_if_terminated("before the model loaded")
    model = _load_model(config, ref, accelerator, weight_dtype)
    _stop_if_terminated("after the model loaded")
    if data is None:   # a single-file checkpoint: its configs came with its weights
        data = _open_data(method, config, model.family, dict(model.unet.config), model.default_size)
    if data.kind not in method.data_kinds:
        hint = method.data_hints.get(data.kind, "")
        raise BadInput(f"--data {config.data}: {method.name} needs {' or '.join(method.data_kinds)}, "
                       f"this is {data.kind}" + (f"; {hint}" if hint else ""))
    run = Run(config=config, model=model, accelerator=accelerator, data=data, weight_dtype=weight_dtype,
              abar=alphas_cumprod(model.pipe.scheduler.config).to(accelerator.device))
    method.check_data(data, run)
    unet = model.unet
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA initialisation: the same on every process and run
    named = _add_trainable(unet, config)
    run.raw_unet = unet
    method.setup(run)
    params = [p for _, p in named]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, config.max_steps))
    run.unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMA(named, config.ema_decay) if config.ema_decay else None
    run.ema = ema

    step, seen = 0, 0
    if resume_from is not None:
        step, seen = _restore(resume_from, run, named, optimizer, scheduler, ema, method)
        run.step = step
        log.info("%s: resumed from %s (step %d)", method.name, resume_from, step)
    replacing = _clear_out(out, config, main, resume_from, method.name)
    try:
        result = _train_loop(run, method, config, named, params, optimizer, scheduler, ema, collate, step, seen,
                             out, t_start, replacing)
    except BaseException:
        if replacing is not None:   # stopped before it had a checkpoint of its own: the replaced result returns
            replacing.restore()
        raise
    if replacing is not None:   # a resume already at --max-steps writes no checkpoint, only its export
        replacing.drop()
    return result


def _train_loop(run, method, config, named, params, optimizer, scheduler, ema, collate, step, seen, out,
                t_start, replacing) -> dict:
    from dtk.train.data import BatchOrder

    accelerator, main, data = run.accelerator, run.accelerator.is_main_process, run.data
    accelerator.wait_for_everyone()
    order = BatchOrder(len(data), config.seed, config.batch_size, config.grad_accum, accelerator.num_processes)
    metrics = _Metrics(out, method.name, main, step)
    if main:
        n_train = sum(p.numel() for p in params)
        from dtk import threads

        threads.report()
        log.info("%s: %s on %s (%d examples), %s %.2fM trainable parameters, global batch %d, %d steps, %d process(es) on %s",
                 method.name, run.model.ref.spec, data.name, len(data),
                 "full UNet" if config.full else f"LoRA rank {config.lora_rank} alpha {config.alpha:g},",
                 n_train / 1e6, order.global_batch, config.max_steps, accelerator.num_processes, accelerator.device)

    last_record: dict = {}
    window_start, window_examples = time.monotonic(), 0
    with _StopSignals() as stop:
        while step < config.max_steps:
            grad_norm = _one_step(run, method, order, data, collate, optimizer, params, metrics, step)
            if not optimizer.step_was_skipped:  # fp16: the grad scaler skipped an overflowing step
                scheduler.step()
                if ema is not None:
                    ema.update()
            step += 1
            seen += order.global_batch
            window_examples += order.global_batch
            run.step = step
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.monotonic() - window_start
                extra = {"lr": scheduler.get_last_lr()[0], "examples_per_s": window_examples / max(elapsed, 1e-9),
                         "grad_norm": grad_norm}
                last_record = metrics.flush(step, config.max_steps, extra, accelerator)
                window_start, window_examples = time.monotonic(), 0
            if config.validate_every and step % config.validate_every == 0 and main:
                _validate(run, method, ema, out, step)
            stopping = _any_process(accelerator, stop.requested)
            if step % config.checkpoint_every == 0 or stopping or step == config.max_steps:
                path = _checkpoint(run, method, named, optimizer, scheduler, ema, step, seen, out)
                if replacing is not None:   # this run has a checkpoint of its own: the replaced result goes
                    replacing.drop()
                if stopping:
                    metrics.close()
                    raise Preempted(f"checkpoint {path} saved at step {step}; rerun with --resume auto to continue "
                                    f"(exit {EXIT_PREEMPTED})")
    metrics.close()
    result = {}
    if main:
        result = _export(run, method, named, ema, out, step, seen, time.monotonic() - t_start, last_record)
    accelerator.wait_for_everyone()
    return result


def _one_step(run, method, order, data, collate, optimizer, params, metrics, step) -> float:
    """One optimizer step over grad_accum micro-batches; NaN/Inf stops the run before any update.
    Returns the gradient norm (before clipping)."""
    from dtk.seeds import derive_seed

    accelerator, config = run.accelerator, run.config
    rank = accelerator.process_index
    for micro in range(config.grad_accum):
        positions = order.positions(step, micro, rank)
        batch = collate([data[i] for i in order.indices(step, micro, rank)])
        run.rng = PerExample([derive_seed(config.seed, f"example-{p}") for p in positions], accelerator.device)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.unet):
            with accelerator.autocast():
                loss, logs = method.loss(batch, run)
            if _any_process(accelerator, not bool(torch.isfinite(loss.detach()).all())):
                raise RunFailure(_nan_message("loss", loss, step + 1, run.config))
            accelerator.backward(loss / config.grad_accum)
        metrics.add({"loss": float(loss.detach()), **logs})
    # the norm is taken even without clipping (max norm inf): a NaN gradient must never reach the weights
    grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm) and config.mixed_precision != "fp16":  # fp16: the scaler skips the step
        raise RunFailure(_nan_message("gradient norm", grad_norm, step + 1, run.config))
    try:
        optimizer.step()
    except RuntimeError as e:   # the update itself overflowed (e.g. --lr 1e38)
        if "overflow" not in str(e):
            raise
        raise RunFailure(_nan_message(f"the update at --lr {config.lr:g}", "out of float range", step + 1,
                                      run.config, "stopped before saving the weights")) from None
    optimizer.zero_grad(set_to_none=True)
    # a finite loss can still leave weights at 1e30 (a huge --lr): no checkpoint may hold them
    norms = torch._foreach_norm([p.detach() for p in params])
    if _any_process(accelerator, not bool(torch.isfinite(torch.stack(norms)).all())):
        raise RunFailure(_nan_message("the trained weights' norm", "not finite", step + 1, run.config,
                                      "stopped before saving them (a smaller --lr?)"))
    metrics.add(method.after_step(run))
    return grad_norm


def _nan_message(what: str, value, step: int, config: TrainConfig,
                 done: str = "stopped before updating the weights") -> str:
    from dtk.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(Path(config.out))
    kept = (f"the last good checkpoint is {found[-1]} (continue with --resume auto, e.g. with a lower --lr)"
            if found else "no checkpoint was written yet")
    value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else value
    return f"{what} is {value} at step {step}; {done}; {kept}"


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


# ---------------------------------------------------------------------------
# Checkpoints, validation, export


def _state_of(named) -> dict:
    return {n: p.detach().float().cpu().contiguous() for n, p in named}


def _checkpoint(run, method, named, optimizer, scheduler, ema, step, seen, out) -> Path:
    from dtk.train.checkpoint import checkpoint_name, checkpoint_root, save_checkpoint

    accelerator = run.accelerator
    path = checkpoint_root(out) / checkpoint_name(step)
    if accelerator.is_main_process:
        state = {"step": step, "examples_seen": seen, "world_size": accelerator.num_processes,
                 "config": {**_resume_keys(run), "data_examples": len(run.data), "method": method.describe()},
                 "method": method.name}
        save_checkpoint(out, step, trainable=_state_of(named), ema=ema.shadow if ema else None,
                        optimizer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                         "torch_rng": torch.get_rng_state(),
                                         # dropout masks on a GPU come from its own generator
                                         **({"cuda_rng": torch.cuda.get_rng_state(accelerator.device)}
                                            if accelerator.device.type == "cuda" else {}),
                                         **({"grad_scaler": accelerator.scaler.state_dict()}
                                            if accelerator.scaler is not None else {})},
                        method_state=method.state_dict(), state=state, keep=run.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def _resume_keys(run) -> dict:
    """Settings a checkpoint cannot be resumed under different values of."""
    config, spec = run.config, run.model.ref.spec
    local = Path(spec).expanduser()
    model = str(local.resolve()) if spec not in ("demo", "demo-pixel") and local.exists() else spec
    return {"model": model, "resolution": run.resolution, "full": config.full, "lora_rank": config.lora_rank,
            "lora_alpha": config.alpha, "lora_targets": list(config.lora_targets), "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "seed": config.seed, "ema": config.ema_decay > 0,
            "optimizer": config.optimizer}


def _restore(path, run, named, optimizer, scheduler, ema, method) -> tuple[int, int]:
    from dtk.train.checkpoint import load_checkpoint

    config, accelerator, data_size = run.config, run.accelerator, len(run.data)
    ckpt = load_checkpoint(path)
    state = ckpt["state"]
    saved = state.get("config", {})
    now = {**_resume_keys(run), "data_examples": data_size, "method": json.loads(json.dumps(method.describe()))}
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if saved.get("world_size", accelerator.num_processes) * saved.get("batch_size", 0) != \
            accelerator.num_processes * config.batch_size and "batch_size" not in diff:
        diff.append("processes × batch size")
    if "method" in diff:   # every recorded setting agrees, but some are not recorded: an earlier dtk's checkpoint
        old, new = saved["method"], now["method"]
        unrecorded = sorted(set(new) - set(old))
        if unrecorded and all(old[m] == new.get(m) for m in old):
            raise BadInput(f"--resume {path}: made by an earlier dtk, which did not record {', '.join(unrecorded)}; "
                           "start the run again (without --resume)")
    if diff:
        shown = []
        for k in diff:
            if k == "method":  # the method's own settings: name the ones that changed
                old, new = saved[k], now[k]
                shown += [f"{m}={old.get(m)}" for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]
            elif k in saved:
                shown.append(f"{k}={saved[k]}")
        raise BadInput(f"--resume {path}: saved with other {', '.join(diff)} than this run ({', '.join(shown)})")
    params = dict(named)
    missing = set(params) - set(ckpt["trainable"])
    if missing:
        raise BadInput(f"--resume {path}: lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ckpt["trainable"][n].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
    scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    # this run's --lr and --weight-decay apply from here on (e.g. a lower --lr after a NaN)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
        group.update(initial_lr=config.lr, lr=config.lr * factor, weight_decay=config.weight_decay)
    torch.set_rng_state(ckpt["optimizer"]["torch_rng"])
    if accelerator.device.type == "cuda" and "cuda_rng" in ckpt["optimizer"]:
        torch.cuda.set_rng_state(ckpt["optimizer"]["cuda_rng"], accelerator.device)
    if accelerator.scaler is not None and "grad_scaler" in ckpt["optimizer"]:
        accelerator.scaler.load_state_dict(ckpt["optimizer"]["grad_scaler"])
    if ema is not None:
        if ckpt["ema"] is None:
            raise BadInput(f"--resume {path}: has no EMA state but --ema-decay is set")
        ema.shadow = {n: t.to(accelerator.device) for n, t in ckpt["ema"].items()}
    if ckpt["method"]:
        method.load_state_dict(ckpt["method"])
    return int(state["step"]), int(state["examples_seen"])


def validation_settings(run, method):
    from dtk.diffusion.sampling import SamplerSettings

    rec = {"scheduler": "dpm++2m", "steps": 25, "guidance": 7.5, **method.sampler(run)}
    ts = rec.get("timesteps")
    return SamplerSettings(scheduler=rec["scheduler"], steps=len(ts) if ts else int(rec["steps"]),
                           guidance=float(rec["guidance"]), height=run.resolution, width=run.resolution,
                           timesteps=list(ts) if ts else None, consistency=rec.get("consistency"))


def validation_prompts(run) -> list[str]:
    if run.config.validation_prompts:
        return list(run.config.validation_prompts)
    captions = getattr(run.data, "captions", None)
    pool = captions() if callable(captions) else [run.data[i]["caption"] for i in range(min(len(run.data), 64))]
    return list(dict.fromkeys(c for c in pool if c))[:4] or [""]


@torch.no_grad()
def _validate(run, method, ema, out: Path, step: int) -> None:
    """A grid of validation images with the method's recommended sampler (EMA weights when kept)."""
    from PIL import Image

    from dtk.diffusion.sampling import Request, decode, denoise, to_uint8
    from dtk.sample import write_grid
    from dtk.seeds import derive_seed

    unet = run.raw_unet
    unet.eval()
    try:
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            prompts = validation_prompts(run)
            requests = [Request(prompt=p, seed=derive_seed(run.config.seed, i)) for i, p in enumerate(prompts)]
            with run.accelerator.autocast():  # trained fp32 weights beside frozen half-precision ones
                latents = denoise(run.model, validation_settings(run, method), requests)
            images = to_uint8(decode(run.model, latents))
    finally:
        unet.train()
    write_grid(out / "validation" / f"step-{step:08d}.png", [Image.fromarray(a) for a in images], len(images))


def _export(run, method, named, ema, out: Path, step: int, seen: int, seconds: float, last: dict) -> dict:
    """The model directory: weights (LoRA or UNet) and dtk.json, which is written last."""
    import shutil

    from dtk.diffusion.lora import LORA_FILE, save_kohya, save_lora
    from dtk.io import emit, run_record, write_json

    config, unet = run.config, run.raw_unet
    files, manifest = [], {}
    with ema.swapped() if ema is not None and method.export_ema else contextlib.nullcontext():
        if config.full:
            tmp = out / ".unet.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                unet.save_pretrained(str(tmp), safe_serialization=True)
            except BaseException:   # a failed export (a full disk) leaves no temporary folder behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(out / "unet", ignore_errors=True)
            os.replace(tmp, out / "unet")
            manifest["unet"] = "unet"
            files += [f"unet/{p.name}" for p in (out / "unet").iterdir()]
        elif config.export_format == "kohya":
            save_kohya(out / "lora-kohya.safetensors", unet)
            manifest["loras"] = [{"path": "lora-kohya.safetensors", "scale": 1.0}]
            files.append("lora-kohya.safetensors")
        else:
            save_lora(out, unet, run.family, metadata={"method": method.name})
            manifest["loras"] = [{"path": LORA_FILE, "scale": 1.0}]
            files.append(LORA_FILE)
    base = run.model.ref.spec
    base_path = Path(base).expanduser()
    if base != "demo" and base_path.exists():
        base = str(base_path.resolve())  # so the model dir works from any directory
    summary = {"steps": step, "examples_seen": seen, "seconds": round(seconds, 1),
               "processes": run.accelerator.num_processes, "final": last}
    args = {k: v for k, v in asdict(config).items() if k != "extra"}
    write_json(out / "dtk.json", run_record(
        method.name, {**args, **config.extra}, kind="model", base_model=base, sampler=method.sampler(run),
        method=method.describe(), data=run.data.describe(), training=summary, files=files, **manifest))
    result = {"out": str(out), "model": str(out), "steps": step, "examples_seen": seen,
              "loss": last.get("loss"), "seconds": round(seconds, 1)}
    emit(result)
    return result
