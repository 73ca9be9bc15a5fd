"""dtk score — add reward scores to a manifest; optionally write preference pairs."""

from __future__ import annotations

import click

from dtk.cli.common import emit, config_option, device_option


@click.command("score", short_help="Score images of a manifest with rewards; form preference pairs.")
@click.option("--data", default="-", show_default=True, metavar="FILE|-",
              help="JSONL manifest with path and prompt per line (dtk sample's output).")
@click.option("--reward", "rewards", multiple=True, default=["shapes"], show_default=True, metavar="NAME[=WEIGHTS]",
              help="shapes, clip, pickscore, hpsv2 or aesthetic, with a weights path or hub id; repeatable.")
@click.option("--clip-model", default="openai/clip-vit-large-patch14", show_default=True, metavar="PATH|ID",
              help="CLIP ViT-L/14 under the aesthetic MLP.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the scored manifest here.")
@click.option("--pairs-out", default=None, type=click.Path(dir_okay=False), metavar="FILE.parquet",
              help="Write preference pairs of same-prompt images (Pick-a-Pic layout).")
@click.option("--pair-by", default=None, metavar="SCORE",
              help="Score that ranks pairs [the first reward's; shapes/confidence for shapes].")
@click.option("--tie-margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Score differences up to this are ties (label 0.5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@device_option
@click.option("--overwrite", is_flag=True, help="Replace existing --out / --pairs-out files.")
@config_option
def command(data, rewards, clip_model, out, pairs_out, pair_by, tie_margin, batch_size, device, overwrite):
    """Add a `scores` field to every line of a manifest and print it back.

    \b
    Examples:
      dtk sample --prompts prompts.txt --num-per-prompt 4 | dtk score --reward shapes
      dtk score --data samples/samples.jsonl --reward clip=/models/clip-l14 --pairs-out pairs.parquet
    """
    from dtk.score import ScoreOptions, run_score

    run_score(on_record=emit, opts=ScoreOptions(data=data, rewards=list(rewards), clip_model=clip_model, out=out, pairs_out=pairs_out,
                           pair_by=pair_by, tie_margin=tie_margin, batch_size=batch_size, device=device,
                           overwrite=overwrite))
