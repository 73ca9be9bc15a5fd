"""Options and behaviour shared by every subcommand.

``dtk_command`` makes a click command that takes ``--config FILE.toml``; the
group's ``auto_envvar_prefix`` gives every option a ``DTK_<COMMAND>_<OPTION>``
variable. Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _config_keys(command: click.Command) -> dict[str, str]:
    """Config key → parameter name: the long option name (dashes or underscores) or the argument name."""
    keys: dict[str, str] = {}
    for p in command.params:
        if p.name == "config":
            continue
        longs = [o[2:].replace("-", "_") for o in p.opts if o.startswith("--")]
        for key in longs or [p.name]:
            keys[key] = p.name
    return keys


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise click.BadParameter(f"{value}: no such file", ctx, param) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{value}: not valid TOML ({e})", ctx, param) from None
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read it ({e.strerror})", ctx, param) from None
    # A table named after this command holds its keys; tables for other dtk
    # commands are allowed so that one file can serve a whole pipeline.
    from dtk.cli import COMMANDS

    name = ctx.info_name
    table = dict(data.get(name, {})) if isinstance(data.get(name), dict) else {}
    top = {k: v for k, v in data.items() if not (k in COMMANDS and isinstance(v, dict))}
    keys = _config_keys(ctx.command)
    # One file serves a pipeline: a top-level key applies to the commands that have that option and is
    # skipped by the others; it must still be some command's option (a typo is not skipped). A command's
    # own table is strict.
    top = {k: v for k, v in top.items() if k.replace("-", "_") in keys or not _known_to_any(k.replace("-", "_"))}
    defaults: dict[str, Any] = {}
    for key, val in {**top, **table}.items():
        norm = key.replace("-", "_")
        if norm not in keys:
            where = f"[{name}] table" if key in table else "file (no dtk command has that option)"
            raise click.BadParameter(
                f"{value}: unknown key '{key}' in its {where} for 'dtk {name}' (known: {', '.join(sorted(keys))})",
                ctx, param,
            )
        option = next(p for p in ctx.command.params if p.name == keys[norm])
        many = getattr(option, "multiple", False) or option.nargs != 1
        if isinstance(val, list) and not many:
            val = ",".join(str(v) for v in val)   # a TOML array for a comma-list option (--lora-targets, --steps)
        elif many and isinstance(val, str):
            val = [val]   # one value for a repeatable option (validation_prompt = "a red circle")
        if isinstance(option.type, click.types.IntParamType) and isinstance(val, float) and not val.is_integer():
            raise click.BadParameter(f"{value}: '{key}' = {val}: want a whole number", ctx, param)
        defaults[keys[norm]] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["dtk.config"] = value   # named by the error boundary when one of these values is refused
    return value


def _known_to_any(key: str) -> bool:
    """Whether some dtk command (or the group) takes option ``key`` (its modules are light: no torch)."""
    import importlib

    from dtk.cli import COMMANDS, GLOBAL_OPTIONS

    if key in GLOBAL_OPTIONS:
        return True
    return any(key in _config_keys(importlib.import_module(module).command) for module in COMMANDS.values())


def config_option(f: Callable) -> Callable:
    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
        callback=_load_config,
        help="TOML file of option values (keys are option names); flags and DTK_* variables win.",
    )(f)


def model_option(name: str = "--model", help: str | None = None) -> Callable:
    return click.option(
        name, default=None, metavar="MODEL",
        help=help or "Diffusers pipeline dir, hub id (from the local cache), single-file .safetensors, "
        "or dtk output dir. Default: the bundled demo model.",
    )


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N, mps; auto picks CUDA when available.")(f)


def device_options(f: Callable) -> Callable:
    """--device and --dtype."""
    f = click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
                     show_default=True, help="Compute dtype; auto = fp16 on CUDA, fp32 on CPU.")(f)
    return device_option(f)


def output_options(f: Callable) -> Callable:
    f = click.option("--overwrite", is_flag=True, help="Replace a finished result in --out.")(f)
    return f


def shard_option(f: Callable) -> Callable:
    return click.option(
        "--shard", default=None, metavar="I/N",
        help="Do only part I of N (0-based). Default: from SLURM_ARRAY_TASK_ID/COUNT, "
        "SLURM_PROCID/NTASKS or RANK/WORLD_SIZE, else 0/1.",
    )(f)


def seed_option(default: int = 0) -> Callable:
    return click.option("--seed", type=int, default=default, show_default=True,
                        help="Base seed; each item's seed derives from (seed, global index).")


def prompt_inputs(f: Callable) -> Callable:
    """PROMPT arguments, or --prompts FILE|- (plain text or JSONL)."""
    f = click.option("--prompts", "prompts_file", metavar="FILE|-",
                     help="Prompts, one per line, or JSONL with prompt / negative_prompt / seed (- = stdin).")(f)
    return click.argument("prompt", nargs=-1)(f)


def size_options(f: Callable) -> Callable:
    """--height and --width (default: the model's native size)."""
    f = click.option("--width", type=click.IntRange(min=1), default=None, help="Image width [model's native size].")(f)
    return click.option("--height", type=click.IntRange(min=1), default=None,
                        help="Image height [model's native size].")(f)


def emit(record: dict) -> None:
    """One JSON object per line on stdout: the machine-readable result (only the CLI writes to stdout; the
    library passes records to the ``on_record`` a command gives it, or returns them)."""
    import json
    import sys

    from dtk.errors import StdoutClosed
    from dtk.progress import write_above_bar

    line = json.dumps(record, default=str) + "\n"

    def write() -> None:
        sys.stdout.write(line)
        sys.stdout.flush()

    try:
        write_above_bar(write)
    except BrokenPipeError:
        raise StdoutClosed() from None


def comma_option(kind: Callable = float, *, count: int | None = None, expect: str, low=None) -> Callable:
    """A click callback reading a comma list (``comma_values``): ``count`` values when given, each at least
    ``low`` when given; a bad value is "VALUE: expected EXPECT" (exit 2)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        from dtk.parsing import comma_values

        try:
            values = comma_values(value, kind)
        except ValueError:
            values = None
        if not values or (count is not None and len(values) != count):
            raise click.BadParameter(f"{value!r}: expected {expect}")
        if low is not None and min(values) < low:
            raise click.BadParameter(f"{value!r}: each value must be ≥ {low}")
        return values
    return callback
