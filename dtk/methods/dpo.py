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

from dtk.diffusion.schedule import output_for
from dtk.errors import BadInput, check_number
from dtk.methods.reflow import check_empty_prompt_prob, drop_captions
from dtk.train.engine import Method, Run


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


class DiffusionDPO(Method):
    name = "dpo"
    data_kinds = ("preferences",)

    def __init__(self, *, beta: float = 5000.0, sft: bool = False, empty_prompt_prob: float = 0.0,
                 reverse: bool = False, strict: bool = False, pair_by: str | None = None, min_margin: float = 0.0,
                 name: str = "dpo"):
        check_number("--beta", beta, above=0)
        if not min_margin >= 0:   # a negative margin would make pairs of ties
            raise BadInput(f"--min-margin {min_margin}: must be 0 or more")
        check_empty_prompt_prob(empty_prompt_prob)
        self.beta, self.sft, self.empty_prompt_prob, self.reverse = beta, sft, empty_prompt_prob, reverse
        self.strict, self.pair_by, self.min_margin = strict, pair_by, min_margin
        self.name = name
        self.reference = None

    def open_data(self, spec: str, *, resolution: int, allow_missing_captions: bool = False):
        from dtk.train.preferences import open_preferences

        return open_preferences(spec, resolution=resolution, strict=self.strict, pair_by=self.pair_by,
                                min_margin=self.min_margin)

    def check_data(self, data, run: Run) -> None:
        if run.family == "pixel":
            raise BadInput(f"--model {run.model.ref.spec}: {self.name} trains text-to-image (SD/SDXL) models")
        data.check_some_decode()

    def setup(self, run: Run) -> None:
        # LoRA: the reference is the same UNet with the adapter off (no second copy in memory); full: a frozen
        # fp32 copy, the policy's own precision, so that the two agree exactly at the start
        if run.config.full and not self.sft:
            import copy

            self.reference = copy.deepcopy(run.raw_unet).requires_grad_(False).eval()

    def _reference(self, run: Run, x_t, t, cond) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return run.predict(self.reference, x_t, t, cond)
            with run.adapters_disabled() as unet:
                return run.predict(unet, x_t, t, cond)

    def loss(self, batch: dict, run: Run):
        from dtk.diffusion.conditioning import Conditioning

        x_w, x_l = run.encode_images(batch["image_w"]), run.encode_images(batch["image_l"])
        if self.reverse:  # NPO: learn what was not preferred
            x_w, x_l = x_l, x_w
        t = run.rng.randint(0, len(run.abar))
        eps = run.rng.randn(*x_w.shape[1:])        # one t and one noise per pair, shared by both images
        captions = drop_captions(batch["caption"], run.rng.rand() >= self.empty_prompt_prob)
        cond = run.encode_prompts(captions)
        alpha, sigma = run.alpha_sigma(t)
        # a pair with an undecodable image counts for nothing (and is counted)
        valid = torch.tensor(batch.get("valid", [True] * len(x_w)), device=x_w.device)
        if self.sft:
            x_t = alpha * x_w + sigma * eps
            target = output_for(x_w, eps, alpha, sigma, run.prediction_type)
            err = per_example_mse(run.predict(run.unet, x_t, t, cond), target)
            return (err * valid).sum() / len(valid), {}   # a fixed denominator: the same under any process split
        x0 = torch.cat([x_w, x_l])
        t2, eps2 = t.repeat(2), eps.repeat(2, 1, 1, 1)
        a2, s2 = alpha.repeat(2, 1, 1, 1), sigma.repeat(2, 1, 1, 1)
        x_t = a2 * x0 + s2 * eps2
        target = output_for(x0, eps2, a2, s2, run.prediction_type)   # ε, v or x₀, as the model predicts
        cond2 = Conditioning.cat([cond, cond])
        model_w, model_l = per_example_mse(run.predict(run.unet, x_t, t2, cond2), target).chunk(2)
        ref_w, ref_l = per_example_mse(self._reference(run, x_t, t2, cond2), target).chunk(2)
        inside = dpo_inside(model_w, model_l, ref_w, ref_l, self.beta)
        # the same names every step (processes average them name by name), over the readable pairs (over
        # all when none is); unreadable: this micro-batch's count
        ok = valid if bool(valid.any()) else torch.ones_like(valid)
        logs = {"implicit_acc": implicit_accuracy(inside.detach()[ok]),
                "model_mse_w": float(model_w.detach()[ok].mean()), "model_mse_l": float(model_l.detach()[ok].mean()),
                "ref_mse_w": float(ref_w[ok].mean()), "ref_mse_l": float(ref_l[ok].mean()),
                "unreadable": float((~valid).sum())}
        if bool(valid.all()):
            return dpo_loss(inside), logs
        inside = torch.where(valid, inside, torch.zeros_like(inside))
        # an unreadable pair counts as 0 over a fixed denominator (dividing by this micro-batch's readable
        # count would weight pairs by how the global batch was split across processes)
        return -(F.logsigmoid(inside) * valid).sum() / len(valid), logs

    def describe(self) -> dict:
        paper = ("Diffusion-NPO (negative preference optimisation, from pairs)" if self.reverse
                 else "Diffusion-DPO (Wallace et al., CVPR 2024)")
        return {"paper": paper, "beta": self.beta, "sft": self.sft, "empty_prompt_prob": self.empty_prompt_prob,
                "reversed_preferences": self.reverse, "pair_by": self.pair_by, "min_margin": self.min_margin}
