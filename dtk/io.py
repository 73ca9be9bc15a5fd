"""Files in, files out: atomic writes, JSON Lines, manifests, safetensors.

Every file dtk writes appears whole or not at all: it is written under a
temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from dtk.errors import BadInput

MANIFEST = "dtk.json"
LOCK = ".dtk.lock"   # held by the one run that writes an output folder (lock_out)
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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            from dtk.errors import RunFailure

            # a full disk's error names no file: say which one could not be written
            failure = RunFailure(f"{path}: cannot write it ({e.strerror}); the previous version, if any, is "
                                 "unchanged")
            failure.strerror = e.strerror
            raise failure from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")


def open_text(path: str, binary: bool = False) -> Any:
    """Open a text input; ``-`` is stdin. ``binary``: its bytes, for a reader that decodes each line itself
    (and so can name the line that is not UTF-8)."""
    if path == "-":
        if sys.stdin.isatty():   # a terminal: say what it waits for rather than wait silently
            log.info("reading from stdin (a file or a pipe is the usual input; Ctrl-D ends, Ctrl-C stops)")
        buffer = getattr(sys.stdin, "buffer", None)
        if binary or buffer is None:
            return contextlib.nullcontext(buffer or sys.stdin)

        @contextlib.contextmanager
        def utf8_stdin():
            # UTF-8, strictly, as every file is read: not the locale's (a C locale lets other bytes through
            # as surrogates, to fail only when the text is written out, after the model ran)
            import io

            text = io.TextIOWrapper(buffer, encoding="utf-8", errors="strict")
            try:
                yield text
            finally:
                text.detach()   # stdin stays open

        return utf8_stdin()
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{path}: no such file")
    if p.is_dir():
        raise BadInput(f"{path}: is a directory, expected a file")
    try:
        return open(p, "rb") if binary else open(p, encoding="utf-8")
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror})") from None


def decode_utf8(data: bytes, where: str) -> str:
    """A user file's bytes as text (a byte-order mark allowed); not UTF-8 is bad input naming the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def parse_jsonl(lines, name: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for non-blank lines; a malformed line is an error naming it. Lines may
    be bytes (decoded here as UTF-8, so that a line that is not names itself)."""
    for lineno, line in enumerate(lines, 1):
        if isinstance(line, (bytes, bytearray)):
            try:
                line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(f"{name}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                               f"{e.start + 1})") from None
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
    name = "<stdin>" if path == "-" else path
    with open_text(path, binary=True) as f:
        try:
            yield from parse_jsonl(f, name)
        except UnicodeDecodeError as e:   # a text stdin (no bytes to read) that is not UTF-8
            raise BadInput(f"{name}: not UTF-8 text ({e.reason})") from None


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
        if "scores" in rec and not isinstance(rec["scores"], dict):   # `dtk score` adds to it, dpo ranks by it
            raise BadInput(f"{name}:{lineno}: 'scores' is {type(rec['scores']).__name__}, not an object of "
                           "reward → value (as `dtk score` writes)")
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
    """A JSON object from a file (a dtk.json, a config.json); anything else is bad input naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def prepare_out_dir(out: str | os.PathLike, *, overwrite: bool, marker: str = MANIFEST,
                    inputs: list[tuple[str, Any]] = (), lock: str = LOCK) -> Path:
    """Check that ``out`` may be written; nothing is created or removed yet.

    A directory whose ``marker`` exists holds a finished result and is only
    replaced with ``overwrite``, through ``Replacing`` once the command has
    accepted all its input (so refused input, or a failed run, loses nothing).
    An existing folder is locked now (``lock_out``: another run writing there is refused); the command locks
    a new one when it makes it, and lets go with ``release_out``. ``out`` must keep apart from ``inputs``.
    """
    if not str(out).strip():
        raise BadInput("--out '': empty (an unset shell variable?); name the output directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    check_out_apart(out, list(inputs))
    took = lock_out(out, lock, create=False)   # another run writing there now: refused before any work
    try:
        recover_set_aside(out, marker)
    finally:
        if took:   # held again from the first write on (Replacing)
            release_out(out, lock)
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


def _host() -> str:
    import socket

    return socket.gethostname()


_HELD: dict[Path, Any] = {}   # lock file → its open file, while this process writes that output


def lock_out(out: str | os.PathLike, name: str = LOCK, create: bool = True, command: str = "") -> bool:
    """One writer per output: an exclusive lock on ``out/NAME`` for as long as this process writes there
    (the kernel drops it when the process ends, however it ends). Another process holding it is a one-line
    refusal naming its PID and host. Re-entrant within a process; ``create=False`` locks only an existing
    folder (an early check, before anything is written). Where the file system has no locks (some network
    file systems) it warns and goes on. Returns whether this call took the lock (and so should let it go)."""
    import fcntl

    folder = Path(out)
    if not folder.is_dir():
        if not create:
            return False
        folder.mkdir(parents=True, exist_ok=True)
    path = folder.resolve() / name
    if path in _HELD:
        return False
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise BadInput(f"--out {out}: in use by {holder}; one run writes an output at a time (wait for it, "
                           "or choose another directory)") from None
        except OSError as e:   # no lock support here
            log.warning("--out %s: cannot lock it (%s); make sure no other run writes there", out, e.strerror)
            f.close()
            return False
        try:   # the holder before us removes the file as it lets go: ours must still be the one at that path
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {_host()}" + (f" (dtk {command})" if command else "") + "\n")
    f.flush()
    _HELD[path] = f
    return True


def release_out(out: str | os.PathLike | None = None, name: str = LOCK) -> None:
    """Let go of the lock on ``out`` (of every output this process holds, without ``out``)."""
    keys = list(_HELD) if out is None else [k for k in _HELD if Path(out).is_dir() and k == Path(out).resolve() / name]
    for key in keys:
        f = _HELD.pop(key)
        with contextlib.suppress(OSError):
            key.unlink()   # still locked while it goes: a waiting run re-checks the path (lock_out)
        f.close()


def check_out_apart(out: str | os.PathLike, inputs: list[tuple[str, Any]]) -> None:
    """``--out`` must not be, lie inside or contain any input (``(option, path)`` pairs; non-paths such as hub
    ids are skipped): an --overwrite would delete what the run reads, and its outputs would mix with its
    inputs. Nor may it be a file system root or the home directory."""
    target = Path(out).expanduser().resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        raise BadInput(f"--out {out}: is {'the root directory' if target == Path(target.anchor) else 'your home directory'}; "
                       "name a folder of its own")
    for option, value in inputs:
        if value in (None, "", "-"):
            continue
        p = Path(value).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if p == target:
            raise BadInput(f"--out {out}: is the input {option} {value}; choose another path")
        if p.is_dir() and target.is_relative_to(p):
            raise BadInput(f"--out {out}: lies inside the input {option} {value}; choose a path outside it")
        if p.is_relative_to(target):
            raise BadInput(f"--out {out}: contains the input {option} {value}; choose a directory that does not")


ASIDE = ".replaced"


OWNER = ".owner.json"   # in the aside folder: which run set it aside, and how far the folder was then
TRASH = ".dtk-trash-"


def recover_set_aside(out: Path, marker: str = MANIFEST, progressed=None) -> None:
    """A run killed outright (SIGKILL, out of memory, a time limit) while its --overwrite held the old result
    in ``out/.replaced-MARKER``: that result comes back, unless the new run got far enough that the folder is
    its own — a new finished result stands, or ``progressed(owner)`` says so (a training run: a checkpoint
    newer than the folder had when the result was set aside) — and then the old result goes. Half-deleted
    set-aside folders (a kill during the drop) were renamed to trash first, so they are only ever deleted."""
    import shutil

    out = Path(out)
    for trash in out.glob(TRASH + "*") if out.is_dir() else []:
        shutil.rmtree(trash, ignore_errors=True)
    aside = out / f"{ASIDE}-{marker}"
    if not aside.is_dir():
        return
    try:
        owner = json.loads((aside / OWNER).read_text())
    except (OSError, ValueError):
        owner = {}
    if (out / marker).exists() or (progressed is not None and progressed(owner)):
        _trash(aside)
        log.warning("%s: the run that replaced a result here got far enough; the result it set aside is deleted", out)
        return
    entries = sorted((e for e in aside.iterdir() if e.name != OWNER), key=lambda p: p.name == marker)   # marker last
    for entry in entries:
        _put_back(entry, out / entry.name)
    shutil.rmtree(aside, ignore_errors=True)
    if entries:
        log.warning("%s: put back the result a killed --overwrite run had set aside", out)


def _trash(path: Path) -> None:
    """Delete a folder so that a kill half way leaves no half of it under its own name: renamed, then removed."""
    import shutil
    import uuid

    trash = path.parent / f"{TRASH}{uuid.uuid4().hex[:12]}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


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

    def __init__(self, out: Path, marker: str = MANIFEST, names: tuple[str, ...] = (), owner: dict | None = None,
                 lock: str = LOCK, overwrite: bool = True):
        # one aside folder per marker: the shards of one `dtk sample` output replace theirs side by side
        self.out, self.marker, self.moved = Path(out), marker, []
        self.owner = {"pid": os.getpid(), "host": _host(), **(owner or {})}
        self.lock, self.took_lock, self.overwrite = lock, False, overwrite
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
                    if not self.aside.is_dir():   # the owner record first: a kill from here on is recoverable
                        self.aside.mkdir(parents=True)
                        write_json(self.aside / OWNER, self.owner)
                    os.replace(path, self.aside / name)
                    self.moved.append(name)
        except BaseException:   # interrupted half way: what moved goes back
            self.restore()
            raise
        return self

    def drop(self) -> None:
        if self.aside.is_dir():
            _trash(self.aside)
        self.moved = []

    def restore(self) -> None:
        for name in reversed(self.moved):
            _put_back(self.aside / name, self.out / name)
        self.drop()   # the aside folder, now holding only its owner record

    def __enter__(self) -> "Replacing":
        """The command's writing starts: the output is locked (``lock_out``) until it ends."""
        self.took_lock = lock_out(self.out, self.lock)
        try:
            if not self.overwrite and (self.out / self.marker).exists():   # another run finished here meanwhile
                raise BadInput(f"--out {self.out}: another run finished a result here ({self.marker}) while this one "
                               "was starting; pass --overwrite to replace it or choose another directory")
            return self.set_aside()
        except BaseException:
            self._unlock()
            raise

    def __exit__(self, kind, value, traceback) -> bool:
        try:
            self.restore() if kind is not None else self.drop()
        finally:
            self._unlock()
        return False

    def _unlock(self) -> None:
        if self.took_lock:
            release_out(self.out, self.lock)
            self.took_lock = False


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


def write_grid(path: Path, images: list, cols: int) -> None:
    """A contact sheet of equal-size PIL images, ``cols`` per row, written atomically as PNG."""
    import math

    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")
