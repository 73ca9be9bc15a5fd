"""Diffusion-DPO (Wallace et al., CVPR 2024), and Diffusion-NPO from pairs (the same loss, preferences reversed).

DPO's objective for a diffusion model replaces the intractable sequence
likelihood by the ε-errors at one shared noising of both images: with
m = ‖ε − ε_θ(x_t, t, c)‖² per image (mean over dimensions) for the policy
and r the same for the frozen reference,

    inside = −½β [(m^w − m^l) − (r^w − r^l)],    L = −mean log σ(inside).

At the start the policy is the reference: inside = 0, L = log 2 and the
implicit accuracy (pairs with inside > 0, ties ½) is 0.5. The
loss falls when the policy lowers the winner's error relative to the
loser's, more than the reference does. v-prediction models use the v target
the same way. ``--sft`` is the plain ε-loss on the winners (the paper's
baseline).

Diffusion-NPO trains a *negative* model: DPO with winner and loser swapped,
with some empty captions because the result serves the unconditional branch
of classifier-free guidance (``dtk sample --npo``). Its logs keep DPO's names:
"w" is then the image the NPO model is pushed towards, the dispreferred one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtk.diffusion.denoiser import Denoiser
from dtk.diffusion.schedule import output_for
from dtk.errors import BadInput, check_number
from dtk.methods.defaults import DPO, NPO_FROM_PAIRS, TRAINING
from dtk.methods.common import check_empty_prompt_prob, drop_captions
from dtk.train.state import Method, Run


def dpo_inside(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float) -> torch.Tensor:
    """−½β[(m^w − m^l) − (r^w − r^l)] per pair."""
    return -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))


def dpo_loss(inside: torch.Tensor) -> torch.Tensor:
    """−mean log σ(inside)."""
    return -F.logsigmoid(inside).mean()


def implicit_accuracy(inside: torch.Tensor) -> float:
    """Pairs the policy ranks right relative to the reference (inside > 0), ties ½: 0.5 at the start."""
    return float(((inside > 0).float() + 0.5 * (inside == 0).float()).mean())


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_errors(policy: Denoiser, reference: Denoiser, x_w: torch.Tensor, x_l: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor, cond):
    """(m^w, m^l, r^w, r^l): the policy's and the frozen reference's errors against the target the model predicts
    (ε, v or x₀) at one shared noising (t, ε) of the winner and the loser."""
    alpha, sigma = policy.alpha_sigma(t)
    x0 = torch.cat([x_w, x_l])
    t2, eps2 = t.repeat(2), eps.repeat(2, 1, 1, 1)
    a2, s2 = alpha.repeat(2, 1, 1, 1), sigma.repeat(2, 1, 1, 1)
    x_t = a2 * x0 + s2 * eps2
    target = output_for(x0, eps2, a2, s2, policy.prediction_type)
    cond2 = type(cond).cat([cond, cond])
    model_w, model_l = per_example_mse(policy.output(x_t, t2, cond2), target).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = per_example_mse(reference.output(x_t, t2, cond2), target).chunk(2)
    return model_w, model_l, ref_w, ref_l


def diffusion_dpo_loss(policy: Denoiser, reference: Denoiser, x_w, x_l, t, eps, cond, *, beta: float,
                       valid: torch.Tensor):
    """Diffusion-DPO: −mean log σ(−½β[(m^w − m^l) − (r^w − r^l)]) over the pairs; a pair marked not ``valid``
    (an undecodable image) counts 0 over a fixed denominator, the same under any split of the batch across
    processes. Returns (loss, inside, errors)."""
    errors = dpo_errors(policy, reference, x_w, x_l, t, eps, cond)
    inside = dpo_inside(*errors, beta)
    if bool(valid.all()):
        return dpo_loss(inside), inside, errors
    counted = torch.where(valid, inside, torch.zeros_like(inside))
    return -(F.logsigmoid(counted) * valid).sum() / len(valid), inside, errors


def sft_loss(policy: Denoiser, x_w: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond,
             valid: torch.Tensor) -> torch.Tensor:
    """The paper's supervised baseline (``--sft``): the plain diffusion loss on the winners."""
    alpha, sigma = policy.alpha_sigma(t)
    x_t = alpha * x_w + sigma * eps
    target = output_for(x_w, eps, alpha, sigma, policy.prediction_type)
    err = per_example_mse(policy.output(x_t, t, cond), target)
    return (err * valid).sum() / len(valid)   # a fixed denominator: the same under any process split


