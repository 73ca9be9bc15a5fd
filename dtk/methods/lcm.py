"""Latent Consistency Models (Luo et al. 2023): the baseline PCM is measured against.

One phase (every point maps to the clean end of the ODE) and the consistency
function f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t) with the boundary scalings
of diffusers' LCMScheduler (σ_data = 0.5, timestep scaling 10), so
f(x, 0) = x. The same grid draw, guided DDIM teacher step and CFG as PCM
(``dtk.methods.pcm``); multistep sampling re-noises after each step
(``--scheduler lcm``).
"""

from __future__ import annotations

import torch

from dtk.diffusion.denoiser import Denoiser
from dtk.methods.common import with_pair_sizes
from dtk.methods.pcm import PhasedConsistency, consistency_distance, draw_on_grid, lcm_guided
from dtk.train.state import Run


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, scale: float = 10.0):
    """(c_skip, c_out) as [B,1,1,1]: c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²)."""
    st = (t.float() * scale).view(-1, 1, 1, 1)
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2).sqrt()


def consistency_output(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    c_skip, c_out = boundary_scalings(t)
    x0 = denoiser(x, t, cond)[0]
    return c_skip * x + c_out * x0


def lcm_loss(student: Denoiser, target_net: Denoiser, teacher: Denoiser, x0: torch.Tensor, captions: list[str],
             encode, rng, *, n: int, w_range: tuple[float, float], cfg_solver: bool, empty_prompt_prob: float,
             loss: str, huber_c: float) -> torch.Tensor:
    """LCM's consistency loss: f_θ at x_t against the stop-gradient f at the guided teacher's x_t'."""
    d = draw_on_grid(student.schedule, x0, captions, encode, rng, n, w_range, cfg_solver, empty_prompt_prob)
    out = consistency_output(student, d.x_t, d.t, d.cond)
    with torch.no_grad():
        x_prev = lcm_guided(teacher, d.w).ddim_step(d.x_t, d.t, d.t_prev, d.cond, d.uncond)
        target = consistency_output(target_net, x_prev, d.t_prev, d.cond)
    return consistency_distance(out, target, loss, huber_c)


class LatentConsistency(PhasedConsistency):
    """``dtk distill-pcm --method lcm``: PCM's settings, data and teacher with one phase and LCM's objective."""

    def __init__(self, **settings):
        super().__init__(**settings, method="lcm")

    def loss(self, batch: dict, run: Run):
        def encode(captions):
            return with_pair_sizes(batch, run.encode_prompts(captions))

        return lcm_loss(run.student, run.online, self.teacher, run.latents(batch), batch["caption"], encode, run.rng,
                        n=self.ddim_steps, w_range=self.cfg_range, cfg_solver=self.cfg_solver,
                        empty_prompt_prob=self.empty_prompt_prob, loss=self.loss_kind, huber_c=self.huber_c), {}
