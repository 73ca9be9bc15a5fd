"""The ``dtk`` entry point: a click group that loads subcommands lazily.

Each subcommand lives in its own module under ``dtk.cli`` and is imported only
when it runs (or its help is shown); none imports torch at module level, so
``dtk --help`` and shell completion stay fast.

The error boundary lives here too: every failure becomes one line
``dtk <command>: error: <message>`` on stderr with exit code 2 (bad input or
usage) or 1 (failure while running); ``--debug`` / ``DTK_DEBUG=1`` add the
traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import traceback

from dtk import signals

if threading.current_thread() is threading.main_thread():
    signals.install()   # first of all: a SIGTERM while the imports run is noted, not fatal (dtk.signals)

import click  # noqa: E402

from dtk import __version__
from dtk.cli.completion import with_path_completion
from dtk.errors import DtkError, StdoutClosed, Terminated

# name -> module; the module defines ``command``. One line per command.
COMMANDS = {
    "sample": "dtk.cli.sample",
    "reflow-pairs": "dtk.cli.reflow_pairs",
    "train-reflow": "dtk.cli.train_reflow",
    "distill-pcm": "dtk.cli.distill_pcm",
    "tune-sct": "dtk.cli.tune_sct",
    "dpo": "dtk.cli.dpo",
    "train-npo": "dtk.cli.train_npo",
    "track3d": "dtk.cli.track3d",
    "render-gs": "dtk.cli.render_gs",
    "score": "dtk.cli.score",
    "eval": "dtk.cli.eval",
}

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_STDOUT_CLOSED = 141   # 128 + SIGPIPE, as a Unix tool killed by it


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        command = importlib.import_module(COMMANDS[name]).command
        return _with_global_options(with_path_completion(_with_envvars(command, name)), name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run with the error boundary: one line per failure, a documented exit code."""
        if args is None:
            args = sys.argv[1:]
        args = list(args)
        if not args and not os.environ.get(complete_var or "_DTK_COMPLETE"):
            args = ["--help"]   # bare `dtk`: the help on stdout, exit 0 (click would squash it into an error)
        debug = os.environ.get("DTK_DEBUG", "") not in ("", "0") or "--debug" in _options_part(args)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            signals.install()   # SIGTERM / SIGUSR1 are noted and acted on at safe points (dtk.signals)
        try:
            rv = super().main(args=args, prog_name=prog_name or "dtk", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "dtk"
            _fail(where, _origin(e) + e.format_message(), debug)
            code = 2
        except click.ClickException as e:
            _fail(_where(args), e.format_message(), debug)
            code = e.exit_code
        except (click.Abort, KeyboardInterrupt):
            print(f"{_where(args)}: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except Terminated:
            print(f"{_where(args)}: terminated", file=sys.stderr)
            code = EXIT_TERMINATED
        except StdoutClosed:
            sys.stdout = open(os.devnull, "w")   # nothing more reaches the closed pipe, not even at exit
            code = EXIT_STDOUT_CLOSED
        except DtkError as e:
            _fail(_where(args), str(e), debug, label=e.label)
            code = e.exit_code
        except Exception as e:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
            _fail(_where(args), f"unexpected {type(e).__name__}: {e}", debug, hint=True)
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if code == 1 and signals.terminate_requested():
            # SIGTERM stopped a command where no safe point was near (blocked, or inside a library): whatever
            # that raised, this is a termination
            print(f"{_where(args)}: terminated", file=sys.stderr)
            code = EXIT_TERMINATED
        if main_thread:
            signals.reset()   # the next command in this process (tests) starts with nothing noted
        if not standalone_mode:
            return code
        sys.exit(code)


def _with_envvars(command: click.Command, name: str) -> click.Command:
    """DTK_<COMMAND>_<OPTION> named after the long option (DTK_TRAIN_NPO_SELF for --self), not after click's
    internal parameter name, which is what click's automatic names would use."""
    prefix = "DTK_" + name.upper().replace("-", "_")
    for p in command.params:
        longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if isinstance(p, click.Option) and p.envvar is None and longs and p.name not in ("help", "config"):
            p.envvar = f"{prefix}_{longs[0][2:].upper().replace('-', '_')}"
    return command


# The group's options are accepted after the command name too (`dtk sample -q ...`): each command gets a
# hidden copy of them, merged with the group's in ``_run_with_globals``.
GLOBAL_OPTIONS = {
    "debug": dict(param_decls=["--debug"], is_flag=True, help="Show tracebacks (also DTK_DEBUG=1)."),
    "verbose": dict(param_decls=["-v", "--verbose"], count=True,
                    help="More log lines on stderr (-vv: also library logs)."),
    "quiet": dict(param_decls=["-q", "--quiet"], is_flag=True, help="Only errors on stderr; no progress."),
    "threads": dict(param_decls=["--threads"], type=click.IntRange(min=1), default=None, metavar="N",
                    help="CPU threads for torch (also DTK_THREADS) [the CPUs available to this process, less "
                    "those busy with other work; OMP_NUM_THREADS if set]."),
}
TRAINING_COMMANDS = {"train-reflow", "distill-pcm", "tune-sct", "dpo", "train-npo"}


def _global_options(f):
    for spec in reversed(GLOBAL_OPTIONS.values()):
        spec = dict(spec)
        f = click.option(*spec.pop("param_decls"), **spec)(f)
    return f


def _with_global_options(command: click.Command, name: str) -> click.Command:
    if getattr(command, "_dtk_globals", False):
        return command
    for key, spec in GLOBAL_OPTIONS.items():
        spec = dict(spec)
        command.params.append(click.Option(spec.pop("param_decls"), **spec, hidden=True, expose_value=True,
                                           allow_from_autoenv=False))
    callback = command.callback

    def run(*args, **kwargs):
        here = {key: kwargs.pop(key) for key in GLOBAL_OPTIONS}
        return _run_with_globals(name, here, callback, args, kwargs)

    command.callback = run
    command._dtk_globals = True
    return command


def _run_with_globals(name: str, here: dict, callback, args, kwargs):
    """The group's settings, with the ones given after the command name on top; then the command."""
    from dtk import signals, threads
    from dtk.logs import STATE, setup_logging

    verbose = max(STATE["verbose"], here["verbose"])
    quiet = STATE["quiet"] or here["quiet"]
    if (verbose, quiet) != (STATE["verbose"], STATE["quiet"]):
        setup_logging(verbose=verbose, quiet=quiet)
    signals.TRAINING[0] = name in TRAINING_COMMANDS
    threads.apply(here["threads"] if here["threads"] is not None else STATE["threads"])
    signals.check()   # a SIGTERM during start-up, acted on before any work
    try:
        return callback(*args, **kwargs)
    finally:
        from dtk.io import release_out

        release_out()   # every output lock this command took (the kernel would at exit; tests run many)


def _origin(e: click.UsageError) -> str:
    """Where a bad value came from when it was not the command line: its DTK_* variable or --config."""
    from click.core import ParameterSource

    param, ctx = getattr(e, "param", None), e.ctx
    if param is None or ctx is None or param.name is None:
        return ""
    source = ctx.get_parameter_source(param.name)
    if source == ParameterSource.ENVIRONMENT:
        names = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
        if ctx.auto_envvar_prefix and param.name:
            names = [*names, f"{ctx.auto_envvar_prefix}_{param.name.upper()}"]
        for var in names:
            if var and var in os.environ:
                return f"{var}={os.environ[var]}: "
    if source == ParameterSource.DEFAULT_MAP and "dtk.config" in ctx.meta:
        return f"--config {ctx.meta['dtk.config']}: "
    return ""


def _options_part(args: list[str]) -> list[str]:
    """The arguments before a ``--`` (after which everything is a positional value)."""
    return args[:args.index("--")] if "--" in args else args


def _where(args: list[str]) -> str:
    for a in args:
        if a in COMMANDS:
            return f"dtk {a}"
    return "dtk"


def _fail(where: str, message: str, debug: bool, hint: bool = False, label: str = "error") -> None:
    if debug:
        traceback.print_exc()
    message = " ".join(str(message).split())  # one line, always
    if hint and not debug:
        message += " (run with --debug for the traceback)"
    print(f"{where}: {label}: {message}", file=sys.stderr)


@click.group(name="dtk", cls=LazyGroup, context_settings={"auto_envvar_prefix": "DTK", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dtk")
@_global_options
def cli(debug: bool, verbose: int, quiet: bool, threads: int | None) -> None:
    """Post-training toolkit for diffusion models, and the video-to-4D tools beside them.

    Every command reads files (or - for stdin), writes its results under --out,
    prints one JSON object per result on stdout and logs to stderr. Options can
    also come from --config FILE.toml or DTK_<COMMAND>_<OPTION> variables;
    flags on the command line win. The options below may also follow the
    command name (dtk sample -q ...).
    """
    from dtk.logs import STATE, setup_logging
    from dtk.progress import plain_interval

    setup_logging(verbose=verbose, quiet=quiet)
    STATE["threads"] = threads
    plain_interval()   # a malformed DTK_PROGRESS_INTERVAL is refused now, not after a model has loaded


def main() -> None:
    """The `dtk` program. Its signal handlers stay to the end: Python's shutdown would put back the fatal
    defaults, and a SIGUSR1 (Slurm's warning) then killed a run whose result was written (exit 138)."""
    from dtk import signals

    try:
        cli.main()
    finally:
        signals.ignore_from_now()
