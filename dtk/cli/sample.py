"""dtk sample — text-to-image generation."""

from __future__ import annotations

import click

from dtk.cli.common import (emit, config_option, device_options, model_option, prompt_inputs, seed_option,
                            shard_option, size_options)

SCHEDULERS = ["ddim", "ddim-trailing", "ddpm", "euler", "euler-ancestral", "heun", "dpm++2m",
              "dpm++2m-karras", "dpm-solver", "unipc", "lcm", "tcd", "consistency"]


@click.command("sample", short_help="Generate images from prompts.")
@prompt_inputs
@model_option()
@click.option("--class", "classes", multiple=True, metavar="LABEL",
              help="Class label (index or name) of a class-conditional pixel-space model; repeatable, like a prompt.")
@click.option("--model-config", metavar="DIR", help="Diffusers config dir for a single-file --model (offline).")
@click.option("--num-per-prompt", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--negative-prompt", default="", help="Negative prompt for prompts that have none.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps [model's recommendation, else 25].")
@click.option("--guidance", type=float, default=None,
              help="CFG scale, diffusers convention ε_u + s(ε_c − ε_u); ≤ 1 disables CFG [model's, else 7.5].")
@click.option("--guidance-rule", type=click.Choice(["cfg", "scfg"]), default="cfg", show_default=True,
              help="cfg: one scale everywhere; scfg: S-CFG (Shen et al., CVPR 2024), a scale per semantic region "
              "from the UNet's attention maps, each region guided as strongly as the foreground (SD/SDXL, "
              "--guidance > 1).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None, help="Sampler [model's, else dpm++2m].")
@click.option("--timesteps", metavar="T1,T2,...", default=None,
              help="Explicit decreasing timesteps, e.g. 999,749,499,249 (ddim*, euler, dpm++2m, lcm, tcd, ddpm, heun).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA file or dir (diffusers/peft or kohya layout); repeatable.")
@click.option("--npo", metavar="DIR", help="A `dtk train-npo` model: the unconditional/negative branch of CFG uses "
              "the model plus its weights (two UNet evaluations per step). Alone, it also names the model.")
@click.option("--npo-scale", type=float, default=1.0, show_default=True, help="Weight A of the NPO LoRA.")
@click.option("--guide-with", metavar="MODEL",
              help="Consistency models: guide by this worse version of the model (SCT: an earlier snapshot), "
              "D_guide + s(D − D_guide) with s = --guidance [the model's dtk.json].")
@seed_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Images per UNet batch.")
@size_options
@shard_option
@device_options
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [a new one per run: samples, samples-2, ...; a sharded run needs --out].")
@click.option("--grid", is_flag=True, help="Also write a contact sheet grid.png.")
@click.option("--overwrite", is_flag=True, help="Replace a finished result in --out.")
@config_option
def command(prompt, prompts_file, model, classes, model_config, num_per_prompt, negative_prompt, steps, guidance,
            guidance_rule, scheduler, timesteps, loras, npo, npo_scale, guide_with, seed, batch_size, height, width, shard, device,
            dtype, out, grid, overwrite):
    """Generate images from PROMPT arguments or --prompts FILE.

    Writes OUT/NNNNNN.png (generation parameters in a PNG text chunk),
    OUT/samples.jsonl and OUT/dtk.json, and prints one JSON line per image.
    Defaults for scheduler, steps, timesteps and guidance come from the
    model's dtk.json when it has one.

    \b
    Examples:
      dtk sample "a large red circle on a white background"
      dtk sample --prompts prompts.txt --num-per-prompt 4 --out samples/ --grid
      dtk sample --model runs/pcm --steps 4 --guidance 1 "a small blue star"
      dtk sample --model runs/dpo --npo runs/npo "a large red circle on a white background"
    """
    from dtk.diffusion.lora import parse_lora_spec
    from dtk.diffusion.schedulers import parse_timesteps
    from dtk.data.prompts import read_prompts
    from dtk.sample import SampleOptions, run_sample
    from dtk.seeds import default_shard, parse_shard

    run_sample(on_record=emit, opts=SampleOptions(
        prompts=read_prompts(tuple(prompt) + tuple(classes), prompts_file, required=False),
        model=model, model_config=model_config, out=out, from_classes=bool(classes), num_per_prompt=num_per_prompt,
        negative_prompt=negative_prompt, steps=steps, guidance=guidance, guidance_rule=guidance_rule,
        scheduler=scheduler,
        timesteps=parse_timesteps(timesteps) if timesteps else None,
        loras=[parse_lora_spec(s) for s in loras], npo=npo, npo_scale=npo_scale, guide_with=guide_with,
        seed=seed, batch_size=batch_size,
        height=height, width=width, shard=parse_shard(shard) if shard else default_shard(),
        device=device, dtype=dtype, grid=grid, overwrite=overwrite,
    ))
