"""dtk train-npo — negative preference optimisation: a negative model for the unconditional branch of CFG."""

from __future__ import annotations

import click

from dtk.cli.common import config_option, model_option
from dtk.cli.dpo import preference_options
from dtk.cli.training import TRAIN_EPILOG, train_config, training_options


@click.command("train-npo", short_help="Diffusion-NPO: a negative LoRA from reversed preference pairs.",
               epilog=TRAIN_EPILOG)
@model_option(help="The (positive) model the negative LoRA is made for [the demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--from-pairs", "from_pairs", is_flag=True, required=True,
              help="Diffusion-NPO: DPO with each pair's preference reversed (the only mode so far).")
@preference_options
@click.option("--beta", type=float, default=500.0, show_default=True, help="β of the DPO loss (NPO: 500 SD1.5, "
              "2000 SDXL).")
@click.option("--empty-prompt-prob", type=float, default=0.2, show_default=True,
              help="Captions replaced by the empty one: the result serves the empty-prompt branch.")
@training_options(lr=5e-6, max_steps=2000, batch_size=4, lora_rank=8)
@config_option
def command(model, model_config, from_pairs, data, pair_by, min_margin, strict, beta, empty_prompt_prob, **kwargs):
    """Train a negative LoRA that has learned what the pairs' raters disliked (Diffusion-NPO).

    The DPO loss with winner and loser swapped, so the LoRA moves the model
    towards the dispreferred images; `dtk sample --npo OUT` then uses the model
    plus this LoRA on the unconditional/negative branch of classifier-free
    guidance, ε_neg(x, ∅) + s(ε_pos(x, c) − ε_neg(x, ∅)), and the model alone
    on the conditional one. The output records its base model, so `dtk sample
    --npo OUT` alone suffices. LoRA only (its weights are a difference to the
    base); public settings: rank 8 on attention, lr 5e-6, β 500 (SD1.5).

    \b
    Examples:
      dtk train-npo --from-pairs --data pairs.parquet --out runs/npo --lora-targets to_q,to_k,to_v,to_out.0
      dtk sample --npo runs/npo "a large red circle on a white background"
      dtk sample --model runs/dpo --npo runs/npo --npo-scale 0.8 "a small blue star"
    """
    from dtk.errors import BadInput
    from dtk.methods.dpo import DiffusionDPO
    from dtk.train.engine import train

    if kwargs.get("full"):
        raise BadInput("--full: an NPO model is a LoRA on its base (dtk sample --npo adds it on the negative branch)")
    method = DiffusionDPO(beta=beta, empty_prompt_prob=empty_prompt_prob, reverse=True, strict=strict,
                          pair_by=pair_by, min_margin=min_margin, name="train-npo")
    train(method, train_config(kwargs, model=model, model_config=model_config, data=data))
