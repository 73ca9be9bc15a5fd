"""Easy Consistency Tuning (Geng et al.) and Stable Consistency Tuning (Wang, Geng, Li, ICLR 2025): objectives.

Consistency training as TD learning along the ODE x_σ = x₀ + σε: the model's
output at a noisier point (t) is pulled to its own stop-gradient output at a
nearby less noisy point (r) on the same trajectory. ECT draws r from t with a
gap that shrinks in stages; SCT lowers the variance of the target by replacing
the single-sample estimate of the trajectory through x_t with the score
identity ∇log p_t(x_t) = E_{x₀|x_t}[∇log p_t(x_t | x₀)] over a reference set.

Notation as docs/methods.md, "tune-sct". The model is any VP UNet seen as an EDM
denoiser (``dtk.diffusion.edm``); the consistency function is that denoiser
(σ_min-shifted at sampling), or with K phases its jump to the phase's lower edge.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dtk.diffusion.edm import VPDenoiser, jump_to, phase_edge, phase_sigmas
from dtk.errors import BadInput, check_number
from dtk.methods.defaults import TRAINING
from dtk.train.state import Method, Run

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
    """Per example Δ = ‖f_t − f_r‖² (summed over dimensions, as ECT's code), L = w·(√(Δ + c²) − c); the mean."""
    delta = (f_t.float() - f_r.float()).pow(2).flatten(1).sum(1)
    return (weight * ((delta + huber_c**2).sqrt() - huber_c)).mean()


# ---------------------------------------------------------------------------
# The objective

SIGMA_MIN = 0.002


def consistency_tuning_loss(student: VPDenoiser, target_net: VPDenoiser, x0: torch.Tensor, cond, rng, *, stage: int,
                            boundaries: list[float], p_mean: float, p_std: float, sigma_max: float, q: float,
                            weighting: str, sigma_data: float, huber_c: float, references: torch.Tensor | None = None,
                            same_class: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """ECT/SCT on the EDM view of the model: f_θ(x_t, t) pulled to the stop-gradient f(x_r, r) on the same
    trajectory, r = t(1 − n(t)/q^(stage+1)); with ``references`` (SCT) x_r is the step along the posterior-mean
    score over them instead of the single-sample one. With phases, f is the jump to the phase's lower edge and
    r stays in t's phase."""
    t = ect_t(rng.randn(1).view(-1), p_mean, p_std).clamp(SIGMA_MIN, sigma_max)
    r = ect_r(t, stage, q)
    edge = phase_edge(t, boundaries)
    r = torch.maximum(r, edge)   # with phases, the target stays in t's phase
    eps = rng.randn(*x0.shape[1:])
    x_t = x0 + t.view(-1, 1, 1, 1) * eps
    if references is not None:
        x_r, _ = stable_point(x_t, t, r, references, same_class)
    else:
        x_r = x0 + r.view(-1, 1, 1, 1) * eps
    kwargs = cond.unet_kwargs()
    # the student's RNG use is undone afterwards, so the target draws the same dropout masks
    devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = jump_to(student(x_t, t, **kwargs), x_t, t, edge)
    with torch.no_grad():
        target = jump_to(target_net(x_r, r, **kwargs), x_r, r, edge)
        target = torch.where((r == 0).view(-1, 1, 1, 1), x_r, target)  # f(x, 0) = x, whatever the network
    loss = ect_loss(out, target, ect_weight(t, r, weighting, sigma_data), huber_c)
    return loss, {"stage": float(stage), "dt_over_t": float(((t - r) / t).mean())}


# ---------------------------------------------------------------------------
# The method, for the engine


class ConsistencyTuning(Method):
    """ECT, and SCT's changes as options (``target="stable"``, a reference bank, phases)."""

    name = "tune-sct"
    training_defaults = TRAINING["tune-sct"]
    data_kinds = ("images", "pairs")

    def __init__(self, *, target: str = "stable", bank_size: int = 0, phases: int = 1, q: float = 4.0,
                 double_every: int = 2000, p_mean: float = P_MEAN, p_std: float = P_STD, weighting: str = "edm",
                 huber_c: float = 0.06, sigma_data: float = 0.5, sigma_max: float = 80.0, t_mid: float | None = None,
                 sample_steps: int | None = None, guide_with: str | None = None, guidance: float = 1.0):
        if target not in ("ect", "stable"):
            raise BadInput(f"--target {target}: choose ect or stable")
        if weighting not in ("edm", "inv_dt"):
            raise BadInput(f"--weighting {weighting}: choose edm (1/t² + 1/σ_d²) or inv_dt (1/(t − r))")
        if phases < 1:
            raise BadInput(f"--phases {phases}: must be at least 1")
        if guidance != 1.0 and not guide_with:
            raise BadInput(f"--guidance {guidance:g}: needs --guide-with (the worse model that guides this one)")
        if bank_size and target != "stable":
            raise BadInput("--bank-size goes with --target stable (ECT's target uses no references)")
        for option, value, above in (("--q", q, None), ("--p-mean", p_mean, None), ("--p-std", p_std, 0),
                                     ("--huber-c", huber_c, 0), ("--sigma-data", sigma_data, 0),
                                     ("--sigma-max", sigma_max, 0), ("--t-mid", t_mid, 0), ("--guidance", guidance, None)):
            check_number(option, value, above=above)
        if not q > 1:
            raise BadInput(f"--q {q:g}: must be above 1 (Δt/t shrinks by q at each stage; q ≤ 1 never shrinks it)")
        if double_every < 1:
            raise BadInput(f"--double {double_every}: must be at least 1 (iterations per stage)")
        allowed = (1, 2) if phases == 1 else (phases,)
        if sample_steps is not None and sample_steps not in allowed:
            raise BadInput(f"--sample-steps {sample_steps}: a {phases}-phase consistency model samples with "
                           f"{' or '.join(map(str, allowed))} step(s)")
        self.target, self.bank_size, self.phases, self.q, self.double_every = target, bank_size, phases, q, double_every
        self.p_mean, self.p_std, self.weighting, self.huber_c = p_mean, p_std, weighting, huber_c
        self.sigma_data, self.sigma_max, self.t_mid, self.sample_steps = sigma_data, sigma_max, t_mid, sample_steps
        if guide_with and Path(guide_with).expanduser().exists():
            guide_with = str(Path(guide_with).expanduser().resolve())  # so dtk.json works from any directory
        self.guide_with, self.guidance = guide_with, guidance
        self.bank: torch.Tensor | None = None
        self.bank_labels: torch.Tensor | None = None
        self.denoiser = None
        self.boundaries: list[float] = []

    def check_data(self, data, run: Run) -> None:
        from dtk.diffusion.edm import WRAPPABLE

        if run.prediction_type not in WRAPPABLE:
            raise BadInput(f"--model {run.model.ref.spec}: prediction_type {run.prediction_type!r} cannot be wrapped "
                           f"as an EDM denoiser (supported: {', '.join(WRAPPABLE)})")
        if self.guide_with:
            from dtk.diffusion.loading import resolve_guide

            resolve_guide(self.guide_with, run.model.ref)  # before any training: it must load beside the result
        if self.bank_size and self.bank_size < run.config.batch_size:
            raise BadInput(f"--bank-size {self.bank_size}: smaller than the batch ({run.config.batch_size}); "
                           "the bank extends the batch as reference set")
        example = data[0]
        shape = tuple(run.latents({k: v.unsqueeze(0) if hasattr(v, "unsqueeze") else [v]
                                   for k, v in example.items()}).shape[1:])
        f = run.model.vae_scale_factor
        want = (run.model.unet.config.in_channels, run.resolution // f, run.resolution // f)
        if shape != want:
            raise BadInput(f"--data {data.name}: examples of shape {list(shape)}, the model takes {list(want)}")
        if self._class_conditional(run):
            captions = data.captions() if hasattr(data, "captions") else [example["caption"]]
            if not all(str(c).strip() for c in captions):
                raise BadInput(f"--data {data.name}: the model is class-conditional and some examples have no class "
                               "label (the caption holds the label: an index or a name its dtk.json lists)")

    @staticmethod
    def _class_conditional(run: Run) -> bool:
        return run.family == "pixel" and bool(run.model.unet.config.get("num_class_embeds"))

    def setup(self, run: Run) -> None:
        from dtk.diffusion.edm import vp_sigmas

        self.denoiser = run.online.edm()   # the stop-gradient target's pass
        self.sigma_max = min(self.sigma_max, float(vp_sigmas(run.abar)[-1]))  # what the model was trained to see
        self.boundaries = phase_sigmas(self.phases, SIGMA_MIN, self.sigma_max)

    def _captions(self, batch: dict, run: Run) -> list[str]:
        if run.family == "pixel" and not self._class_conditional(run):
            return [""] * len(batch["caption"])  # an unconditional model ignores captions
        return list(batch["caption"])

    def _references(self, x0: torch.Tensor, labels: torch.Tensor | None, run: Run):
        """The batch — every process's part of it, so that N processes use the reference set one process with the
        same global batch would, and keep the same bank — and the bank of earlier batches when there is one
        (then the batch joins the bank)."""
        if run.accelerator.num_processes > 1:
            x0 = run.accelerator.gather(x0.detach().contiguous())
            labels = None if labels is None else run.accelerator.gather(labels.contiguous())
        refs, ref_labels = x0, labels
        if self.bank is not None:
            refs = torch.cat([x0, self.bank.to(x0.device)])
            ref_labels = None if labels is None else torch.cat([labels, self.bank_labels.to(labels.device)])
        if self.bank_size:
            self.bank = refs[: self.bank_size].detach()
            self.bank_labels = None if ref_labels is None else ref_labels[: self.bank_size].detach()
        return refs, ref_labels

    def loss(self, batch: dict, run: Run):
        x0 = run.latents(batch)
        cond = run.encode_prompts(self._captions(batch, run))
        references = same_class = None
        if self.target == "stable":
            labels = cond.class_labels
            references, ref_labels = self._references(x0, labels, run)
            same_class = None if labels is None else labels[:, None] == ref_labels[None, :]
        return consistency_tuning_loss(
            run.student.edm(), self.denoiser, x0, cond, run.rng, stage=ect_stage(run.step, self.double_every),
            boundaries=self.boundaries, p_mean=self.p_mean, p_std=self.p_std, sigma_max=self.sigma_max, q=self.q,
            weighting=self.weighting, sigma_data=self.sigma_data, huber_c=self.huber_c, references=references,
            same_class=same_class)

    def sampler(self, run: Run) -> dict:
        steps = self.sample_steps or max(self.phases, 1)
        t_mid = self.t_mid if self.t_mid is not None else (self.boundaries[1] if self.phases > 1 else 1.526)
        guide = {"guide": self.guide_with} if self.guide_with else {}
        return {"scheduler": "consistency", "steps": steps, "guidance": self.guidance,
                "consistency": {"sigma_max": self.sigma_max, "sigma_min": SIGMA_MIN, "sigma_data": self.sigma_data,
                                "t_mid": t_mid, "boundaries": self.boundaries, **guide}}

    def state_dict(self) -> dict:
        if self.bank is None:
            return {}
        return {"bank": self.bank.cpu(), **({"bank_labels": self.bank_labels.cpu()} if self.bank_labels is not None
                                           else {})}

    def load_state_dict(self, state: dict) -> None:
        self.bank = state.get("bank")
        self.bank_labels = state.get("bank_labels")

    def describe(self) -> dict:
        return {"paper": "Stable Consistency Tuning (Wang, Geng, Li, ICLR 2025)" if self.target == "stable"
                else "Easy Consistency Tuning (Geng et al. 2024)", "target": self.target, "bank_size": self.bank_size,
                "phases": self.phases, "q": self.q, "double_every": self.double_every, "p_mean": self.p_mean,
                "p_std": self.p_std, "weighting": self.weighting, "huber_c": self.huber_c,
                "sigma_data": self.sigma_data, "sigma_max": self.sigma_max}  # the guide: dtk.json's sampler
