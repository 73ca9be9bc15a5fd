"""dtk eval — benchmark models: quality vs number of steps."""

from __future__ import annotations

import click

from dtk.cli.common import comma_option, emit, config_option, device_options
from dtk.cli.sample import SCHEDULERS


@click.command("eval", short_help="Benchmark models: quality vs number of steps.")
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Model to benchmark (repeatable); default: the demo model.")
@click.option("--steps", default="1,2,4,8,25", show_default=True, callback=comma_option(int, expect="comma-separated integers, e.g. 1,2,4,8,25", low=1), metavar="N1,N2,...",
              help="Step counts.")
@click.option("--num-images", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Benchmark images per model and step count.")
@click.option("--teacher", default=None, metavar="MODEL",
              help="Reference for FD-teacher (its 25-step samples) [the demo model; with --prompts, the first "
                   "--model's base model, or that model itself].")
@click.option("--baseline", default=None, metavar="MODEL", help="Model to compute win rates against.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
              help="Sampler for every model [each model's recommendation].")
@click.option("--guidance", type=float, default=None, help="CFG scale for every model [each model's].")
@click.option("--prompts", default=None, metavar="FILE",
              help="Prompt benchmark for real models (CLIP features and score) instead of the shapes benchmark.")
@click.option("--real-dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Real images for FD-real on the prompt benchmark.")
@click.option("--clip-model", default="openai/clip-vit-large-patch14", show_default=True, metavar="PATH|ID",
              help="CLIP for the prompt benchmark.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@device_options
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [a new one per run: eval, eval-2, ...].")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "md"]), default="jsonl", show_default=True,
              help="stdout: one JSON line per (model, steps), or a markdown table.")
@click.option("--overwrite", is_flag=True, help="Replace a finished result in --out.")
@config_option
def command(models, steps, num_images, teacher, baseline, scheduler, guidance, prompts, real_dir, clip_model,
            batch_size, device, dtype, out, fmt, overwrite):
    """Sample every model at every step count on a fixed benchmark and measure quality.

    Writes OUT/eval.json, OUT/eval.md, OUT/plot.png and OUT/grid-MODEL.png;
    prints the table on stderr and one JSON line per (model, steps) on stdout.

    \b
    Examples:
      dtk eval --scheduler ddim --steps 1,2,4,8,25 --out eval/teacher
      dtk eval --model runs/pcm --model runs/lcm --baseline demo --format md
    """
    from dtk.evaluate import EvalOptions, run_eval

    run_eval(on_record=emit, opts=EvalOptions(models=list(models) or ["demo"], steps=steps, out=out, num_images=num_images,
                         teacher=teacher, baseline=baseline, scheduler=scheduler, guidance=guidance,
                         prompts=prompts, real_dir=real_dir, clip_model=clip_model, batch_size=batch_size,
                         device=device, dtype=dtype, format=fmt, overwrite=overwrite))
