"""Files in, files out: atomic writes, JSON Lines, manifests, safetensors.

Every file dtk writes appears whole or not at all: it is written under a
temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from dtk.errors import BadInput

MANIFEST = "dtk.json"
log = logging.getLogger("dtk")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path``; rename it over ``path`` on success.

    On any exception (Ctrl-C included) the temporary file is removed, so a
    reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")


def emit(record: dict) -> None:
    """One JSON object per line on stdout: the machine-readable result."""
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


def open_text(path: str) -> Any:
    """Open a text input; ``-`` is stdin."""
    if path == "-":
        if sys.stdin.isatty():   # a terminal: say what it waits for rather than wait silently
            log.info("reading from stdin (a file or a pipe is the usual input; Ctrl-D ends, Ctrl-C stops)")
        return contextlib.nullcontext(sys.stdin)
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{path}: no such file")
    if p.is_dir():
        raise BadInput(f"{path}: is a directory, expected a file")
    return open(p, encoding="utf-8")


def parse_jsonl(lines, name: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for non-blank lines; a malformed line is an error naming it."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{name}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Read a JSONL file (``-`` = stdin) as ``(line_number, object)`` pairs."""
    with open_text(path) as f:
        yield from parse_jsonl(f, "<stdin>" if path == "-" else path)


def read_manifest(data: str) -> list[dict]:
    """A manifest of images (``path`` + ``prompt`` per line, as ``dtk sample`` prints; ``-`` = stdin): its
    lines with ``_file`` (a relative path read from the current directory, else from the manifest's folder)
    and ``_line``.
    Every image must exist and have a prompt."""
    name = "<stdin>" if data == "-" else data
    base = None if data == "-" else Path(data).resolve().parent
    rows = []
    for lineno, rec in read_jsonl(data):
        path, prompt = rec.get("path"), rec.get("prompt", rec.get("caption"))
        if not isinstance(path, str) or not isinstance(prompt, str):
            raise BadInput(f"{name}:{lineno}: needs 'path' and 'prompt' strings (a `dtk sample` manifest line)")
        file = Path(path)
        if not file.exists() and base is not None and not file.is_absolute():
            if (base / file).exists():
                file = base / file
            elif file.parent.name == base.name and (base / file.name).exists():
                file = base / file.name   # `dtk sample --out s` wrote "s/000000.png" from another directory
        if not file.is_file():
            raise BadInput(f"{name}:{lineno}: image {path}: no such file")
        rows.append({**rec, "_line": lineno, "_file": file})
    if not rows:
        raise BadInput(f"{name}: no images in the manifest")
    return rows


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def prepare_out_dir(out: str | os.PathLike, *, overwrite: bool, marker: str = MANIFEST) -> Path:
    """Check that ``out`` may be written; nothing is created or removed yet.

    A directory whose ``marker`` exists holds a finished result and is only
    replaced with ``overwrite``, through ``Replacing`` once the command has
    accepted all its input (so refused input, or a failed run, loses nothing).
    """
    if not str(out).strip():
        raise BadInput("--out '': empty (an unset shell variable?); name the output directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    recover_set_aside(out, marker)
    if (out / marker).exists() and not overwrite:
        raise BadInput(f"--out {out}: holds a finished result ({marker}); pass --overwrite or choose another directory")
    return out


def fresh_out_dir(base: str) -> Path:
    """A new folder for a generation run given no ``--out``: ``base``, ``base-2``, ``base-3``, ... the first
    that does not exist yet. It is made here, so two runs started together never share one."""
    n = 1
    while True:
        path = Path(base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


ASIDE = ".replaced"


def recover_set_aside(out: Path, marker: str = MANIFEST) -> None:
    """A run killed outright (SIGKILL, out of memory, a time limit) while its --overwrite held the old result
    in ``out/.replaced-MARKER``: that result comes back, unless a new finished one stands (then it goes)."""
    import shutil

    aside = Path(out) / f"{ASIDE}-{marker}"
    if not aside.is_dir():
        return
    if (Path(out) / marker).exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    entries = sorted(aside.iterdir(), key=lambda p: p.name == marker)   # the marker last
    for entry in entries:
        _put_back(entry, Path(out) / entry.name)
    shutil.rmtree(aside, ignore_errors=True)
    if entries:
        log.warning("%s: put back the result a killed --overwrite run had set aside", out)


def _put_back(entry: Path, path: Path) -> None:
    """``entry`` (set aside) back under ``path``, over whatever a failed run wrote there."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(entry, path)


class Replacing:
    """--overwrite without loss: the finished result in ``out`` (its ``marker`` and the files that lists, and
    any other ``names``) is renamed into ``out/.replaced-MARKER`` and deleted only once the new result is safe
    (``drop``, or leaving the ``with`` block normally); an error or interruption before that puts it back.
    The marker goes first and comes back last, so a half-replaced folder is never taken for finished."""

    def __init__(self, out: Path, marker: str = MANIFEST, names: tuple[str, ...] = ()):
        # one aside folder per marker: the shards of one `dtk sample` output replace theirs side by side
        self.out, self.marker, self.moved = Path(out), marker, []
        self.aside = self.out / f"{ASIDE}-{marker}"
        self.names = [marker]
        done = self.out / marker
        if done.exists():
            try:
                listed = json.loads(done.read_text()).get("files", [])
            except (OSError, ValueError, AttributeError):
                listed = []
            # top-level entries only (a listed "unet/x.safetensors" sets "unet" aside), never outside out
            self.names += [Path(n).parts[0] for n in listed if isinstance(n, str) and Path(n).parts
                           and not Path(n).is_absolute() and Path(n).parts[0] != ".." and not n.startswith(ASIDE)]
        self.names += list(names)

    def set_aside(self) -> "Replacing":
        recover_set_aside(self.out, self.marker)
        try:
            for name in dict.fromkeys(self.names):
                path = self.out / name
                if path.exists() or path.is_symlink():
                    self.aside.mkdir(parents=True, exist_ok=True)
                    os.replace(path, self.aside / name)
                    self.moved.append(name)
        except BaseException:   # interrupted half way: what moved goes back
            self.restore()
            raise
        return self

    def drop(self) -> None:
        import shutil

        if self.moved:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.moved = []

    def restore(self) -> None:
        for name in reversed(self.moved):
            _put_back(self.aside / name, self.out / name)
        self.drop()   # the aside folder, now empty

    def __enter__(self) -> "Replacing":
        return self.set_aside()

    def __exit__(self, kind, value, traceback) -> bool:
        self.restore() if kind is not None else self.drop()
        return False


def run_record(command: str, args: dict, **extra: Any) -> dict:
    """The common head of every ``dtk.json``: what made this output."""
    from dtk import __version__

    return {
        "dtk_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
        **extra,
    }


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(data)
