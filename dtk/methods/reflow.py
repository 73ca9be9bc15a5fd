"""Rectified Diffusion (Wang et al., ICLR 2025): retrain on the teacher's own noise→sample pairs.

The claim: what makes rectified flow work is training on *matched* pairs
(z, x₀) — the noise and the sample the pretrained ODE maps it to — so that
the first-order path between them is what the model learns. For an
ε-prediction model that path is x_t = α_t x₀ + σ_t z: curved in x, straight
in (x/α, λ), and a DDIM step follows it exactly once the model predicts z.

Two variants (METHODS.md):

* on stored pairs: t ~ U{0..T−1}, x_t from the *paired* z, pseudo-Huber on x̂₀
  (the public code's x₀-space loss);
* phased (no stored pairs, real images): the ODE is cut into K phases; a
  frozen teacher runs a few guided DDIM steps across a phase [e, s] from a
  noised real latent, and the student learns to cross the segment in one
  DDIM jump from any point τ on it.
"""

from __future__ import annotations

import torch

from dtk.diffusion.schedule import ddim_step
from dtk.errors import BadInput, check_number
from dtk.train.engine import Method, Run

TEACHER_GRID = 40   # DDIM steps over the whole ODE for the phased teacher (10 per phase at K = 4)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """ρ(a, b) = √((a − b)² + c²) − c, elementwise, then the mean."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def check_empty_prompt_prob(p: float | None) -> None:
    """--empty-prompt-prob is a probability (None: the method's own default)."""
    if p is not None and not 0 <= p <= 1:
        raise BadInput(f"--empty-prompt-prob {p}: must be in [0, 1]")


def drop_captions(captions: list[str], keep: torch.Tensor) -> list[str]:
    """The empty prompt where ``keep`` is False (classifier-free guidance needs an unconditional model)."""
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# ---------------------------------------------------------------------------
# The objectives, one screen each


