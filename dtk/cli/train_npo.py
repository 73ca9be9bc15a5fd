"""dtk train-npo — negative preference optimisation: a negative model for the unconditional branch of CFG."""

from __future__ import annotations

import click

from dtk.cli.common import config_option, model_option
from dtk.cli.dpo import PAIRS_HELP, preference_options
from dtk.methods.defaults import NPO_FROM_PAIRS, SELF_NPO, TRAINING
from dtk.cli.training import TRAIN_EPILOG, run_training, train_config, training_options

SELF = TRAINING["train-npo --self"]


@click.command("train-npo", short_help="Diffusion-NPO (from pairs) or Self-NPO: a negative LoRA for CFG.",
               epilog=TRAIN_EPILOG)
@model_option(help="The (positive) model the negative LoRA is made for [the demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--from-pairs", "from_pairs", is_flag=True,
              help="Diffusion-NPO: DPO with each pair's preference reversed; --data holds preference pairs.")
@click.option("--self", "self_npo", is_flag=True,
              help="Self-NPO: no labels; --data holds images (any image format) or a prompt list (.txt: the "
              "model's own samples are the images). Its defaults differ: --lr 1e-6, --ema-decay 0.999.")
@lambda f: preference_options(f, "--from-pairs: " + PAIRS_HELP + " --self: images (any image format dtk "
                               "trains on) or a prompt list (.txt).", "PAIRS|IMAGES|PROMPTS.txt")
@click.option("--beta", type=float, default=NPO_FROM_PAIRS["beta"], show_default=True,
              help="--from-pairs: β of the DPO loss (NPO: 500 SD1.5, 2000 SDXL).")
@click.option("--empty-prompt-prob", type=float, default=None,
              help="Captions replaced by the empty one (the result serves the empty-prompt branch) "
              f"[{NPO_FROM_PAIRS['empty_prompt_prob']:g}; --self: {SELF_NPO['empty_prompt_prob']:g}].")
@click.option("--teacher-guidance", type=float, default=None,
              help="Self-NPO: the EMA teacher's guidance w in ε_c + w(ε_c − ε_u) [−1 SD1.x, −5 SDXL].")
@click.option("--teacher-steps", type=int, default=SELF_NPO["teacher_steps"], show_default=True,
              help="Self-NPO: the teacher's DDIM steps on the 25-step grid.")
@click.option("--huber-c", type=float, default=SELF_NPO["huber_c"], show_default=True, help="Self-NPO: pseudo-Huber c.")
@click.option("--negative", type=click.Choice(["ema", "student"]), default=SELF_NPO["negative"], show_default=True,
              help="Self-NPO: which weights are the negative model: the student (what the public Self-NPO "
                   "code saves) or its EMA teacher.")
@click.option("--allow-missing-captions", is_flag=True,
              help="Self-NPO: images without captions train with the empty one.")
@training_options(**TRAINING["train-npo"], full=False,
                  mode_defaults={name: "--self: " + f"{SELF[name]:g}".replace("e-0", "e-") for name in ("lr", "ema_decay")})
@click.option("--full", is_flag=True, hidden=True)   # not offered, but explained when tried
@config_option
def command(model, model_config, from_pairs, self_npo, data, pair_by, min_margin, strict, beta, empty_prompt_prob,
            teacher_guidance, teacher_steps, huber_c, negative, allow_missing_captions, **kwargs):
    """Train a negative LoRA for the unconditional branch of classifier-free guidance.

    --from-pairs (Diffusion-NPO): the DPO loss with winner and loser swapped,
    so the LoRA learns what the raters disliked. --self (Self-NPO): no labels;
    an EMA teacher of the student runs a few DDIM steps with negative guidance
    from a noised image, and the student's conditional x̂₀ after re-noising is
    pulled to the teacher's (--ema-decay defaults to 0.999 and --lr to 1e-6).
    `dtk sample --npo OUT` then runs the unconditional/negative branch with the
    model plus this LoRA, ε_neg(x, ∅) + s(ε_pos(x, c) − ε_neg(x, ∅)); the output
    records its base model, so `dtk sample --npo OUT` alone suffices. LoRA only
    (its weights are a difference to the base).

    \b
    Examples:
      dtk train-npo --from-pairs --data pairs.parquet --out runs/npo --lora-targets to_q,to_k,to_v,to_out.0
      dtk train-npo --self --data images/ --out runs/self-npo --max-steps 1000
      dtk sample --npo runs/npo "a large red circle on a white background"
      dtk sample --model runs/dpo --npo runs/npo --npo-scale 0.8 "a small blue star"
    """
    from click.core import ParameterSource

    from dtk.errors import BadInput

    if from_pairs == self_npo:
        raise BadInput("choose one of --from-pairs (preference pairs) and --self (no labels)")
    if kwargs.get("full"):
        raise BadInput("--full: an NPO model is a LoRA on its base (dtk sample --npo adds it on the negative branch)")
    ctx = click.get_current_context()
    other_mode = (("--beta", "beta"), ("--pair-by", "pair_by"), ("--min-margin", "min_margin"), ("--strict", "strict")) \
        if self_npo else (("--teacher-guidance", "teacher_guidance"), ("--teacher-steps", "teacher_steps"),
                          ("--huber-c", "huber_c"), ("--negative", "negative"),
                          ("--allow-missing-captions", "allow_missing_captions"))
    given = [flag for flag, name in other_mode if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise BadInput(f"{', '.join(given)}: {'--from-pairs' if self_npo else '--self'}'s, not "
                       f"{'--self' if self_npo else '--from-pairs'}'s")
    if from_pairs:
        from dtk.methods.dpo import DiffusionDPO

        method = DiffusionDPO(beta=beta, empty_prompt_prob=empty_prompt_prob, reverse=True, strict=strict,
                              pair_by=pair_by, min_margin=min_margin, name="train-npo")
    else:
        from dtk.methods.self_npo import SelfNPO

        method = SelfNPO(teacher_guidance=teacher_guidance, teacher_steps=teacher_steps, huber_c=huber_c,
                         negative=negative, **({} if empty_prompt_prob is None else
                                               {"empty_prompt_prob": empty_prompt_prob}))
    run_training(method, train_config(kwargs, model=model, model_config=model_config, data=data,
                               allow_missing_captions=allow_missing_captions))
