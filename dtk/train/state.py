"""What a training method sees, and the state the loop carries.

Randomness: every random draw a method makes for an example comes from that
example's own generator (``PerExample``), seeded from (seed, position of the
example in the data stream). Results therefore do not depend on the batch
split across processes or accumulation steps, and a resumed run draws what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtk.errors import DtkError
from dtk.train.config import EXIT_PREEMPTED, TrainConfig


class Preempted(DtkError):
    """SIGTERM/SIGUSR1: a checkpoint was saved; a requeued job continues with --resume auto."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"


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

    @property
    def schedule(self):
        from dtk.diffusion.denoiser import VPSchedule

        return VPSchedule(self.abar)

    def denoiser(self, net):
        """``net`` (this model's UNet, a copy, or the same UNet wrapped) as a denoiser of this model."""
        from dtk.diffusion.denoiser import Denoiser

        return Denoiser(net, self.schedule, self.prediction_type)

    @property
    def student(self):
        """The trained model as the engine wraps it (DDP): the pass whose gradients train it."""
        return self.denoiser(self.unet)

    @property
    def online(self):
        """The trained model's current weights, unwrapped: for passes without gradients (targets)."""
        return self.denoiser(self.raw_unet)

    def base(self, dtype: torch.dtype | None = None):
        """The base model the training starts from, frozen (the teacher or reference of a method): with LoRA the
        trained UNet with its adapter switched off (no second copy in memory); with --full a frozen copy, in
        ``dtype`` (default the frozen weights' dtype). Call it in ``Method.setup``, before any step."""
        from dtk.diffusion.denoiser import AdapterOff

        if not self.config.full:
            return self.denoiser(AdapterOff(self.raw_unet))
        import copy

        unet = copy.deepcopy(self.raw_unet).requires_grad_(False).eval()
        return self.denoiser(unet.to(dtype or self.weight_dtype))

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


class Method:
    """What a paper contributes. Subclasses override ``loss`` and ``sampler``; the rest is optional."""

    name = "train"                    # the command, e.g. "train-reflow"
    data_kinds: tuple[str, ...] = ("images",)   # what --data may hold: "images", "pairs"
    data_hints: dict[str, str] = {}             # kind of data refused → what to do instead
    export_ema = True                 # with --ema-decay, the EMA weights are the result (else the trained ones)
    training_defaults: dict = {}      # engine settings this method chooses when the caller leaves them unset

    def open_data(self, spec: str, *, resolution: int, allow_missing_captions: bool = False):
        """``--data`` as a dataset (methods with their own formats, e.g. preference pairs, override this)."""
        from dtk.data.images import open_dataset

        return open_dataset(spec, resolution=resolution, allow_missing_captions=allow_missing_captions)

    def check_data(self, data, run: Run) -> None:
        """Reject data this method cannot use (BadInput naming what and where)."""

    def setup(self, run: Run) -> None:
        """Called once the model exists and before any step: build teachers, constants."""

    def loss(self, batch: dict, run: Run) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # A second player (e.g. PCM's discriminator), updated by the engine after each step of the trained model:
    # an object with ``module``, ``optimizer``, ``max_grad_norm``, ``log_name``, ``take()`` (what the step's
    # micro-batches recorded for it) and ``loss(item)``. None: no second player.
    second_player = None

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


@dataclass
class TrainingState:
    """What the loop, checkpoints and export share: the run, its method, what is trained and how far."""

    run: Run
    method: Method
    named: list                       # (name, parameter) of every trained tensor
    optimizer: Any
    scheduler: Any                    # the LR schedule
    ema: EMA | None
    out: Path
    step: int = 0
    seen: int = 0                     # examples seen, all processes together

    @property
    def params(self) -> list:
        return [p for _, p in self.named]