def paired_noising(x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x₀ + σ_t z with the pair's own noise z (not a fresh draw)."""
    return alpha * x0 + sigma * z


def with_pair_sizes(batch: dict, cond):
    """SDXL: the size conditioning (time ids) reflow pairs were made with, which their latents match."""
    if "time_ids" in batch:
        cond.time_ids = batch["time_ids"].to(cond.time_ids.device, cond.time_ids.dtype)
    return cond


def pair_loss(run: Run, batch: dict, huber_c: float, empty_prompt_prob: float) -> tuple[torch.Tensor, dict]:
    """Rectified Diffusion on stored pairs: ρ(x̂₀(x_t, t), x₀), t ~ U{0..T−1}."""
    x0, z = batch["latent"].to(run.device), batch["noise"].to(run.device)
    t = run.rng.randint(0, len(run.abar))
    alpha, sigma = run.alpha_sigma(t)
    x_t = paired_noising(x0, z, alpha, sigma)
    captions = drop_captions(batch["caption"], run.rng.rand() >= empty_prompt_prob)
    cond = with_pair_sizes(batch, run.encode_prompts(captions))
    x0_hat, _ = run.to_x0_eps(run.predict(run.unet, x_t, t, cond), x_t, t)
    return pseudo_huber(x0_hat, x0, huber_c), {}


def phase_bounds(phases: int, num_train_timesteps: int = 1000) -> tuple[list[int], list[int]]:
    """Phase starts s_k = T(k+1)/K − 1 and ends e_k = s_k − T/K clamped at 0.

    K = 4: starts [249, 499, 749, 999], ends [0, 249, 499, 749]."""
    width = num_train_timesteps // phases
    starts = [width * (k + 1) - 1 for k in range(phases)]
    starts[-1] = num_train_timesteps - 1
    return starts, [max(0, s - width) for s in starts]


def line_through(x_s, a_s, sig_s, x_e, a_e, sig_e) -> tuple[torch.Tensor, torch.Tensor]:
    """(x₀*, ε*) of the one DDIM path x_t = α_t x₀* + σ_t ε* through x_s and x_e (a straight line in (x/α, λ)),
    solved as a 2×2 system: no division by α, so α_s = 0 (zero terminal SNR) is fine."""
    det = a_s * sig_e - a_e * sig_s
    return (sig_e * x_s - sig_s * x_e) / det, (a_s * x_e - a_e * x_s) / det


@torch.no_grad()
def teacher_segment(run: Run, teacher, x_s, s, e, cond, uncond, guidance: float, steps: int) -> torch.Tensor:
    """The frozen teacher's guided DDIM from x_s at timesteps s down to e (per example), in ``steps`` steps."""
    x = x_s
    for j in range(steps):
        t_now = (s - (s - e) * j // steps)
        t_next = (s - (s - e) * (j + 1) // steps)
        x_in = torch.cat([x, x]).to(run.weight_dtype)
        out = run.predict(teacher, x_in, torch.cat([t_now, t_now]), type(cond).cat([uncond, cond]))
        out_u, out_c = out.chunk(2)
        x0, eps = run.to_x0_eps(out_u + guidance * (out_c - out_u), x, t_now)
        x = ddim_step(x0, eps, *run.alpha_sigma(t_next))
    return x


def phased_loss(run: Run, batch: dict, teacher, phases: int, guidance: float, huber_c: float,
                empty_prompt_prob: float) -> tuple[torch.Tensor, dict]:
    """Phased Rectified Diffusion: the student crosses a teacher's phase segment in one DDIM jump."""
    starts, ends = phase_bounds(phases, len(run.abar))
    x0 = run.latents(batch)
    phase = run.rng.randint(0, phases)
    s = torch.tensor(starts, device=run.device)[phase]
    e = torch.tensor(ends, device=run.device)[phase]
    (a_s, sig_s), (a_e, sig_e) = run.alpha_sigma(s), run.alpha_sigma(e)
    x_s = paired_noising(x0, run.rng.randn(*x0.shape[1:]), a_s, sig_s)
    captions = drop_captions(batch["caption"], run.rng.rand() >= empty_prompt_prob)
    cond, uncond = run.encode_prompts(captions), run.encode_prompts([""] * len(captions))
    x_e = teacher_segment(run, teacher, x_s, s, e, cond, uncond, guidance, max(1, TEACHER_GRID // phases))
    # the segment's straight DDIM path (its effective x₀* and ε*), and a point τ on it
    x0_star, eps_star = line_through(x_s, a_s, sig_s, x_e, a_e, sig_e)
    tau = run.rng.randint(e + 1, s + 1)
    x_tau = ddim_step(x0_star, eps_star, *run.alpha_sigma(tau))
    x0_hat, eps_hat = run.to_x0_eps(run.predict(run.unet, x_tau, tau, cond), x_tau, tau)
    x_e_hat = ddim_step(x0_hat, eps_hat, a_e, sig_e)
    return pseudo_huber(x_e_hat, x_e, huber_c), {}


# ---------------------------------------------------------------------------
# The method, for the engine


class RectifiedDiffusion(Method):
    name = "train-reflow"

    def __init__(self, *, phased: int = 0, huber_c: float = 0.001, empty_prompt_prob: float = 0.1,
                 beta_schedule: str | None = None, teacher_guidance: float | None = None,
                 sample_steps: int | None = None, sample_guidance: float = 1.5, allow_other_teacher: bool = False):
        check_empty_prompt_prob(empty_prompt_prob)
        check_number("--huber-c", huber_c, above=0)
        check_number("--teacher-guidance", teacher_guidance)
        check_number("--sample-guidance", sample_guidance)
        check_number("--sample-steps", sample_steps, low=1)
        self.phased = phased
        self.data_kinds = ("images", "pairs") if phased else ("pairs",)
        self.data_hints = {} if phased else {
            "images": "images train the phased variant (--phased K), or make pairs first with `dtk reflow-pairs`"}
        self.huber_c, self.empty_prompt_prob = huber_c, empty_prompt_prob
        self.beta_schedule, self.teacher_guidance = beta_schedule, teacher_guidance
        self.sample_steps, self.sample_guidance = sample_steps, sample_guidance
        self.allow_other_teacher = allow_other_teacher
        self.teacher = None
        if phased and (phased < 1 or TEACHER_GRID % phased):
            raise BadInput(f"--phased {phased}: must divide the {TEACHER_GRID}-step teacher grid (1, 2, 4, 5, 8, 10, 20, 40)")
        if teacher_guidance is not None and not phased:
            raise BadInput("--teacher-guidance goes with --phased (pairs were made with their own guidance)")
        if phased and beta_schedule:
            raise BadInput("--beta-schedule works on pairs only: the phased variant's online teacher runs on its own schedule")

    def check_data(self, data, run: Run) -> None:
        if self.phased:
            return
        from dtk.pairs import model_probe, probes_match

        settings = data.settings
        want = [run.model.unet.config.in_channels, run.resolution // run.model.vae_scale_factor,
                run.resolution // run.model.vae_scale_factor]
        if settings.get("latent_shape") != want:
            raise BadInput(f"--data {data.name}: pairs of latent shape {settings.get('latent_shape')} "
                           f"({settings.get('height')}x{settings.get('width')} px) but --model "
                           f"{run.model.ref.spec} at {run.resolution} px needs {want}")
        if settings.get("family") != run.family:
            raise BadInput(f"--data {data.name}: pairs from an {settings.get('family')} model, --model is {run.family}")
        if not self.allow_other_teacher and not probes_match(settings.get("probe", []), model_probe(run.model)):
            raise BadInput(f"--data {data.name}: the pairs were made by another model ({settings.get('model')}) "
                           f"than --model {run.model.ref.spec}; pass --allow-other-teacher to train on them anyway")

    def setup(self, run: Run) -> None:
        if self.beta_schedule:
            from dtk.diffusion.schedule import alphas_cumprod

            pipe = run.model.pipe
            pipe.scheduler = pipe.scheduler.from_config({**pipe.scheduler.config, "beta_schedule": self.beta_schedule})
            run.abar = alphas_cumprod(pipe.scheduler.config).to(run.device)
        if self.phased:
            if self.teacher_guidance is None:
                self.teacher_guidance = 7.5 if run.family == "sdxl" else 3.0  # LCM w = 6.5 / 2 (METHODS.md)
            self.teacher = run.frozen_copy() if run.config.full else None

    def loss(self, batch: dict, run: Run):
        if not self.phased:
            return pair_loss(run, batch, self.huber_c, self.empty_prompt_prob)
        # full fine-tuning: a frozen copy; LoRA: the same UNet with its adapter off (no second copy)
        teacher = self.teacher if self.teacher is not None else _AdapterOff(run)
        return phased_loss(run, batch, teacher, self.phased, self.teacher_guidance, self.huber_c,
                           self.empty_prompt_prob)

    def sampler(self, run: Run) -> dict:
        steps = self.sample_steps or (self.phased or 2)
        rec = {"scheduler": "ddim-trailing", "steps": steps, "guidance": self.sample_guidance}
        if self.beta_schedule:
            rec["schedule"] = {"beta_schedule": self.beta_schedule}
        return rec

    def describe(self) -> dict:
        return {"paper": "Rectified Diffusion (Wang et al., ICLR 2025)",
                "variant": f"phased, K={self.phased}" if self.phased else "pairs",
                "huber_c": self.huber_c, "empty_prompt_prob": self.empty_prompt_prob,
                "beta_schedule": self.beta_schedule or "teacher's",
                **({"teacher_guidance": self.teacher_guidance, "teacher_grid": TEACHER_GRID} if self.phased else {})}


class _AdapterOff:
    """Calls the trained UNet with its LoRA adapter switched off: the frozen base model as teacher."""

    def __init__(self, run: Run):
        self.run = run

    @property
    def module(self):
        """The UNet itself (for hooks on its blocks)."""
        return self.run.raw_unet

    def __call__(self, *args, **kwargs):
        with self.run.adapters_disabled() as base:
            return base(*args, **kwargs)
