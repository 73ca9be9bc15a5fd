"""dtk reflow-pairs — teacher noise→sample pairs for Rectified Diffusion."""

from __future__ import annotations

import click

from dtk.cli.common import (emit, config_option, device_options, model_option, prompt_inputs, seed_option,
                            shard_option, size_options)


@click.command("reflow-pairs", short_help="Noise→sample pairs from a teacher ODE (Rectified Diffusion data).")
@prompt_inputs
@model_option(help="The teacher: diffusers dir, hub id (local cache), single-file .safetensors or dtk model dir "
              "[the bundled demo model].")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--num", type=click.IntRange(min=1), default=None,
              help="Number of pairs; prompts are cycled [one per prompt].")
@click.option("--solver", type=click.Choice(["dpm-solver", "ddim", "euler"]), default="dpm-solver", show_default=True,
              help="Teacher ODE solver (dpm-solver: DPM-Solver order 2; ddim: trailing spacing); all start at t=999.")
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True, help="Solver steps.")
@click.option("--guidance", type=float, default=5.0, show_default=True,
              help="CFG scale, diffusers convention ε_u + s(ε_c − ε_u); ≤ 1 = no CFG.")
@click.option("--negative-prompt", default="", help="Unconditional prompt [empty].")
@seed_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Pairs per UNet batch.")
@click.option("--pairs-per-shard", type=click.IntRange(min=1), default=256, show_default=True,
              help="Pairs per output file (the unit of sharding and of skipping finished work).")
@size_options
@shard_option
@device_options
@click.option("--out", default="pairs", show_default=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace pairs made with other settings.")
@config_option
def command(prompt, prompts_file, model, model_config, num, solver, steps, guidance, negative_prompt, seed,
            batch_size, pairs_per_shard, height, width, shard, device, dtype, out, overwrite):
    """Run the teacher's ODE from noise for each prompt and store (noise, latent, prompt).

    Pair i uses prompt i mod P and noise seeded from (--seed, i): shards of a
    Slurm array (--shard, or SLURM_ARRAY_TASK_ID/COUNT) write disjoint files
    that train-reflow reads as one set, with the same bytes as one process.
    Finished shard files are skipped when the command is run again.
    Prints one JSON line per shard file.

    \b
    Examples:
      dtk reflow-pairs --prompts captions.txt --num 10000 --out pairs/
      dtk reflow-pairs --model sd15/ --prompts laion.txt --num 1000000 --shard 3/64 --out pairs/
    """
    from dtk.pairs import PairOptions, run_pairs
    from dtk.data.prompts import read_prompts
    from dtk.seeds import default_shard, parse_shard

    run_pairs(on_record=emit, opts=PairOptions(
        prompts=read_prompts(prompt, prompts_file), model=model, model_config=model_config, out=out, num=num,
        solver=solver, steps=steps, guidance=guidance, negative_prompt=negative_prompt, seed=seed,
        batch_size=batch_size, pairs_per_shard=pairs_per_shard, height=height, width=width,
        shard=parse_shard(shard) if shard else default_shard(), device=device, dtype=dtype, overwrite=overwrite,
    ))
