"""Phased Consistency Models (Wang et al., NeurIPS 2024), with LCM beside it (``dtk.methods.lcm``).

The ODE is split into K phases; within a phase the model is a consistency
function that maps any point to the phase's lower edge, by a DDIM jump with
its own (x̂₀, ε̂) (so F(x_s, s, s) = x_s needs no c_skip/c_out). Sampling with K
steps visits the phase tops and is deterministic edge to edge.

One training step (METHODS.md "distill-pcm"):
  index ~ U{0..N−1}, t = grid[index], t' = t − 1000/N, s = edge(index);
  x_t = α_t x₀ + σ_t ε;
  student  = jump_s(x̂₀, ε̂ of θ at (x_t, t)) = α_s x̂₀ + σ_s ε̂;
  x_t'     = teacher DDIM step t → t' with CFG ε_c + w(ε_c − ε_u), w ~ U[w_min, w_max];
  target   = jump_s(sg x̂₀, ε̂ of θ at (x_t', t'));
  loss     = ρ(student, target)  (+ the adversarial term with --adversarial).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from dtk.diffusion.schedule import ddim_step
from dtk.errors import BadInput, check_number
from dtk.methods.reflow import check_empty_prompt_prob, drop_captions, pseudo_huber, with_pair_sizes
from dtk.train.engine import Method, Run

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------
# The discretisation


def ddim_grid(n: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The N-step DDIM grid [1..N]·r − 1, r = T/N (N = 50: 19, 39, …, 999)."""
    r = num_train_timesteps // n
    return [(i + 1) * r - 1 for i in range(n)]


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


def edge_jump(x0: torch.Tensor, eps: torch.Tensor, run: Run, s: torch.Tensor) -> torch.Tensor:
    """F(x_t, t, s) = α_s x̂₀ + σ_s ε̂: the DDIM jump to the edge s from the model's (x̂₀, ε̂) at x_t
    (F(x_s, s, s) = x_s). Both come from the prediction itself: rebuilding x̂₀ from ε̂ divides by α_t,
    which is 0 at t = 999 for a zero-terminal-SNR teacher."""
    a_s, s_s = run.alpha_sigma(s)
    return ddim_step(x0, eps, a_s, s_s)


def x0_eps_of(run: Run, unet, x: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
    return run.to_x0_eps(run.predict(unet, x, t, cond), x, t)


@torch.no_grad()
def teacher_step(run: Run, teacher, x_t, t, t_prev, cond, uncond, w: torch.Tensor) -> torch.Tensor:
    """One DDIM step t → t' of the frozen teacher, CFG in the LCM convention ε_c + w(ε_c − ε_u) (and alike on
    x̂₀: the same guidance, as x̂₀ is affine in ε̂ at a fixed x_t)."""
    both = torch.cat([x_t, x_t])
    x0, eps = x0_eps_of(run, teacher, both, torch.cat([t, t]), type(cond).cat([uncond, cond]))
    w = w.view(-1, 1, 1, 1)
    (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
    a_p, s_p = run.alpha_sigma(t_prev)
    return ddim_step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), a_p, s_p)


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


def draw_on_grid(run: Run, batch: dict, n: int, w_range: tuple[float, float], cfg_solver: bool,
                 empty_prompt_prob: float, index: torch.Tensor | None = None,
                 x0: torch.Tensor | None = None) -> GridDraw:
    """x_t at grid indices ``index`` (uniform over the grid when None) from the batch's latents (or ``x0``)."""
    r = NUM_TRAIN_TIMESTEPS // n
    x0 = run.latents(batch) if x0 is None else x0
    index = run.rng.randint(0, n) if index is None else index
    t = (index + 1) * r - 1
    alpha, sigma = run.alpha_sigma(t)
    x_t = alpha * x0 + sigma * run.rng.randn(*x0.shape[1:])
    w = w_range[0] + (w_range[1] - w_range[0]) * run.rng.rand() if cfg_solver else torch.zeros(len(t), device=run.device)
    captions = drop_captions(batch["caption"], run.rng.rand() >= empty_prompt_prob)
    cond, uncond = (with_pair_sizes(batch, run.encode_prompts(c)) for c in (captions, [""] * len(captions)))
    return GridDraw(x0, index, t, (t - r).clamp(min=0), x_t, w, cond, uncond)


def concat_draws(a: GridDraw, b: GridDraw) -> GridDraw:
    cat = type(a.cond).cat
    return GridDraw(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("x0", "index", "t", "t_prev", "x_t", "w")),
                    cat([a.cond, b.cond]), cat([a.uncond, b.uncond]))


def phase_top_indices(run: Run, n: int, k: int) -> torch.Tensor:
    """The noisiest grid index of a uniformly drawn phase per example: where K-step sampling enters it."""
    tops = torch.tensor([last for _, last in phase_ranges(n, k)], device=run.device)
    return tops[run.rng.randint(0, k)]


