"""The one interface to a model: (x̂₀, ε̂) at (x_t, t, conditioning).

Every method and every sampler talks to a ``Denoiser``, in the manner of
k-diffusion's ``external.py``: it wraps a backbone (a UNet today) together with
what the backbone predicts (ε, v or x₀) and the schedule it was trained on
(α_t, σ_t per timestep), so that a method never asks which family or
parameterisation it is working with. A new backbone or parameterisation is one
more adapter here, not a branch in every method.

Guidance rules (``cfg``, ``Guided``) are small functions and wrappers over
denoisers; the base model a method compares with (a frozen teacher, a DPO
reference) is a denoiser too (``AdapterOff`` for a LoRA run).

Notation: docs/methods.md, "Common notation".
"""

from __future__ import annotations

import contextlib

import torch

from dtk.diffusion.schedule import ddim_step, to_x0_eps


class VPSchedule:
    """The discrete VP schedule of a model: ᾱ_t for t = 0..T−1 (float64, on the model's device)."""

    def __init__(self, abar: torch.Tensor):
        self.abar = abar

    def __len__(self) -> int:
        return len(self.abar)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (α_t, σ_t) as [B,1,1,1] float32; t = −1 means ᾱ = 1 (the clean data)."""
        abar = torch.where(t >= 0, self.abar[t.clamp(min=0)], torch.ones_like(self.abar[0]))
        view = (-1, 1, 1, 1)
        return abar.sqrt().float().view(view), (1 - abar).sqrt().float().view(view)

    def renoise(self, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of the forward process q(x_to | x_from) for t_to ≥ t_from:
        α_{to|from}·x + σ_{to|from}·ε with α_{to|from} = α_to/α_from, σ_{to|from}² = 1 − α_{to|from}²."""
        (a_from, _), (a_to, _) = self.alpha_sigma(t_from), self.alpha_sigma(t_to)
        ratio = a_to / a_from
        return ratio * x + (1 - ratio**2).clamp(min=0).sqrt() * noise


class Denoiser:
    """A backbone seen as (x̂₀, ε̂) = D(x_t, t, cond).

    ``net`` is called as ``net(x_t, t, return_dict=False, **cond.unet_kwargs())`` (a diffusers UNet, or the
    same UNet wrapped by DDP); ``prediction_type`` is what it predicts (diffusers' names)."""

    def __init__(self, net, schedule: VPSchedule, prediction_type: str):
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type

    def using(self, net) -> "Denoiser":
        """The same parameterisation and schedule over another network (a teacher, a DDP wrapper)."""
        return Denoiser(net, self.schedule, self.prediction_type)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.alpha_sigma(t)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The network's output (ε, v or x₀ as it predicts) in the network's dtype, as a diffusers scheduler
        steps with it; a learned-variance UNet's variance channels are left out."""
        return self.net(x_t, t, return_dict=False, **cond.unet_kwargs())[0][:, :x_t.shape[1]]

    def output(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The network's output (ε, v or x₀ as it predicts), in float32."""
        return self.net(x_t, t, return_dict=False, **cond.unet_kwargs())[0].float()

    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        alpha, sigma = self.alpha_sigma(t)
        return to_x0_eps(output, x_t, alpha, sigma, self.prediction_type)

    def edm(self):
        """The EDM view D(x, σ) of this denoiser (``dtk.diffusion.edm.VPDenoiser``)."""
        from dtk.diffusion.edm import VPDenoiser

        return VPDenoiser(self.net, self.schedule.abar, self.prediction_type)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) at (x_t, t, cond). Both come from the prediction itself: rebuilding one from the other
        divides by α_t or σ_t, which is 0 at the ends of a zero-terminal-SNR schedule."""
        return self.to_x0_eps(self.output(x_t, t, cond), x_t, t)


# ---------------------------------------------------------------------------
# Guidance rules


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale, convention: str = "diffusers") -> torch.Tensor:
    """Classifier-free guidance of two predictions.

    ``diffusers``: u + s·(c − u) (s = 1 is the conditional model);
    ``lcm``: c + w·(c − u) (w = 0 is the conditional model; w = s − 1). ``scale`` may be a per-example
    tensor, broadcast over the remaining dimensions."""
    if isinstance(scale, torch.Tensor):
        scale = scale.view(-1, *([1] * (cond.dim() - 1)))
    if convention == "diffusers":
        return uncond + scale * (cond - uncond)
    if convention == "lcm":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown guidance convention {convention!r}")


def guided_by_worse(good, bad, scale: float):
    """Guidance by a worse version of the model (in the manner of autoguidance; SCT's guide): for EDM denoisers
    D(x, σ), D_bad + w·(D_good − D_bad)."""
    def guided(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        d_bad = bad(x, sigma, **cond)
        return d_bad + scale * (good(x, sigma, **cond) - d_bad)
    return guided


class Guided:
    """A denoiser under classifier-free guidance: one batched evaluation of both branches.

    ``combine="output"`` guides the network's raw output and converts once (diffusers' pipelines);
    ``combine="x0_eps"`` converts each branch and guides x̂₀ and ε̂ alike (the same guidance, as both are
    affine in the output at a fixed x_t; PCM's and LCM's teacher)."""

    def __init__(self, denoiser: Denoiser, scale, convention: str = "diffusers", combine: str = "output",
                 dtype: torch.dtype | None = None):
        self.denoiser, self.scale, self.convention, self.combine = denoiser, scale, convention, combine
        self.dtype = dtype   # the dtype the network's input is cast to (a half-precision frozen teacher)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([x_t, x_t])
        if self.dtype is not None:
            both = both.to(self.dtype)
        t2, c2 = torch.cat([t, t]), type(cond).cat([uncond, cond])
        if self.combine == "x0_eps":
            x0, eps = self.denoiser(both, t2, c2)
            (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
            return (cfg(x0_u, x0_c, self.scale, self.convention), cfg(eps_u, eps_c, self.scale, self.convention))
        out_u, out_c = self.denoiser.output(both, t2, c2).chunk(2)
        return self.denoiser.to_x0_eps(cfg(out_u, out_c, self.scale, self.convention), x_t, t)

    def ddim_step(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond, uncond) -> torch.Tensor:
        """One guided DDIM step t → t_next (η = 0): the teacher step of every distillation here."""
        return ddim_step(*self(x_t, t, cond, uncond), *self.denoiser.alpha_sigma(t_next))


class AdapterOff:
    """The trained UNet with its LoRA adapter switched off for the call: the frozen base model as a network,
    with no second copy in memory (the base-model rule for LoRA training; see ``dtk.train.state.Run.base``)."""

    def __init__(self, unet):
        self.module = unet   # the UNet itself (for hooks on its blocks)

    @contextlib.contextmanager
    def switched_off(self):
        self.module.disable_adapters()
        try:
            yield self.module
        finally:
            self.module.enable_adapters()

    def __call__(self, *args, **kwargs):
        with self.switched_off() as base:
            return base(*args, **kwargs)
