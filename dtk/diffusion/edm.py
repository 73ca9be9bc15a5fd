"""The EDM view of a VP (DDPM-schedule) model, and a consistency function on top of it.

EDM (Karras et al. 2022) writes a diffusion model as a denoiser D(x, σ) of
x = x₀ + σ·ε. A VP model sees x_vp = α_t x₀ + σ_t ε at timestep t; with
σ = σ_t/α_t the two are the same point up to scale: x_vp = x/√(1+σ²) (docs/methods.md,
"Common notation"). The timestep of a σ is interpolated in log σ over the
model's own ᾱ table, exactly as diffusers' ``_sigma_to_t`` does.

    ε-net:  D(x, σ) = x − σ·ε̂(x/√(1+σ²), t(σ))
    v-net:  D(x, σ) = x/(1+σ²) − σ/√(1+σ²)·v̂(x/√(1+σ²), t(σ))
    x₀-net: D(x, σ) = x̂₀(x/√(1+σ²), t(σ))

ε- and v-nets give D(x, 0) = x exactly (an x₀-net only approximately: callers
that need the boundary, like ECT's r = 0 target, substitute x). The consistency function of ECT/SCT is
f(x, σ) = c_skip(σ)·x + c_out(σ)·F(x, σ) with EDM's c_skip = σ_d²/(σ² + σ_d²),
c_out = σσ_d/√(σ² + σ_d²), where F is whatever makes f = D during training;
at evaluation σ − σ_min replaces σ in c_skip/c_out, which makes f(x, σ_min) = x
exactly (Song et al. 2023; ECT).
"""

from __future__ import annotations

import torch

from dtk.errors import BadInput

WRAPPABLE = ("epsilon", "v_prediction", "sample")


def vp_sigmas(abar: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for every train timestep (increasing in t)."""
    return ((1 - abar) / abar).sqrt()


def sigma_to_t(sigma: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """A (fractional) timestep for each σ: linear interpolation in log σ over the model's table;
    σ below the table's first entry maps to t = 0, above its last to T − 1."""
    log_sigmas = vp_sigmas(abar).log().to(sigma.device)
    log_sigma = sigma.double().clamp(min=1e-10).log()
    dists = log_sigma[:, None] - log_sigmas[None, :]
    low = (dists >= 0).long().cumsum(1).argmax(1).clamp(max=len(log_sigmas) - 2)
    low_v, high_v = log_sigmas[low], log_sigmas[low + 1]
    w = ((low_v - log_sigma) / (low_v - high_v)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).float()


class VPDenoiser:
    """D(x, σ) of a VP UNet (``unet(x_vp, t, **cond)`` → ε, v or x₀)."""

    def __init__(self, unet, abar: torch.Tensor, prediction_type: str):
        if prediction_type not in WRAPPABLE:
            raise BadInput(f"prediction_type {prediction_type!r} cannot be wrapped as an EDM denoiser "
                           f"(supported: {', '.join(WRAPPABLE)})")
        self.unet, self.abar, self.prediction_type = unet, abar, prediction_type

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, unet=None, **cond) -> torch.Tensor:
        """``sigma`` per example [B]; ``unet`` overrides the wrapped one (e.g. a DDP-wrapped copy)."""
        s = sigma.float().view(-1, 1, 1, 1)
        c_in = 1 / (1 + s**2).sqrt()
        t = sigma_to_t(sigma, self.abar)
        net = unet if unet is not None else self.unet
        x = x.float()  # the combination below in fp32, the network in its own dtype
        dtype = getattr(getattr(net, "module", net), "dtype", x.dtype)
        out = net((x * c_in).to(dtype), t, return_dict=False, **cond)[0].float()
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s**2) - s * c_in * out
        return out


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of EDM for σ per example, as [B,1,1,1]."""
    s = sigma.float().view(-1, 1, 1, 1)
    return sigma_data**2 / (s**2 + sigma_data**2), s * sigma_data / (s**2 + sigma_data**2).sqrt()


def consistency_output(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
                       sigma_min: float = 0.0) -> torch.Tensor:
    """f(x, σ) from the denoiser's output D(x, σ).

    With ``sigma_min`` = 0 this is D itself (training). With σ_min > 0 the
    boundary scalings use σ − σ_min: F = (D − c_skip(σ)x)/c_out(σ) is kept and
    f = c_skip(σ − σ_min)x + c_out(σ − σ_min)F, so f(x, σ_min) = x exactly."""
    if sigma_min == 0:
        return denoised
    c_skip, c_out = edm_scalings(sigma, sigma_data)
    c_skip_min, c_out_min = edm_scalings((sigma - sigma_min).clamp(min=0), sigma_data)
    raw = (denoised - c_skip * x) / c_out.clamp(min=1e-12)
    return c_skip_min * x + c_out_min * raw


# Phases (multistep consistency): each phase's points map to its lower edge


def phase_sigmas(phases: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """K + 1 phase boundaries from σ_max down to σ_min on EDM's ρ-schedule (one phase: [σ_max, σ_min])."""
    ramp = [i / phases for i in range(phases + 1)]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp]


def phase_edge(sigma: torch.Tensor, boundaries: list[float]) -> torch.Tensor:
    """The lower edge of the phase each σ lies in: the first inner boundary below it, else 0 (the data)."""
    edges = torch.tensor(boundaries[1:-1] + [0.0], device=sigma.device, dtype=sigma.dtype)
    return edges[(sigma[:, None] > edges[None, :]).float().argmax(1)]


def jump_to(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """The point at σ_edge on the straight EDM path through x and the estimate x̂₀: x̂₀ + (σ_edge/σ)(x − x̂₀)."""
    ratio = (edge / sigma.clamp(min=1e-12)).view(-1, 1, 1, 1)
    return denoised + ratio * (x - denoised)
