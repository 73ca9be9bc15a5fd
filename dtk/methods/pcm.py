"""Phased Consistency Models (Wang et al., NeurIPS 2024), with LCM beside it (``dtk.methods.lcm``).

The ODE is split into K phases; within a phase the model is a consistency
function that maps any point to the phase's lower edge, by a DDIM jump with
its own (x̂₀, ε̂) (so F(x_s, s, s) = x_s needs no c_skip/c_out). Sampling with K
steps visits the phase tops and is deterministic edge to edge.

One training step (docs/methods.md, "distill-pcm"):
  index ~ U{0..N−1}, t = grid[index], t' = t − 1000/N, s = edge(index);
  x_t = α_t x₀ + σ_t ε;
  student  = jump_s(x̂₀, ε̂ of θ at (x_t, t)) = α_s x̂₀ + σ_s ε̂;
  x_t'     = teacher DDIM step t → t' with CFG ε_c + w(ε_c − ε_u), w ~ U[w_min, w_max];
  target   = jump_s(sg x̂₀, ε̂ of θ at (x_t', t'));
  loss     = ρ(student, target)  (+ the adversarial term with --adversarial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dtk.diffusion.denoiser import Denoiser, Guided
from dtk.diffusion.schedule import ddim_step, timestep_grid
from dtk.errors import BadInput, check_number
from dtk.methods.defaults import TRAINING
from dtk.methods.common import check_empty_prompt_prob, drop_captions, pseudo_huber, with_pair_sizes
from dtk.train.state import Method, Run

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------
# The discretisation


def ddim_grid(n: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The N-step trailing DDIM grid, low to high: [1..N]·r − 1, r = T/N (N = 50: 19, 39, …, 999)."""
    return timestep_grid(n, num_train_timesteps)[::-1]


def phase_starts(n: int, k: int) -> list[int]:
    """Grid indices where the K phases start: floor(linspace(0, N, K, endpoint=False))."""
    return [math.floor(i * n / k) for i in range(k)]


def phase_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """(first, last) grid index of each phase; the last is its noisiest point, where K-step sampling enters it."""
    starts = phase_starts(n, k) + [n]
    return [(starts[p], starts[p + 1] - 1) for p in range(k)]


