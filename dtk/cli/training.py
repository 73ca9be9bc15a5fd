"""The options every training command shares, and their mapping onto ``TrainConfig``."""

from __future__ import annotations

from typing import Callable

import click

from dtk.train.config import (DEFAULT_LORA_TARGETS, EXIT_PREEMPTED, EXPORT_FORMATS, LR_SCHEDULES, MIXED_PRECISION,
                              OPTIMIZERS)


class _Lines(click.types.StringParamType):
    """A repeatable text option read from a variable one value per line (prompts have spaces in them)."""
    envvar_list_splitter = "\n"

    def split_envvar_value(self, rv: str):
        return [line for line in rv.split("\n") if line.strip()]   # no empty prompt from a trailing newline


_LINES = _Lines()

TRAIN_EPILOG = (f"Exit status: 0 done, 1 failed while running (e.g. a NaN loss; the last good checkpoint is kept), "
                f"2 bad input, {EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after saving a checkpoint "
                f"(requeue and rerun with --resume auto).")


def training_options(*, lr: float, max_steps: int, batch_size: int, lora_rank: int = 16, full: bool = True,
                     mode_defaults: dict[str, str] | None = None) -> Callable:
    """Decorate a command with the engine's options (defaults per command where papers differ). ``full=False``
    leaves out --full (a command that trains LoRAs only); ``mode_defaults`` names defaults that one of the
    command's modes changes (``{"lr": "--self: 1e-6"}``), shown in --help beside the general one."""
    notes = mode_defaults or {}

    def default(name: str, value, help: str) -> dict:
        if name in notes:
            return {"default": value, "show_default": False, "help": f"{help} [{value:g}; {notes[name]}]"}
        return {"default": value, "show_default": True, "help": help}

    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory."),
        click.option("--max-steps", type=int, default=max_steps, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=batch_size, show_default=True,
                     help="Examples per process and micro-step (global batch = this × --grad-accum × processes)."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-steps per optimizer step."),
        click.option("--lr", type=float, **default("lr", lr, "Peak learning rate.")),
        click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="constant", show_default=True),
        click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear LR warm-up steps."),
        click.option("--weight-decay", type=float, default=1e-2, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
                     help="adamw8bit needs bitsandbytes."),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0 = off)."),
        click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION), default="no", show_default=True,
                     help="Autocast dtype of the forward pass; trained weights stay fp32."),
        click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations: less memory, ~30% slower."),
        click.option("--ema-decay", type=float, **default(
            "ema_decay", 0.0, "EMA of the trained weights (e.g. 0.9999); exported instead of the raw weights (unless "
            "the command says otherwise). 0 = off.")),
        *([click.option("--full", is_flag=True, help="Fine-tune the whole UNet instead of a LoRA.")] if full else []),
        click.option("--lora-rank", type=int, default=lora_rank, show_default=True),
        click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (scale = alpha/rank) [= rank]."),
        click.option("--lora-targets", default=", ".join(DEFAULT_LORA_TARGETS), show_default=True,
                     help="Comma-separated UNet module names that get LoRA layers."),
        click.option("--checkpoint-every", type=int, default=500, show_default=True),
        click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Newest checkpoints kept."),
        click.option("--resume", default=None, metavar="auto|PATH",
                     help="Continue from the newest checkpoint in --out (auto; nothing there = a fresh start) "
                     "or from a checkpoint directory."),
        click.option("--validate-every", type=int, default=0, show_default=True,
                     help="Write OUT/validation/step-N.png every N steps (0 = off)."),
        click.option("--validation-prompt", "validation_prompts", multiple=True, type=_LINES,
                     help="Prompt for validation images; repeatable [first captions of the data]."),
        click.option("--export-format", type=click.Choice(EXPORT_FORMATS), default="diffusers", show_default=True,
                     help="LoRA layout: diffusers/peft (pipe.load_lora_weights) or kohya (ComfyUI, A1111)."),
        click.option("--resolution", type=int, default=None, help="Training resolution in pixels [model's native]."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--log-every", type=int, default=10, show_default=True, help="Steps per metrics line."),
        click.option("--device", default="auto", show_default=True,
                     help="cpu, or auto (accelerate's choice: CUDA when available, one GPU per process)."),
        click.option("--overwrite", is_flag=True, help="Replace a finished model or an unfinished run in --out."),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


TRAIN_KEYS = ("out", "max_steps", "batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps", "weight_decay",
              "optimizer", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "ema_decay", "full",
              "lora_rank", "lora_alpha", "lora_targets", "checkpoint_every", "keep_checkpoints", "resume",
              "validate_every", "validation_prompts", "export_format", "resolution", "seed", "log_every", "device",
              "overwrite")


def train_config(kwargs: dict, **fields):
    """Split a command's keyword arguments: the engine's into a TrainConfig, the rest stay. A setting a method
    chooses and the user left at its default stays unset, so that the method's own default applies (a command
    whose modes differ, like train-npo --self, shows both in --help)."""
    from click.core import ParameterSource

    from dtk.parsing import comma_values
    from dtk.train.config import ENGINE_DEFAULTS, TrainConfig

    ctx = click.get_current_context()
    own = {k: kwargs.pop(k) for k in TRAIN_KEYS if k != "full"}
    for name in ENGINE_DEFAULTS:
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            own[name] = None
    own["full"] = kwargs.pop("full", False)   # a LoRA-only command has no --full
    own["lora_targets"] = tuple(comma_values(own["lora_targets"], str))
    own["validation_prompts"] = tuple(own["validation_prompts"])
    return TrainConfig(**own, **fields)


def run_training(method, config) -> None:
    """Train, then print the run's summary record (the main process's; the others return none)."""
    from dtk.cli.common import emit
    from dtk.train.engine import train

    result = train(method, config)
    if result:
        emit(result)
