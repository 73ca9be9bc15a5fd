"""dtk tune-sct — Stable Consistency Tuning (ECT as the baseline beside it)."""

from __future__ import annotations

import click

from dtk.cli.common import config_option, model_option
from dtk.methods.defaults import TRAINING
from dtk.cli.training import TRAIN_EPILOG, run_training, train_config, training_options


@click.command("tune-sct", short_help="Stable Consistency Tuning (or ECT) of a diffusion model.", epilog=TRAIN_EPILOG)
@model_option(help="The model to tune: a pixel-space DDPM pipeline (unconditional or class-conditional), an SD/SDXL "
              "pipeline, hub id or dtk model dir [the demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--data", required=True, metavar="DATA",
              help="Images (folder with .txt labels/captions, JSONL, parquet, webdataset tars) or reflow pairs.")
@click.option("--target", type=click.Choice(["stable", "ect"]), default="stable", show_default=True,
              help="stable: SCT's variance-reduced target from the score identity; ect: ECT's x_r = x₀ + rε.")
@click.option("--bank-size", type=int, default=0, show_default=True,
              help="Reference set = the batch plus this many earlier examples (0: the batch alone).")
@click.option("--phases", type=int, default=1, show_default=True,
              help="K-phase (multistep) consistency: each phase maps to its lower edge; sampled with K steps.")
@click.option("--q", type=float, default=4.0, show_default=True, help="Δt/t shrinks by q per stage (ECT: 2 or 4).")
@click.option("--double", "double_every", type=int, default=2000, show_default=True,
              help="Iterations per stage of the Δt curriculum (ECT: 25k at full scale).")
@click.option("--p-mean", type=float, default=-0.8, show_default=True, help="lognormal t: mean of ln t.")
@click.option("--p-std", type=float, default=1.6, show_default=True, help="lognormal t: std of ln t.")
@click.option("--weighting", type=click.Choice(["edm", "inv_dt"]), default="edm", show_default=True,
              help="edm: 1/t² + 1/σ_d²; inv_dt: 1/(t − r).")
@click.option("--huber-c", type=float, default=0.06, show_default=True,
              help="Pseudo-Huber c on the per-example squared L2 distance (ECT: 0.06 ImageNet-64, 0 CIFAR: "
              "the L2 norm itself).")
@click.option("--sigma-data", type=float, default=0.5, show_default=True)
@click.option("--t-mid", type=float, default=None, help="σ of the re-noise for 2-step sampling [1.526].")
@click.option("--sample-steps", type=int, default=None, help="Steps dtk.json recommends [1, or K with phases].")
@click.option("--guide-with", metavar="MODEL",
              help="A worse version of this model (SCT: an earlier snapshot, e.g. a shorter run) that guides its "
              "sampling: D_guide + w(D − D_guide); recorded in dtk.json by absolute path.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="w of --guide-with guidance recorded for sampling (1: unguided).")
@click.option("--allow-missing-captions", is_flag=True,
              help="Images without captions (or class labels) train with the empty one; an unconditional model "
              "needs none.")
@training_options(**TRAINING["tune-sct"])
@config_option
def command(model, model_config, data, target, bank_size, phases, q, double_every, p_mean, p_std, weighting, huber_c,
            sigma_data, t_mid, sample_steps, guide_with, guidance, allow_missing_captions, **kwargs):
    """Tune MODEL into a consistency model (ECT), with SCT's variance-reduced target.

    The model is seen as an EDM denoiser D(x, σ) (ε-, v- or x₀-prediction);
    per step t ~ lognormal, r = t(1 − n(t)/q^(stage+1)) with the stage raised
    every --double iterations, x_t = x₀ + tε and the target sg f(x_r, r) from
    the same network with the same dropout masks; x_r = x₀ + rε (ECT) or
    SCT's x_t − (t − r)ε̂ with ε̂ from the posterior mean of x₀ over the
    reference set (same class only, for class-conditional models).
    Full fine-tuning is ECT's setting (--full); LoRA works too.
    `dtk sample --model OUT` samples in 1 step (or 2 with --steps 2; K with phases).

    \b
    Examples:
      dtk tune-sct --model ddpm-cifar10/ --data cifar-train/ --full --out runs/sct
      dtk tune-sct --model ddpm-cifar10/ --data cifar-train/ --full --target ect --out runs/ect
      dtk sample --model runs/sct --num-per-prompt 64 --grid
      dtk sample --model runs/sct --guide-with runs/sct-short --guidance 1.5 --class 3
    """
    from dtk.methods.sct import ConsistencyTuning

    method = ConsistencyTuning(target=target, bank_size=bank_size, phases=phases, q=q, double_every=double_every,
                               p_mean=p_mean, p_std=p_std, weighting=weighting, huber_c=huber_c,
                               sigma_data=sigma_data, t_mid=t_mid, sample_steps=sample_steps,
                               guide_with=guide_with, guidance=guidance)
    run_training(method, train_config(kwargs, model=model, model_config=model_config, data=data,
                               allow_missing_captions=allow_missing_captions))