def consistency_target(run: Run, d: GridDraw, teacher, s: torch.Tensor) -> torch.Tensor:
    """The teacher's DDIM step t → t' followed by the model's own (stop-gradient) jump from t' to the edge s."""
    x_prev = teacher_step(run, teacher, d.x_t, d.t, d.t_prev, d.cond, d.uncond, d.w)
    with torch.no_grad():
        return edge_jump(*x0_eps_of(run, run.raw_unet, x_prev, d.t_prev, d.cond), run, s)


def pcm_loss(run: Run, batch: dict, teacher, *, n: int, k: int, w_range: tuple[float, float], cfg_solver: bool,
             empty_prompt_prob: float, loss: str, huber_c: float, judge_phase_tops: bool = False,
             judged_target: bool = True):
    """PCM's consistency loss for one batch; returns (loss, logs, judged), where judged = (student edge output,
    target or None, edge, cond, data latent) for the adversarial term: at the same draw, or with
    ``judge_phase_tops`` at a second draw from phase tops (one student forward for both draws)."""
    d = draw_on_grid(run, batch, n, w_range, cfg_solver, empty_prompt_prob)
    both = d
    if judge_phase_tops:
        top = draw_on_grid(run, batch, n, w_range, cfg_solver, empty_prompt_prob,
                           index=phase_top_indices(run, n, k), x0=d.x0)
        both = concat_draws(d, top)
    s_all = edge_of(both.index, n, k)
    student_all = edge_jump(*x0_eps_of(run, run.unet, both.x_t, both.t, both.cond), run, s_all)
    b = len(d.t)
    student, s = student_all[:b], s_all[:b]
    target = consistency_target(run, d, teacher, s)
    if judge_phase_tops:
        judged = (student_all[b:], consistency_target(run, top, teacher, s_all[b:]) if judged_target else None,
                  s_all[b:], top.cond, top.x0)
    else:
        judged = (student, target, s, d.cond, d.x0)
    return consistency_distance(student, target, loss, huber_c), {}, judged


# ---------------------------------------------------------------------------
# The adversarial consistency loss


class DiscriminatorHead(nn.Module):
    """conv-GN-LeakyReLU, a second one with a residual around it, then a 1×1 conv to one logit channel
    (PCM's reference head)."""

    def __init__(self, c: int):
        super().__init__()
        groups = math.gcd(32, c)
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.LeakyReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.LeakyReLU())
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.conv1(f)
        return self.out(self.conv2(h) + h)


