"""The discrete VP schedule of the SD family, as pure functions of tensors.

Notation (see docs/methods.md, "Common notation"): ᾱ_t cumulative product, α_t = √ᾱ_t, σ_t = √(1−ᾱ_t).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(config: dict) -> torch.Tensor:
    """ᾱ_t for t = 0..T−1 from a diffusers scheduler config (float64)."""
    n = config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    kind = config.get("beta_schedule", "linear")
    if config.get("snr_shift_scale", 1.0) != 1.0:
        # CogVideoX's schedulers shift the SNR, ᾱ ← ᾱ/(s + (1 − s)ᾱ), before any zero-terminal-SNR rescaling;
        # a DDPMScheduler ignores the setting, so the table comes from the scheduler that defines it
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler.from_config(dict(config)).alphas_cumprod.double()
    if config.get("rescale_betas_zero_snr") or kind not in ("linear", "scaled_linear"):
        # cosine (squaredcos_cap_v2), zero-terminal-SNR rescaling, ...: exactly as diffusers computes them
        from diffusers import DDPMScheduler

        try:
            return DDPMScheduler.from_config(dict(config)).alphas_cumprod.double()
        except NotImplementedError:
            raise ValueError(f"unsupported beta_schedule {kind!r}") from None
    b0, b1 = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_sigma(abar: torch.Tensor, t: int, final_abar: float = 1.0) -> tuple[float, float]:
    """(α_t, σ_t); t < 0 means the end of sampling, where ᾱ = ``final_abar``."""
    a = float(abar[t]) if t >= 0 else final_abar
    return a**0.5, (1.0 - a) ** 0.5


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha: float, sigma: float, prediction_type: str):
    """The model's output as (x̂₀, ε̂) for ε-, v- and x₀-prediction."""
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * output
        eps = alpha * output + sigma * x_t
    elif prediction_type == "sample":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def output_for(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The output a model of ``prediction_type`` should give for (x₀, ε): the inverse of ``to_x0_eps``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_s: float, sigma_s: float) -> torch.Tensor:
    """Deterministic first-order DDIM jump to s: x_s = α_s x̂₀ + σ_s ε̂."""
    return alpha_s * x0 + sigma_s * eps


def timestep_grid(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, spacing: str = "trailing") -> list[int]:
    """A grid of ``steps`` train timesteps, high to low, with r = T // steps:

    ``trailing``: T − 1 − i·r (N = 50: 999, 979, …, 19; diffusers' "trailing" spacing when N divides T) — it
    starts at the noisiest timestep, so a sampler or teacher on it sees the whole ODE;
    ``leading``: (N − 1 − i)·r (N = 50: 980, …, 20, 0; diffusers' "leading" without its offset)."""
    r = num_train_timesteps // steps
    if spacing == "trailing":
        return [num_train_timesteps - 1 - i * r for i in range(steps)]
    if spacing == "leading":
        return [(steps - 1 - i) * r for i in range(steps)]
    raise ValueError(f"unknown timestep spacing {spacing!r}")