def phase_edges(n: int, k: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Each phase's lower edge: the timestep just below its first grid point (N=50, K=4: 0, 239, 499, 739)."""
    grid, r = ddim_grid(n, num_train_timesteps), num_train_timesteps // n
    return [max(0, grid[i] - r) for i in phase_starts(n, k)]


def edge_of(index: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The lower edge (a timestep) of the phase each grid index belongs to."""
    starts = torch.tensor(phase_starts(n, k), device=index.device)
    edges = torch.tensor(phase_edges(n, k), device=index.device)
    phase = (index[:, None] >= starts[None, :]).sum(1) - 1
    return edges[phase]


def sampling_timesteps(n: int, k: int, steps: int) -> list[int]:
    """Timesteps for ``steps`` sampling steps of a K-phase model: the phase tops (999, 739, 499, 239 for
    N=50, K=4), each phase split evenly on the grid for more steps, every ⌈K/steps⌉-th phase for fewer."""
    grid, tops = ddim_grid(n), phase_ranges(n, k)
    if steps < k:
        chosen = sorted({k - 1 - (j * k) // steps for j in range(steps)}, reverse=True)
        return [grid[tops[p][1]] for p in chosen]
    out = []
    for p in reversed(range(k)):
        sub = steps // k + (1 if (k - 1 - p) < steps % k else 0)  # the extra steps go to the noisiest phases
        first, last = tops[p]
        span = last - first + 1
        out += [grid[last - (j * span) // sub] for j in range(sub)]
    return out


def check_discretisation(n: int, k: int) -> None:
    if n < 1 or NUM_TRAIN_TIMESTEPS % n:
        raise BadInput(f"--ddim-steps {n}: must divide {NUM_TRAIN_TIMESTEPS} (e.g. 20, 25, 40, 50, 100)")
    if k < 1 or 2 * k > n:
        raise BadInput(f"--phases {k}: must be between 1 and --ddim-steps/2 = {n // 2}, so that every phase "
                       "has at least two grid steps")


# ---------------------------------------------------------------------------
# The objective


def edge_jump(x0: torch.Tensor, eps: torch.Tensor, schedule, s: torch.Tensor) -> torch.Tensor:
    """F(x_t, t, s) = α_s x̂₀ + σ_s ε̂: the DDIM jump to the edge s from the model's (x̂₀, ε̂) at x_t
    (F(x_s, s, s) = x_s). Both come from the prediction itself: rebuilding x̂₀ from ε̂ divides by α_t,
    which is 0 at t = 999 for a zero-terminal-SNR teacher."""
    a_s, s_s = schedule.alpha_sigma(s)
    return ddim_step(x0, eps, a_s, s_s)


def lcm_guided(teacher: Denoiser, w: torch.Tensor) -> Guided:
    """The teacher under CFG in the LCM convention ε_c + w(ε_c − ε_u), applied alike to x̂₀ (the same
    guidance, as x̂₀ is affine in ε̂ at a fixed x_t); ``w`` per example."""
    return Guided(teacher, w, convention="lcm", combine="x0_eps")


def consistency_distance(a: torch.Tensor, b: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    return pseudo_huber(a, b, huber_c) if loss == "huber" else torch.mean((a.float() - b.float()) ** 2)


@dataclass
class GridDraw:
    """One training draw on the N-step DDIM grid (shared by PCM and LCM): the point x_t at grid timestep t,
    the teacher's target timestep t' = t − T/N, its CFG weight w, and the conditioning."""

    x0: torch.Tensor
    index: torch.Tensor
    t: torch.Tensor
    t_prev: torch.Tensor
    x_t: torch.Tensor
    w: torch.Tensor
    cond: object
    uncond: object


def draw_on_grid(schedule, x0: torch.Tensor, captions: list[str], encode, rng, n: int, w_range: tuple[float, float],
                 cfg_solver: bool, empty_prompt_prob: float, index: torch.Tensor | None = None) -> GridDraw:
    """x_t at grid indices ``index`` (uniform over the grid when None) from the clean latents ``x0``."""
    r = NUM_TRAIN_TIMESTEPS // n
    index = rng.randint(0, n) if index is None else index
    t = (index + 1) * r - 1
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha * x0 + sigma * rng.randn(*x0.shape[1:])
    w = w_range[0] + (w_range[1] - w_range[0]) * rng.rand() if cfg_solver else torch.zeros(len(t), device=x0.device)
    captions = drop_captions(captions, rng.rand() >= empty_prompt_prob)
    cond, uncond = (encode(c) for c in (captions, [""] * len(captions)))
    return GridDraw(x0, index, t, (t - r).clamp(min=0), x_t, w, cond, uncond)


def concat_draws(a: GridDraw, b: GridDraw) -> GridDraw:
    cat = type(a.cond).cat
    return GridDraw(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("x0", "index", "t", "t_prev", "x_t", "w")),
                    cat([a.cond, b.cond]), cat([a.uncond, b.uncond]))


def phase_top_indices(rng, n: int, k: int, device="cpu") -> torch.Tensor:
    """The noisiest grid index of a uniformly drawn phase per example: where K-step sampling enters it."""
    tops = torch.tensor([last for _, last in phase_ranges(n, k)], device=device)
    return tops[rng.randint(0, k)]


@torch.no_grad()
def consistency_target(target_net: Denoiser, teacher: Denoiser, d: GridDraw, s: torch.Tensor) -> torch.Tensor:
    """The guided teacher's DDIM step t → t' followed by the model's own (stop-gradient) jump from t' to the
    edge s."""
    x_prev = lcm_guided(teacher, d.w).ddim_step(d.x_t, d.t, d.t_prev, d.cond, d.uncond)
    return edge_jump(*target_net(x_prev, d.t_prev, d.cond), target_net.schedule, s)


def pcm_loss(student: Denoiser, target_net: Denoiser, teacher: Denoiser, x0: torch.Tensor, captions: list[str],
             encode, rng, *, n: int, k: int, w_range: tuple[float, float], cfg_solver: bool, empty_prompt_prob: float,
             loss: str, huber_c: float, judge_phase_tops: bool = False, judged_target: bool = True):
    """PCM's consistency loss: ρ(F_θ(x_t, t, s), F_sg(θ)(x_t', t', s)) with x_t' the guided teacher's DDIM step
    from x_t. ``student`` is the pass with gradients, ``target_net`` the same weights without (the stop-gradient
    target), ``teacher`` the frozen base model.

    Returns (loss, judged), where judged = (student edge output, target or None, edge, cond, data latent) for
    the adversarial term: at the same draw, or with ``judge_phase_tops`` at a second draw from phase tops (one
    student forward for both draws)."""
    schedule = student.schedule
    d = draw_on_grid(schedule, x0, captions, encode, rng, n, w_range, cfg_solver, empty_prompt_prob)
    both = d
    if judge_phase_tops:
        top = draw_on_grid(schedule, x0, captions, encode, rng, n, w_range, cfg_solver, empty_prompt_prob,
                           index=phase_top_indices(rng, n, k, x0.device))
        both = concat_draws(d, top)
    s_all = edge_of(both.index, n, k)
    student_all = edge_jump(*student(both.x_t, both.t, both.cond), schedule, s_all)
    b = len(d.t)
    out, s = student_all[:b], s_all[:b]
    target = consistency_target(target_net, teacher, d, s)
    if judge_phase_tops:
        judged = (student_all[b:], consistency_target(target_net, teacher, top, s_all[b:]) if judged_target else None,
                  s_all[b:], top.cond, top.x0)
    else:
        judged = (out, target, s, d.cond, d.x0)
    return consistency_distance(out, target, loss, huber_c), judged


# ---------------------------------------------------------------------------
# The method, for the engine


class PhasedConsistency(Method):
    name = "distill-pcm"
    training_defaults = TRAINING["distill-pcm"]
    data_kinds = ("images", "pairs")

    def __init__(self, *, phases: int = 4, ddim_steps: int | None = None, cfg_range: tuple[float, float] | None = None,
                 cfg_solver: bool = True, empty_prompt_prob: float | None = None, loss: str = "huber",
                 huber_c: float = 0.001, adversarial: bool = False, adv_weight: float = 0.1, adv_lr: float = 1e-5,
                 adv_real: str = "target", adv_at: str = "draw", adv_span: int | None = None, adv_heads: int = 4,
                 method: str = "pcm", sample_guidance: float | None = None):
        check_empty_prompt_prob(empty_prompt_prob)
        for option, value, low, above in (("--ddim-steps", ddim_steps, 1, None), ("--huber-c", huber_c, None, 0),
                                          ("--adv-weight", adv_weight, 0, None), ("--adv-lr", adv_lr, None, 0),
                                          ("--sample-guidance", sample_guidance, None, None),
                                          *((("--cfg-range", w, None, None) for w in cfg_range or ()))):
            check_number(option, value, low=low, above=above)
        if method not in ("pcm", "lcm"):
            raise BadInput(f"--method {method}: choose pcm or lcm")
        self.method = method
        self.phases = 1 if method == "lcm" else phases
        self.ddim_steps = ddim_steps
        # checked now, before anything is loaded or overwritten (with SD1.x's default grid if none is given;
        # setup checks SDXL's default again)
        check_discretisation(ddim_steps if ddim_steps is not None else 50, self.phases)
        if cfg_range is not None and cfg_range[0] > cfg_range[1]:
            raise BadInput(f"--cfg-range {cfg_range[0]:g},{cfg_range[1]:g}: the minimum is above the maximum")
        if loss not in ("huber", "l2"):
            raise BadInput(f"--loss {loss}: choose huber or l2")
        if adversarial and method == "lcm":
            raise BadInput("--adversarial is PCM's: it does not apply to --method lcm")
        if adv_real not in ("target", "data"):
            raise BadInput(f"--adv-real {adv_real}: choose target or data")
        if adv_at not in ("draw", "phase-tops"):
            raise BadInput(f"--adv-at {adv_at}: choose draw or phase-tops")
        if not adversarial and ((adv_real, adv_at) != ("target", "draw") or adv_span is not None or adv_heads != 4):
            raise BadInput("--adv-real, --adv-at, --adv-span and --adv-heads shape the adversarial term; "
                           "add --adversarial")
        if adv_heads < 1:
            raise BadInput(f"--adv-heads {adv_heads}: must be 1 or more")
        # the paper judges anywhere in the phase above the edge: s' ~ U[s, s + T/K)
        full_span = NUM_TRAIN_TIMESTEPS // self.phases
        if adv_span is not None and not 1 <= adv_span <= full_span:
            raise BadInput(f"--adv-span {adv_span}: must be between 1 and 1000/--phases = {full_span}")
        self.cfg_range, self.cfg_solver = cfg_range, cfg_solver
        # the normal-CFG variant trains the unconditional branch too: 10% empty captions by default
        self.empty_prompt_prob = empty_prompt_prob if empty_prompt_prob is not None else (0.0 if cfg_solver else 0.1)
        self.loss_kind, self.huber_c = loss, huber_c
        self.adversarial, self.adv_weight, self.adv_lr, self.adv_real = adversarial, adv_weight, adv_lr, adv_real
        self.adv_at, self.adv_span = adv_at, adv_span if adv_span is not None else full_span
        self.adv_heads = adv_heads
        self.sample_guidance = sample_guidance
        self.teacher = None
        self.second_player = None   # the discriminator with --adversarial (dtk.methods.pcm_adversarial)
        self._teacher_guidance = 1.0

    def check_data(self, data, run: Run) -> None:
        kind = run.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise BadInput(f"--teacher {run.model.ref.spec}: prediction_type {kind!r} is not supported "
                           "(epsilon, v_prediction or sample)")
        captions = data.captions() if hasattr(data, "captions") else None
        if captions is not None and not any(captions):
            raise BadInput(f"--data {data.name}: no captions at all; distillation of a text-to-image teacher needs "
                           "captioned data")

    def setup(self, run: Run) -> None:
        if self.cfg_range is None:  # LCM/PCM defaults: w ∈ [4, 5] for SD1.x, [6, 7] for SDXL (docs/methods.md)
            self.cfg_range = (6.0, 7.0) if run.family == "sdxl" else (4.0, 5.0)
        if self.ddim_steps is None:  # N = 50, or 40 in PCM's SDXL script (docs/methods.md); LCM's SDXL script keeps 50
            self.ddim_steps = 40 if run.family == "sdxl" and self.method == "pcm" else 50
            check_discretisation(self.ddim_steps, self.phases)
        self._teacher_guidance = float(run.model.ref.sampler.get("guidance", 7.5))
        if self.adversarial and run.config.gradient_checkpointing and not run.config.full:
            # the LoRA teacher is the UNet with its adapter off for the forward pass only: a recomputed
            # (checkpointed) forward in the backward pass would see the adapter on
            raise BadInput("--adversarial with LoRA cannot use --gradient-checkpointing; drop one, or use --full")
        self.teacher = run.base()
        if self.adversarial:
            from dtk.methods.pcm_adversarial import AdversarialTerm, DiscriminatorHeads, feature_channels

            heads = DiscriminatorHeads(feature_channels(run.raw_unet), self.adv_heads).to(run.device)
            self.second_player = AdversarialTerm(heads, self.adv_lr)
            self.second_player.prepare(run.accelerator)
            self.second_player.teacher = self.teacher

    def loss(self, batch: dict, run: Run):
        def encode(captions):
            return with_pair_sizes(batch, run.encode_prompts(captions))

        loss, (student, target, s, cond, x0) = pcm_loss(
            run.student, run.online, self.teacher, run.latents(batch), batch["caption"], encode, run.rng,
            n=self.ddim_steps, k=self.phases, w_range=self.cfg_range, cfg_solver=self.cfg_solver,
            empty_prompt_prob=self.empty_prompt_prob, loss=self.loss_kind, huber_c=self.huber_c,
            judge_phase_tops=self.adversarial and self.adv_at == "phase-tops", judged_target=self.adv_real == "target")
        logs = {"consistency_loss": float(loss.detach())}
        if self.adversarial:
            from dtk.methods.pcm_adversarial import judged_pair, judging_timesteps

            # fake (the student's edge output) and real noised to the same s' ~ U[s, s + span) with the same
            # noise (span T/K in the paper; a shorter one judges only at low noise, where blur shows); real is
            # the consistency target (the paper), or with --adv-real data the data latent itself, which makes
            # D compare the student with the data (teacher samples, for reflow pairs) at s'
            s_to = judging_timesteps(run.rng, s, self.adv_span)
            noise = run.rng.randn(*student.shape[1:])
            real_is_data = self.adv_real == "data"
            fake, real = judged_pair(run.schedule, student, x0 if real_is_data else target, s, s_to, noise, real_is_data)
            g = self.second_player.generator_loss(fake, real, s_to, cond)
            loss = loss + self.adv_weight * g
            logs["g_loss"] = float(g.detach())
        return loss, logs

    def sampler(self, run: Run) -> dict:
        # explicit timesteps on the trained grid, for every step count the grid allows without repeats
        table = {}
        for m in range(1, 17):
            ts = sampling_timesteps(self.ddim_steps, self.phases, m)
            if len(set(ts)) == m:
                table[str(m)] = ts
        if self.method == "lcm":  # LCM's multistep sampling (re-noising) on the same grid, 4 steps where it has them
            steps = max(m for m in map(int, table) if m <= 4)
            return {"scheduler": "lcm", "steps": steps, "timesteps": table[str(steps)],
                    "guidance": self._recommended_guidance(), "timesteps_for_steps": table}
        return {"scheduler": "ddim", "timesteps": sampling_timesteps(self.ddim_steps, self.phases, self.phases),
                "guidance": self._recommended_guidance(), "timesteps_for_steps": table}

    def _recommended_guidance(self) -> float:
        if self.sample_guidance is not None:
            return self.sample_guidance
        return 1.0 if self.cfg_solver else self._teacher_guidance  # guidance is baked in, or still needed

    def state_dict(self) -> dict:
        return self.second_player.state_dict() if self.adversarial else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adversarial and state:
            try:
                self.second_player.load_state_dict(state)
            except RuntimeError:   # e.g. the one-head-per-feature discriminator of dtk before 4 heads
                raise BadInput("--resume: the checkpoint's discriminator heads do not fit this dtk's (made by "
                               "an earlier version?); start the run again") from None

    def describe(self) -> dict:
        paper = ("Latent Consistency Models (Luo et al. 2023)" if self.method == "lcm"
                 else "Phased Consistency Models (Wang et al., NeurIPS 2024)")
        return {"paper": paper, "method": self.method, "phases": self.phases, "ddim_steps": self.ddim_steps,
                "edges": phase_edges(self.ddim_steps, self.phases), "cfg_solver": self.cfg_solver,
                "cfg_range_lcm_w": list(self.cfg_range) if self.cfg_solver else None,
                "empty_prompt_prob": self.empty_prompt_prob, "loss": self.loss_kind, "huber_c": self.huber_c,
                "adversarial": self.adversarial, **({"adv_weight": self.adv_weight, "adv_lr": self.adv_lr,
                                                        "adv_real": self.adv_real, "adv_at": self.adv_at,
                                                        "adv_span": self.adv_span, "adv_heads": self.adv_heads}
                                                    if self.adversarial else {})}
