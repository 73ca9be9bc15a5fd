"""dtk train-reflow — Rectified Diffusion on teacher pairs, or its phased variant on images."""

from __future__ import annotations

import click

from dtk.cli.common import config_option, model_option
from dtk.methods.defaults import TRAINING
from dtk.cli.training import TRAIN_EPILOG, run_training, train_config, training_options


@click.command("train-reflow", short_help="Rectified Diffusion: retrain on noise→sample pairs (or phased).",
               epilog=TRAIN_EPILOG)
@model_option(help="The model to retrain (diffusers dir, hub id, single file or dtk model dir) [the demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--data", required=True, metavar="PAIRS|IMAGES",
              help="A dtk reflow-pairs directory; with --phased, images (folder with .txt captions, JSONL, "
              "parquet or webdataset tars).")
@click.option("--phased", type=int, default=0, metavar="K",
              help="Phased variant with K phases on real images, online teacher (0 = train on pairs).")
@click.option("--teacher-guidance", type=float, default=None,
              help="Phased teacher CFG, diffusers convention [3.0 SD1.x, 7.5 SDXL = LCM's w 2 / 6.5].")
@click.option("--huber-c", type=float, default=0.001, show_default=True, help="Pseudo-Huber c (latent space).")
@click.option("--empty-prompt-prob", type=float, default=0.1, show_default=True,
              help="Caption dropout, so that CFG keeps working.")
@click.option("--beta-schedule", type=click.Choice(["scaled_linear", "linear"]), default=None,
              help="Retrain under another noise schedule [the teacher's]; recorded for sampling.")
@click.option("--sample-steps", type=int, default=None,
              help="Steps dtk.json recommends for sampling [2 on pairs, K phased].")
@click.option("--sample-guidance", type=float, default=1.5, show_default=True, help="Guidance dtk.json recommends.")
@click.option("--allow-other-teacher", is_flag=True, help="Train on pairs that another model made.")
@click.option("--allow-missing-captions", is_flag=True, help="Images without captions train with the empty one.")
@training_options(**TRAINING["train-reflow"])
@config_option
def command(model, model_config, data, phased, teacher_guidance, huber_c, empty_prompt_prob, beta_schedule,
            sample_steps, sample_guidance, allow_other_teacher, allow_missing_captions, **kwargs):
    """Retrain MODEL on matched (noise, sample) pairs from `dtk reflow-pairs`.

    Per step: t ~ U{0..999}, x_t = α_t x₀ + σ_t z with the pair's own noise z,
    and a pseudo-Huber loss on the predicted x₀. With --phased K and image
    --data, a frozen copy of the model runs guided DDIM across one of K
    phases and the model learns to cross it in one step. LoRA by default
    (--full for the paper's full fine-tune, e.g. --lr 5e-6 --ema-decay 0.9999).
    The exported dtk.json recommends DDIM with trailing spacing.

    \b
    Examples:
      dtk train-reflow --data pairs/ --out runs/reflow --max-steps 2000
      dtk train-reflow --data images/ --phased 4 --out runs/reflow-phased
      dtk sample --model runs/reflow --steps 1 "a large red circle on a white background"
    """
    from dtk.methods.reflow import RectifiedDiffusion

    method = RectifiedDiffusion(phased=phased, huber_c=huber_c, empty_prompt_prob=empty_prompt_prob,
                                beta_schedule=beta_schedule, teacher_guidance=teacher_guidance,
                                sample_steps=sample_steps, sample_guidance=sample_guidance,
                                allow_other_teacher=allow_other_teacher)
    run_training(method, train_config(kwargs, model=model, model_config=model_config, data=data,
                               allow_missing_captions=allow_missing_captions))
