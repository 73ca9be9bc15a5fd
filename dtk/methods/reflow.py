"""Rectified Diffusion (Wang et al., ICLR 2025): retrain on the teacher's own noise→sample pairs.

The claim: what makes rectified flow work is training on *matched* pairs
(z, x₀) — the noise and the sample the pretrained ODE maps it to — so that
the first-order path between them is what the model learns. For an
ε-prediction model that path is x_t = α_t x₀ + σ_t z: curved in x, straight
in (x/α, λ), and a DDIM step follows it exactly once the model predicts z.

Two variants (docs/methods.md, "train-reflow"):

* on stored pairs: t ~ U{0..T−1}, x_t from the *paired* z, pseudo-Huber on x̂₀
  (the public code's x₀-space loss);
* phased (no stored pairs, real images): the ODE is cut into K phases; a
  frozen teacher runs a few guided DDIM steps across a phase [e, s] from a
  noised real latent, and the student learns to cross the segment in one
  DDIM jump from any point τ on it.
"""

from __future__ import annotations

import torch

from dtk.diffusion.denoiser import Denoiser, Guided
from dtk.diffusion.schedule import ddim_step
from dtk.errors import BadInput, check_number
from dtk.methods.defaults import TRAINING
from dtk.methods.common import check_empty_prompt_prob, drop_captions, pseudo_huber, with_pair_sizes
from dtk.train.state import Method, Run

TEACHER_GRID = 40   # DDIM steps over the whole ODE for the phased teacher (10 per phase at K = 4)


# ---------------------------------------------------------------------------
# The objectives, one screen each


def paired_noising(x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x₀ + σ_t z with the pair's own noise z (not a fresh draw)."""
    return alpha * x0 + sigma * z


def pair_loss(student: Denoiser, x0: torch.Tensor, z: torch.Tensor, captions: list[str], encode, rng, *,
              huber_c: float, empty_prompt_prob: float) -> torch.Tensor:
    """Rectified Diffusion on stored pairs (x₀, z): ρ(x̂₀(x_t, t), x₀), x_t = α_t x₀ + σ_t z, t ~ U{0..T−1}.

    ``encode`` turns captions into conditioning; ``rng`` makes the per-example draws."""
    t = rng.randint(0, len(student.schedule))
    alpha, sigma = student.alpha_sigma(t)
    x_t = paired_noising(x0, z, alpha, sigma)
    cond = encode(drop_captions(captions, rng.rand() >= empty_prompt_prob))
    x0_hat, _ = student(x_t, t, cond)
    return pseudo_huber(x0_hat, x0, huber_c)


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
def teacher_segment(teacher: Guided, x_s, s, e, cond, uncond, steps: int) -> torch.Tensor:
    """The guided teacher's DDIM from x_s at timesteps s down to e (per example), in ``steps`` steps."""
    x = x_s
    for j in range(steps):
        t_now = (s - (s - e) * j // steps)
        t_next = (s - (s - e) * (j + 1) // steps)
        x = teacher.ddim_step(x, t_now, t_next, cond, uncond)
    return x


def phased_loss(student: Denoiser, teacher: Guided, x0: torch.Tensor, captions: list[str], encode, rng, *,
                phases: int, huber_c: float, empty_prompt_prob: float) -> torch.Tensor:
    """Phased Rectified Diffusion: the student crosses a (guided, frozen) teacher's phase segment in one DDIM
    jump from any point τ on the segment's straight DDIM path."""
    schedule = student.schedule
    starts, ends = phase_bounds(phases, len(schedule))
    phase = rng.randint(0, phases)
    s = torch.tensor(starts, device=x0.device)[phase]
    e = torch.tensor(ends, device=x0.device)[phase]
    (a_s, sig_s), (a_e, sig_e) = schedule.alpha_sigma(s), schedule.alpha_sigma(e)
    x_s = paired_noising(x0, rng.randn(*x0.shape[1:]), a_s, sig_s)
    captions = drop_captions(captions, rng.rand() >= empty_prompt_prob)
    cond, uncond = encode(captions), encode([""] * len(captions))
    x_e = teacher_segment(teacher, x_s, s, e, cond, uncond, max(1, TEACHER_GRID // phases))
    # the segment's straight DDIM path (its effective x₀* and ε*), and a point τ on it
    x0_star, eps_star = line_through(x_s, a_s, sig_s, x_e, a_e, sig_e)
    tau = rng.randint(e + 1, s + 1)
    x_tau = ddim_step(x0_star, eps_star, *schedule.alpha_sigma(tau))
    x0_hat, eps_hat = student(x_tau, tau, cond)
    x_e_hat = ddim_step(x0_hat, eps_hat, a_e, sig_e)
    return pseudo_huber(x_e_hat, x_e, huber_c)


# ---------------------------------------------------------------------------
# The method, for the engine


class RectifiedDiffusion(Method):
    name = "train-reflow"
    training_defaults = TRAINING["train-reflow"]

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
        from dtk.diffusion.probe import model_probe, probes_match

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
                self.teacher_guidance = 7.5 if run.family == "sdxl" else 3.0  # LCM w = 6.5 / 2 (docs/methods.md, "train-reflow")
            self.teacher = run.base()

    def loss(self, batch: dict, run: Run):
        def encode(captions):
            return with_pair_sizes(batch, run.encode_prompts(captions))

        if not self.phased:
            x0, z = batch["latent"].to(run.device), batch["noise"].to(run.device)
            return pair_loss(run.student, x0, z, batch["caption"], encode, run.rng, huber_c=self.huber_c,
                             empty_prompt_prob=self.empty_prompt_prob), {}
        teacher = Guided(self.teacher, self.teacher_guidance, dtype=run.weight_dtype)
        return phased_loss(run.student, teacher, run.latents(batch), batch["caption"], run.encode_prompts, run.rng,
                           phases=self.phased, huber_c=self.huber_c, empty_prompt_prob=self.empty_prompt_prob), {}

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

