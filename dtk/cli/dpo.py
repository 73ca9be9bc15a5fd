"""dtk dpo — Diffusion-DPO on preference pairs."""

from __future__ import annotations

import click

from dtk.cli.common import config_option, model_option
from dtk.methods.defaults import DPO, TRAINING
from dtk.cli.training import TRAIN_EPILOG, run_training, train_config, training_options


PAIRS_HELP = ("Preference pairs: Pick-a-Pic-style parquet (caption, jpg_0, jpg_1, label_0; `dtk score --pairs-out` "
              "writes it), a datasets directory of those columns, or a scored JSONL manifest from `dtk score` "
              "(best vs worst per prompt).")


def preference_options(f, data_help: str = PAIRS_HELP, data_metavar: str = "PAIRS"):
    """The options of every command that reads preference pairs."""
    for option in reversed([
        click.option("--data", required=True, metavar=data_metavar, help=data_help),
        click.option("--pair-by", metavar="SCORE", default=None,
                     help="Scored JSONL: the score that orders each prompt's images [the first reward's; shapes/confidence for shapes]."),
        click.option("--min-margin", type=float, default=0.0, show_default=True,
                     help="Scored JSONL: best and worst must differ by more than this, else the pair is a tie."),
        click.option("--strict", is_flag=True, help="Stop at an image that cannot be decoded (else drop its pair)."),
    ]):
        f = option(f)
    return f


@click.command("dpo", short_help="Diffusion-DPO: preference optimisation on image pairs.", epilog=TRAIN_EPILOG)
@model_option(help="The model to tune (SD/SDXL: diffusers dir, hub id, single file or dtk model dir) [the demo].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@preference_options
@click.option("--beta", type=float, default=DPO["beta"], show_default=True,
              help="β of the DPO loss (paper: 2000 SD1.5, 5000 SDXL; LoRA recipes ~2500).")
@click.option("--empty-prompt-prob", type=float, default=DPO["empty_prompt_prob"], show_default=True,
              help="Captions replaced by the empty one (keeps classifier-free guidance working).")
@click.option("--sft", is_flag=True, help="Supervised baseline instead: the plain ε-loss on the preferred images.")
@training_options(**TRAINING["dpo"])
@config_option
def command(model, model_config, data, pair_by, min_margin, strict, beta, empty_prompt_prob, sft, **kwargs):
    """Tune MODEL towards the preferred image of each pair (Diffusion-DPO).

    Per pair one t and one noise for both images; with m and r the ε-errors of
    the model and of the frozen reference (for LoRA: the same UNet with the
    adapter off), L = −log σ(−½β[(m_w − m_l) − (r_w − r_l)]). Logs the loss
    (log 2 at the start), the implicit accuracy and both errors. Ties are
    dropped and counted; LoRA by default (--full for the paper's setting, e.g.
    --lr 2e-8 with a large batch).

    \b
    Examples:
      dtk sample --prompts prompts.txt --num-per-prompt 4 --out s | dtk score --pairs-out pairs.parquet
      dtk dpo --data pairs.parquet --out runs/dpo --max-steps 1000
      dtk sample --model runs/dpo "a large red circle on a white background"
    """
    from dtk.methods.dpo import DiffusionDPO

    method = DiffusionDPO(beta=beta, sft=sft, empty_prompt_prob=empty_prompt_prob, strict=strict, pair_by=pair_by,
                          min_margin=min_margin)
    run_training(method, train_config(kwargs, model=model, model_config=model_config, data=data))
