"""Easy Consistency Tuning (Geng et al.) and Stable Consistency Tuning (Wang, Geng, Li, ICLR 2025): objectives.

Consistency training as TD learning along the ODE x_σ = x₀ + σε: the model's
output at a noisier point (t) is pulled to its own stop-gradient output at a
nearby less noisy point (r) on the same trajectory. ECT draws r from t with a
gap that shrinks in stages; SCT lowers the variance of the target by replacing
the single-sample estimate of the trajectory through x_t with the score
identity ∇log p_t(x_t) = E_{x₀|x_t}[∇log p_t(x_t | x₀)] over a reference set.

These are the pure functions, tested against closed forms; the `dtk tune-sct`
command that will train with them is not built yet. Notation as METHODS.md "tune-sct".
"""

from __future__ import annotations

import torch

# ECT's lognormal t (ImageNet settings; CIFAR: −1.1, 2.0)
P_MEAN, P_STD = -0.8, 1.6


def ect_t(z: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """t = exp(P_mean + P_std·z) for standard normal z."""
    return (p_mean + p_std * z).exp()


def ect_r(t: torch.Tensor, stage: int, q: float = 4.0) -> torch.Tensor:
    """r = t·(1 − n(t)/q^(stage+1)), n(t) = 1 + 8·sigmoid(−t), clamped at 0: Δt/t = n(t)/q^(stage+1)."""
    n = 1 + 8 * torch.sigmoid(-t)
    return (t * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_stage(iteration: int, double_every: int) -> int:
    """The curriculum stage: Δt/t shrinks by q every ``double_every`` iterations."""
    return iteration // double_every


def ect_weight(t: torch.Tensor, r: torch.Tensor, kind: str, sigma_data: float = 0.5) -> torch.Tensor:
    """1/(t − r) (ECT CIFAR) or 1/t² + 1/σ_d² (ECT ImageNet)."""
    if kind == "inv_dt":
        return 1 / (t - r).clamp(min=1e-8)
    if kind == "edm":
        return 1 / t**2 + 1 / sigma_data**2
    raise ValueError(f"unknown weighting {kind!r}")


def stable_point(x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, references: torch.Tensor,
                 same_class: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SCT's x_r: the step from x_t towards r along ε̂ = (x_t − x̂₀)/t, with x̂₀ the posterior mean of x₀
    over the reference set: wᵢ = softmax(−‖x_t − x₀⁽ⁱ⁾‖²/(2t²)), x̂₀ = Σ wᵢ x₀⁽ⁱ⁾.

    ``same_class`` [B, R] (bool) restricts each example's references (class-conditional models).
    With one reference, x₀ itself, x̂₀ = x₀ and x_r = x₀ + r·ε: ECT's point. Returns (x_r, x̂₀)."""
    flat_x, flat_ref = x_t.flatten(1).double(), references.flatten(1).double()
    d2 = torch.cdist(flat_x, flat_ref).pow(2)                         # [B, R]
    logits = -d2 / (2 * t.double().view(-1, 1) ** 2)
    if same_class is not None:
        logits = logits.masked_fill(~same_class, float("-inf"))
    w = torch.softmax(logits, dim=1)
    x0_hat = (w @ flat_ref).view_as(x_t).to(x_t.dtype)
    eps_hat = (x_t - x0_hat) / t.view(-1, 1, 1, 1)
    return x_t - (t - r).view(-1, 1, 1, 1) * eps_hat, x0_hat


def ect_loss(f_t: torch.Tensor, f_r: torch.Tensor, weight: torch.Tensor, huber_c: float) -> torch.Tensor:
    """Per example Δ = mean squared difference (dimension-normalised), L = w·(√(Δ + c²) − c); the mean."""
    delta = (f_t.float() - f_r.float()).pow(2).flatten(1).mean(1)
    return (weight * ((delta + huber_c**2).sqrt() - huber_c)).mean()
