#!/usr/bin/env python3
"""Generate shell completions (bash, zsh, fish) and man pages from the click commands.

    python scripts/generate_docs.py          # rewrite completions/ and man/
    python scripts/generate_docs.py --check  # exit 1 if any generated file is stale

The tests run the check, so the files in the repo always match the code.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click
from click.shell_completion import get_completion_class

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtk import __version__  # noqa: E402
from dtk.cli import COMMANDS, cli  # noqa: E402

EXIT_STATUS = [
    ("0", "success"),
    ("1", "a failure while running (e.g. a NaN loss, out of memory)"),
    ("2", "bad usage or bad input (a missing file, a malformed line, an unknown option)"),
    ("130", "interrupted (Ctrl-C); finished files are whole, nothing is half-written"),
    ("141", "stdout was closed by its reader (e.g. piped into head); the files already written stay whole"),
]
EXIT_TERMINATED = ("143", "terminated by SIGTERM; finished files are whole, nothing is half-written")


def completions() -> dict[str, str]:
    files = {}
    for shell, name in (("bash", "dtk.bash"), ("zsh", "_dtk"), ("fish", "dtk.fish")):
        source = get_completion_class(shell)(cli, {}, "dtk", "_DTK_COMPLETE").source()
        files[f"completions/{name}"] = source if source.endswith("\n") else source + "\n"
    return files


def _roff(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\\\").splitlines():
        line = line.replace("\b", "").rstrip()
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line.replace("-", "\\-"))
    return "\n".join(lines)


def _help_paragraphs(help_text: str) -> str:
    out = []
    for block in inspect.cleandoc(help_text or "").split("\n\n"):
        if block.startswith("\b"):
            out.append(".nf\n" + _roff(block.lstrip("\b").strip("\n")) + "\n.fi")
        else:
            out.append(".PP\n" + _roff(" ".join(block.split())))
    return "\n".join(out)


def _context(command: click.Command | None = None) -> click.Context:
    """A context like the real one: the group's settings (-h/--help) passed down to subcommands."""
    root = click.Context(cli, info_name="dtk", **cli.context_settings)
    return root if command is None else click.Context(command, info_name=command.name, parent=root)


def man_page(name: str, command: click.Command, parent: str | None) -> str:
    title = f"{parent}-{name}" if parent else name
    ctx = _context(command if parent else None)
    usage = " ".join(command.collect_usage_pieces(ctx))
    env_prefix = f"DTK_{name.upper().replace('-', '_')}_" if parent else "DTK_"
    parts = [
        f'.TH {title.upper()} 1 "" "dtk {__version__}" "dtk manual"',
        ".SH NAME",
        f"{title} \\- {_roff(command.get_short_help_str(200))}",
        ".SH SYNOPSIS",
        f".B {ctx.command_path}\n{_roff(usage)}",
        ".SH DESCRIPTION",
        _help_paragraphs(command.help or ""),
    ]
    params = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
    if params:
        parts.append(".SH OPTIONS")
        for p in params:
            record = p.get_help_record(ctx)
            if record:
                parts.append(f".TP\n.B {_roff(record[0])}\n{_roff(' '.join(record[1].split()))}")
    if parent:
        env = [p.envvar for p in params if isinstance(p.envvar, str)]
        parts.append(".SH ENVIRONMENT")
        parts.append(".PP\nEvery option can be set by a variable " + _roff(env_prefix) + "<OPTION>; "
                     "precedence: command line, then environment, then \\-\\-config file, then default.")
        parts.append(".PP\n" + ", ".join(_roff(e) for e in env) + ".")
        parts.append(".PP\nDTK_DEBUG=1 prints tracebacks with errors.")
    else:
        parts.append(".SH COMMANDS")
        for sub in COMMANDS:
            sub_cmd = cli.get_command(ctx, sub)
            parts.append(f".TP\n.B dtk {sub}\n{_roff(sub_cmd.get_short_help_str(200))}\nSee \\fBdtk-{sub}\\fR(1).")
    parts.append(".SH EXIT STATUS")
    codes = list(EXIT_STATUS)
    trains = any("--resume" in p.opts for p in params)
    if not parent or trains:
        from dtk.train.config import EXIT_PREEMPTED

        codes.append((str(EXIT_PREEMPTED), ("training commands: " if not parent else "") + "stopped by SIGTERM or "
                      "SIGUSR1 (Slurm preemption) after saving a checkpoint; requeue and run again with --resume auto"))
    if not parent or not trains:
        codes.append((EXIT_TERMINATED[0], ("other commands: " if not parent else "") + EXIT_TERMINATED[1]))
    for code, meaning in codes:
        parts.append(f".TP\n.B {code}\n{meaning}")
    see = ", ".join(f"\\fBdtk-{s}\\fR(1)" for s in COMMANDS if s != name)
    parts.append(".SH SEE ALSO\n" + ("\\fBdtk\\fR(1), " if parent else "") + see)
    return "\n".join(parts) + "\n"


def man_pages() -> dict[str, str]:
    files = {"man/dtk.1": man_page("dtk", cli, None)}
    ctx = _context()
    for name in COMMANDS:
        files[f"man/dtk-{name}.1"] = man_page(name, cli.get_command(ctx, name), "dtk")
    return files


def generated() -> dict[str, str]:
    return {**completions(), **man_pages()}


def stale(root: Path = ROOT) -> list[str]:
    want = generated()
    bad = [path for path, text in want.items() if not (root / path).exists() or (root / path).read_text() != text]
    extra = [str(p.relative_to(root)) for d in ("man", "completions") for p in (root / d).glob("*")
             if str(p.relative_to(root)) not in want]
    return bad + extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when files are stale")
    args = parser.parse_args()
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path} (run: python scripts/generate_docs.py)", file=sys.stderr)
        return 1 if bad else 0
    for d in ("man", "completions"):
        for p in (ROOT / d).glob("*"):
            p.unlink()
    for path, text in generated().items():
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