class DiscriminatorHeads(nn.Module):
    """Small trainable heads on the frozen teacher UNet's down/mid/up block features, ``per_feature`` of them
    on each (4, as PCM's reference code): one logit map each, judged position by position (a patch
    discriminator at every feature scale)."""

    def __init__(self, channels: list[int], per_feature: int = 4):
        super().__init__()
        self.heads = nn.ModuleList(nn.ModuleList(DiscriminatorHead(c) for _ in range(per_feature)) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``per_feature`` [B, 1, h, w] logit maps per feature."""
        return [h(f).float() for heads, f in zip(self.heads, features) for h in heads]


def block_features(run: Run, unet, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
    """Outputs of every down block, the mid block and every up block of ``unet`` at (x, t)."""
    base = getattr(unet, "module", unet)
    blocks = [*base.down_blocks, base.mid_block, *base.up_blocks]
    found: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: found.append((o[0] if isinstance(o, tuple) else o).float()))
             for b in blocks]
    try:
        run.predict(unet, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return found


def feature_channels(unet) -> list[int]:
    c = unet.config.block_out_channels
    return [*c, c[-1], *reversed(c)]


def renoise(x_s: torch.Tensor, s: torch.Tensor, s_to: torch.Tensor, noise: torch.Tensor, run: Run) -> torch.Tensor:
    """Forward diffusion from timestep s to s' ≥ s: q(x_s' | x_s) = N(√(ᾱ_s'/ᾱ_s) x_s, (1 − ᾱ_s'/ᾱ_s) I)."""
    (a_s, _), (a_to, _) = run.alpha_sigma(s), run.alpha_sigma(s_to)
    ratio = a_to / a_s
    return ratio * x_s + (1 - ratio**2).clamp(min=0).sqrt() * noise


def judging_timesteps(run: Run, s: torch.Tensor, span: int) -> torch.Tensor:
    """Where the discriminator judges each example: s' ~ U{s, …, s + span − 1}, at most T − 1."""
    return (s + (run.rng.rand() * span).long()).clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def hinge_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss per position, averaged over positions, then over heads: 2 for an undecided D."""
    return torch.stack([torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake)]).mean()


def hinge_g_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """The generator's hinge: push every position's fake logit up to the margin (no reward beyond it)."""
    return torch.stack([torch.relu(1 - f).mean() for f in fake]).mean()


# ---------------------------------------------------------------------------
# The method, for the engine


class PhasedConsistency(Method):
    name = "distill-pcm"
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
        self.heads = self.d_optimizer = None
        self._for_discriminator: list[tuple] = []   # one (fake, real, s', cond) per micro-batch of the step
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
        if self.cfg_range is None:  # LCM/PCM defaults: w ∈ [4, 5] for SD1.x, [6, 7] for SDXL (METHODS.md)
            self.cfg_range = (6.0, 7.0) if run.family == "sdxl" else (4.0, 5.0)
        if self.ddim_steps is None:  # N = 50, or 40 in PCM's SDXL script (METHODS.md); LCM's SDXL script keeps 50
            self.ddim_steps = 40 if run.family == "sdxl" and self.method == "pcm" else 50
            check_discretisation(self.ddim_steps, self.phases)
        self._teacher_guidance = float(run.model.ref.sampler.get("guidance", 7.5))
        if self.adversarial and run.config.gradient_checkpointing and not run.config.full:
            # the LoRA teacher is the UNet with its adapter off for the forward pass only: a recomputed
            # (checkpointed) forward in the backward pass would see the adapter on
            raise BadInput("--adversarial with LoRA cannot use --gradient-checkpointing; drop one, or use --full")
        self.teacher = run.frozen_copy() if run.config.full else None
        if self.adversarial:
            self.heads = DiscriminatorHeads(feature_channels(run.raw_unet), self.adv_heads).to(run.device)
            self.d_optimizer = torch.optim.AdamW(self.heads.parameters(), lr=self.adv_lr, betas=(0.0, 0.999))
            self.heads, self.d_optimizer = run.accelerator.prepare(self.heads, self.d_optimizer)

    def _teacher(self, run: Run):
        from dtk.methods.reflow import _AdapterOff

        return self.teacher if self.teacher is not None else _AdapterOff(run)

    def loss(self, batch: dict, run: Run):
        if self.method == "lcm":
            from dtk.methods.lcm import lcm_loss

            return lcm_loss(run, batch, self._teacher(run), n=self.ddim_steps, w_range=self.cfg_range,
                            cfg_solver=self.cfg_solver, empty_prompt_prob=self.empty_prompt_prob,
                            loss=self.loss_kind, huber_c=self.huber_c)
        loss, logs, (student, target, s, cond, x0) = pcm_loss(
            run, batch, self._teacher(run), n=self.ddim_steps, k=self.phases, w_range=self.cfg_range,
            cfg_solver=self.cfg_solver, empty_prompt_prob=self.empty_prompt_prob, loss=self.loss_kind,
            huber_c=self.huber_c, judge_phase_tops=self.adversarial and self.adv_at == "phase-tops",
            judged_target=self.adv_real == "target")
        logs["consistency_loss"] = float(loss.detach())
        if self.adversarial:
            # fake (the student's edge output) and real noised to the same s' ~ U[s, s + span) with the same
            # noise (span T/K in the paper; a shorter one judges only at low noise, where blur shows); real is
            # the consistency target (the paper), or with --adv-real data the data latent itself, which makes
            # D compare the student with the data (teacher samples, for reflow pairs) at s'
            s_to = judging_timesteps(run, s, self.adv_span)
            noise = run.rng.randn(*student.shape[1:])
            fake = renoise(student, s, s_to, noise, run)
            if self.adv_real == "data":   # from the clean data: t = −1 is ᾱ = 1 (Run.alpha_sigma)
                real = renoise(x0, torch.full_like(s, -1), s_to, noise, run)
            else:
                real = renoise(target, s, s_to, noise, run)
            self.heads.requires_grad_(False)
            g = hinge_g_loss(self.heads(block_features(run, self._teacher(run), fake, s_to, cond)))
            self.heads.requires_grad_(True)
            loss = loss + self.adv_weight * g
            logs["g_loss"] = float(g.detach())
            self._for_discriminator.append((fake.detach(), real.detach(), s_to, cond))
        return loss, logs

    def after_step(self, run: Run) -> dict:
        """The discriminator's step, alternating with the student's: hinge loss on real vs fake, over every
        micro-batch the student saw in this step (gradients accumulated as the student's are)."""
        judged, self._for_discriminator = self._for_discriminator, []
        if not self.adversarial or not judged:
            return {}
        teacher, total = self._teacher(run), 0.0
        for i, (fake, real, s_to, cond) in enumerate(judged):
            with torch.no_grad(), run.accelerator.autocast():  # the frozen teacher is in the weight dtype
                f_fake = block_features(run, teacher, fake, s_to, cond)
                f_real = block_features(run, teacher, real, s_to, cond)
            last = i == len(judged) - 1
            with contextlib.nullcontext() if last else run.accelerator.no_sync(self.heads):
                with run.accelerator.autocast():
                    d = hinge_d_loss(self.heads(f_real), self.heads(f_fake))
                run.accelerator.backward(d / len(judged))
            total += float(d.detach())
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        return {"d_loss": total / len(judged)}

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
        if not self.adversarial:
            return {}
        heads = getattr(self.heads, "module", self.heads)
        return {"heads": heads.state_dict(), "d_optimizer": self.d_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.adversarial and state:
            try:
                getattr(self.heads, "module", self.heads).load_state_dict(state["heads"])
            except RuntimeError:   # e.g. the one-head-per-feature discriminator of dtk before 4 heads
                raise BadInput("--resume: the checkpoint's discriminator heads do not fit this dtk's (made by "
                               "an earlier version?); start the run again") from None
            self.d_optimizer.load_state_dict(state["d_optimizer"])

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
