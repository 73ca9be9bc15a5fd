"""dtk distill-pcm — Phased Consistency Model distillation (and LCM, its baseline)."""

from __future__ import annotations

import click

from dtk.cli.common import comma_option, config_option, model_option
from dtk.methods.defaults import TRAINING
from dtk.cli.training import TRAIN_EPILOG, run_training, train_config, training_options


@click.command("distill-pcm", short_help="Phased Consistency Model distillation (or LCM) of a teacher.",
               epilog=TRAIN_EPILOG)
@model_option("--teacher", help="The model to distil (diffusers dir, hub id, single file or dtk model dir) "
              "[the demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --teacher (offline).")
@click.option("--data", required=True, metavar="DATA",
              help="Captioned images (folder with .txt, JSONL, parquet, webdataset tars) or a dtk reflow-pairs dir.")
@click.option("--method", type=click.Choice(["pcm", "lcm"]), default="pcm", show_default=True,
              help="pcm, or lcm: one phase with LCM's boundary scalings and stochastic multistep sampling.")
@click.option("--phases", type=int, default=4, show_default=True, help="K phases of the ODE (PCM).")
@click.option("--ddim-steps", type=int, default=None,
              help="N: the teacher's DDIM grid [50; 40 for PCM on SDXL, as PCM's SDXL script].")
@click.option("--cfg-range", callback=comma_option(float, count=2, expect="W_MIN,W_MAX, e.g. 4,5"), default=None, metavar="W_MIN,W_MAX",
              help="Teacher CFG w ~ U[W_MIN, W_MAX] in the LCM convention ε_c + w(ε_c − ε_u) "
              "(= diffusers scale 1 + w) [4,5 for SD1.x, 6,7 for SDXL].")
@click.option("--no-cfg-solver", is_flag=True,
              help="The normal-CFG variant: a plain teacher step (w = 0) and caption dropout, so the result keeps "
              "working with CFG and negative prompts (use --phases ≥ 4).")
@click.option("--empty-prompt-prob", type=float, default=None,
              help="Caption dropout [0.1 with --no-cfg-solver, else 0].")
@click.option("--loss", type=click.Choice(["huber", "l2"]), default="huber", show_default=True)
@click.option("--huber-c", type=float, default=0.001, show_default=True, help="Pseudo-Huber c (latent space).")
@click.option("--adversarial", is_flag=True,
              help="Add PCM's adversarial consistency loss: discriminator heads on the frozen teacher's features.")
@click.option("--adv-weight", type=float, default=0.1, show_default=True, help="Weight of the generator's hinge loss.")
@click.option("--adv-lr", type=float, default=1e-5, show_default=True, help="Discriminator learning rate.")
@click.option("--adv-real", type=click.Choice(["target", "data"]), default="target", show_default=True,
              help="What the discriminator takes as real: the consistency target (the paper), or the data latents "
              "noised to the same timestep (for reflow pairs: the teacher's own samples).")
@click.option("--adv-at", type=click.Choice(["draw", "phase-tops"]), default="draw", show_default=True,
              help="Where the adversarial term judges the student: at the consistency loss's own draw (the paper), "
              "or at a second draw from the noisiest grid point of a random phase, where K-step sampling starts "
              "(for 1-step quality: K=1 judges the jump from t=999).")
@click.option("--adv-span", type=int, default=None,
              help="The discriminator judges at s' ~ U[edge, edge + N): a smaller N judges only at low noise, where "
              "blur shows [1000/K, the paper: the whole phase].")
@click.option("--adv-heads", type=int, default=4, show_default=True,
              help="Discriminator heads per teacher feature (PCM's reference: 4; for SD1.5 that is 660M trainable "
              "parameters, 170M with 1).")
@click.option("--sample-guidance", type=float, default=None,
              help="Guidance dtk.json recommends [1 (guidance distilled), the teacher's with --no-cfg-solver].")
@click.option("--allow-missing-captions", is_flag=True, help="Images without captions train with the empty one.")
@training_options(**TRAINING["distill-pcm"])
@config_option
def command(teacher, model_config, data, method, phases, ddim_steps, cfg_range, no_cfg_solver, empty_prompt_prob,
            loss, huber_c, adversarial, adv_weight, adv_lr, adv_real, adv_at, adv_span, adv_heads,
            sample_guidance, allow_missing_captions, **kwargs):
    """Distil TEACHER into a few-step model with Phased Consistency Models.

    The ODE on an N-step DDIM grid is cut into K phases; the model learns to
    jump from any point of a phase to its lower edge (a DDIM jump with its own
    ε̂), with targets from one guided teacher DDIM step and its own prediction
    there. The exported dtk.json recommends DDIM over the exact phase tops
    (N=50, K=4: 999,739,499,239) and the guidance of the variant, so
    `dtk sample --model OUT --steps 1|2|4|8` needs nothing else.
    LoRA rank 64 by default (alpha = rank: scale 1, recorded in the export).

    \b
    Examples:
      dtk distill-pcm --data images/ --out runs/pcm
      dtk distill-pcm --data pairs/ --phases 1 --adversarial --out runs/pcm-1step
      dtk distill-pcm --data images/ --method lcm --out runs/lcm
      dtk sample --model runs/pcm --steps 4 "a large red circle on a white background"
    """
    from dtk.errors import BadInput
    from dtk.methods.lcm import LatentConsistency
    from dtk.methods.pcm import PhasedConsistency

    kind = LatentConsistency if method == "lcm" else PhasedConsistency
    pcm = kind(phases=phases, ddim_steps=ddim_steps, cfg_range=cfg_range, cfg_solver=not no_cfg_solver,
                            empty_prompt_prob=empty_prompt_prob, loss=loss, huber_c=huber_c, adversarial=adversarial,
                            adv_weight=adv_weight, adv_lr=adv_lr, adv_real=adv_real, adv_at=adv_at, adv_span=adv_span,
                            adv_heads=adv_heads, sample_guidance=sample_guidance)
    try:
        run_training(pcm, train_config(kwargs, model=teacher, model_config=model_config, data=data,
                                allow_missing_captions=allow_missing_captions))
    except BadInput as e:   # the loaders name the engine's --model; this command calls it --teacher
        if str(e).startswith("--model "):
            e.args = ("--teacher " + str(e)[len("--model "):],)
        raise