class DiffusionDPO(Method):
    name = "dpo"
    data_kinds = ("preferences",)

    def __init__(self, *, beta: float | None = None, sft: bool = False, empty_prompt_prob: float | None = None,
                 reverse: bool = False, strict: bool = False, pair_by: str | None = None, min_margin: float = 0.0,
                 name: str = "dpo"):
        """``reverse``: Diffusion-NPO from pairs; β and the empty-prompt probability default to the mode's
        (``dtk.methods.defaults``: DPO, NPO_FROM_PAIRS), as do the training settings."""
        defaults = NPO_FROM_PAIRS if reverse else DPO
        beta = defaults["beta"] if beta is None else beta
        empty_prompt_prob = defaults["empty_prompt_prob"] if empty_prompt_prob is None else empty_prompt_prob
        self.training_defaults = TRAINING["train-npo" if reverse else "dpo"]
        check_number("--beta", beta, above=0)
        if not min_margin >= 0:   # a negative margin would make pairs of ties
            raise BadInput(f"--min-margin {min_margin}: must be 0 or more")
        check_empty_prompt_prob(empty_prompt_prob)
        self.beta, self.sft, self.empty_prompt_prob, self.reverse = beta, sft, empty_prompt_prob, reverse
        self.strict, self.pair_by, self.min_margin = strict, pair_by, min_margin
        self.name = name
        self.reference = None

    def open_data(self, spec: str, *, resolution: int, allow_missing_captions: bool = False):
        from dtk.data.preferences import open_preferences

        return open_preferences(spec, resolution=resolution, strict=self.strict, pair_by=self.pair_by,
                                min_margin=self.min_margin)

    def check_data(self, data, run: Run) -> None:
        if run.family == "pixel":
            raise BadInput(f"--model {run.model.ref.spec}: {self.name} trains text-to-image (SD/SDXL) models")
        data.check_some_decode()

    def setup(self, run: Run) -> None:
        # full fine-tuning: a frozen copy in fp32, the policy's own precision, so that the two agree exactly at
        # the start (LoRA: the same UNet with the adapter off)
        self.reference = None if self.sft else run.base(dtype=torch.float32)

    def loss(self, batch: dict, run: Run):
        x_w, x_l = run.encode_images(batch["image_w"]), run.encode_images(batch["image_l"])
        if self.reverse:  # NPO: learn what was not preferred
            x_w, x_l = x_l, x_w
        t = run.rng.randint(0, len(run.abar))
        eps = run.rng.randn(*x_w.shape[1:])        # one t and one noise per pair, shared by both images
        cond = run.encode_prompts(drop_captions(batch["caption"], run.rng.rand() >= self.empty_prompt_prob))
        # a pair with an undecodable image counts for nothing (and is counted)
        valid = torch.tensor(batch.get("valid", [True] * len(x_w)), device=x_w.device)
        if self.sft:
            return sft_loss(run.student, x_w, t, eps, cond, valid), {}
        loss, inside, (model_w, model_l, ref_w, ref_l) = diffusion_dpo_loss(
            run.student, self.reference, x_w, x_l, t, eps, cond, beta=self.beta, valid=valid)
        # the same names every step (processes average them name by name), over the readable pairs (over
        # all when none is); unreadable: this micro-batch's count
        ok = valid if bool(valid.any()) else torch.ones_like(valid)
        logs = {"implicit_acc": implicit_accuracy(inside.detach()[ok]),
                "model_mse_w": float(model_w.detach()[ok].mean()), "model_mse_l": float(model_l.detach()[ok].mean()),
                "ref_mse_w": float(ref_w[ok].mean()), "ref_mse_l": float(ref_l[ok].mean()),
                "unreadable": float((~valid).sum())}
        return loss, logs

    def describe(self) -> dict:
        paper = ("Diffusion-NPO (negative preference optimisation, from pairs)" if self.reverse
                 else "Diffusion-DPO (Wallace et al., CVPR 2024)")
        return {"paper": paper, "beta": self.beta, "sft": self.sft, "empty_prompt_prob": self.empty_prompt_prob,
                "reversed_preferences": self.reverse, "pair_by": self.pair_by, "min_margin": self.min_margin}
