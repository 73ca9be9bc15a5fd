"""Latent Consistency Models (Luo et al. 2023): the baseline PCM is measured against.

One phase (every point maps to the clean end of the ODE) and the consistency
function f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t) with the boundary scalings
of diffusers' LCMScheduler (σ_data = 0.5, timestep scaling 10), so
f(x, 0) = x. The same DDIM teacher step and CFG as PCM (``dtk.methods.pcm``);
multistep sampling re-noises after each step (``--scheduler lcm``).
"""

from __future__ import annotations

import torch

from dtk.methods.pcm import consistency_distance, draw_on_grid, teacher_step
from dtk.train.engine import Run


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, scale: float = 10.0):
    """(c_skip, c_out) as [B,1,1,1]: c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²)."""
    st = (t.float() * scale).view(-1, 1, 1, 1)
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2).sqrt()


def consistency_output(run: Run, unet, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    c_skip, c_out = boundary_scalings(t)
    x0 = run.to_x0_eps(run.predict(unet, x, t, cond), x, t)[0]
    return c_skip * x + c_out * x0


def lcm_loss(run: Run, batch: dict, teacher, *, n: int, w_range: tuple[float, float], cfg_solver: bool,
             empty_prompt_prob: float, loss: str, huber_c: float):
    """LCM's consistency loss: f at x_t against the online target f at the teacher's x_t' (no gradient)."""
    d = draw_on_grid(run, batch, n, w_range, cfg_solver, empty_prompt_prob)
    student = consistency_output(run, run.unet, d.x_t, d.t, d.cond)
    x_prev = teacher_step(run, teacher, d.x_t, d.t, d.t_prev, d.cond, d.uncond, d.w)
    with torch.no_grad():
        target = consistency_output(run, run.raw_unet, x_prev, d.t_prev, d.cond)
    return consistency_distance(student, target, loss, huber_c), {}
