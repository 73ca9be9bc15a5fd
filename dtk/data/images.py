"""Training data: every format a training command reads, behind one small interface.

A dataset is a sequence of examples (``len`` and ``[i]``); an example is a dict
(``image`` as a float tensor [3, H, W] in [-1, 1] and ``caption``, or the
tensors of a pair shard). The order is the engine's business (see
``dtk.train.data.BatchOrder``), so every format resumes exactly.

Formats, detected from ``--data``:

* a directory of images with ``.txt`` caption sidecars (``a.png`` + ``a.txt``);
* a directory written by ``dtk reflow-pairs`` (pair shards, see ``dtk.data.pairs``);
* a JSONL manifest (``path`` + ``prompt``/``caption`` per line; ``-`` = stdin),
  e.g. the output of ``dtk sample`` or ``dtk score``;
* a parquet file (or a directory of them) with an image column (``image``,
  ``jpg``, ``png``; raw bytes or Hugging Face ``{"bytes": ...}``) and a caption
  column (``caption``, ``text``, ``prompt``);
* webdataset tar shards: a ``.tar`` file, a directory of them, or a brace
  pattern ``shards-{000..009}.tar``; samples are grouped by key, the image is
  the ``jpg``/``jpeg``/``png``/``webp`` member and the caption the ``txt`` (or
  ``caption``/``json``) member.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtk.errors import BadInput

log = logging.getLogger("dtk")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")


# ---------------------------------------------------------------------------
# Images


def fit_square(im, resolution: int):
    """A PIL image as R×R: shorter side resized to R (bicubic), centre crop."""
    from PIL import Image

    w, h = im.size
    if (w, h) == (resolution, resolution):
        return im
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def decode_image(data: bytes | Path, where: str, resolution: int):
    """Bytes or a file → float tensor [3, R, R] in [-1, 1]: shorter side resized to R, centre crop."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            arr = np.asarray(fit_square(im.convert("RGB"), resolution), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{where}: not a readable image ({' '.join(str(e).split())})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


# The last bytes of a whole PNG (its IEND chunk) and JPEG (EOI): a file cut short (an interrupted copy, a
# full disk) lacks them, and such a file is fully decoded by the check to tell (other writers may append data).
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open binary file, as a file of its own (a tar member)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.size)[whence] + pos)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _probe_file(source):
    """``(binary file, size)`` to check an image from: a loader's ``view()`` if it has one (a tar member or an
    Arrow cell read in place, not copied), else what it loads (a path, or bytes)."""
    view = getattr(source, "view", None)
    if view is not None:
        return view()
    source = source() if callable(source) else source
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), len(source)
    f = open(source, "rb")
    return f, os.fstat(f.fileno()).st_size


def image_problem(source) -> str | None:
    """Why the image ``source`` (a loader, a path or bytes) cannot be decoded, from its header and its last
    bytes; None when it looks whole. Cheap (no decode) unless the file looks cut short: then a full decode
    decides. A truncated JPEG with its end marker in place still passes (and fails when decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        f, size = _probe_file(source)
    except OSError as e:
        return e.strerror or str(e)
    except BadInput as e:   # a cell that holds no image
        return str(e)
    try:
        with f, Image.open(f) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return f"a {w}x{h} image"
            end = {"PNG": PNG_END, "JPEG": JPEG_END}.get(im.format)
            whole = True
            if end is not None:
                f.seek(max(0, size - len(end)))
                whole = f.read(len(end)) == end
            elif im.format in ("WEBP", "BMP"):   # their headers give the file's length
                f.seek(4 if im.format == "WEBP" else 2)
                whole = int.from_bytes(f.read(4), "little") + (8 if im.format == "WEBP" else 0) <= size
            if not whole:
                im.load()
    except UnidentifiedImageError:
        return "no image format recognises it"
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image cannot be trained on
        return " ".join(str(e).split()) or type(e).__name__
    return None


def check_images(sources: list, workers: int = 8, chunk: int = 64, slow: float = 1e-3):
    """Yield ``(index, problem)`` for each of ``sources`` (see ``image_problem``) in order; the caller may stop
    at the first problem. One thread checks while images come quickly (a local disk: about 60 µs each; more
    threads only contend for the interpreter); where the first ones took over ``slow`` seconds each (a network
    file system: each open waits on the server), ``workers`` threads check runs of ``chunk`` side by side."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    start, began = 0, time.perf_counter()
    while start < len(sources) and (start < 4 * chunk or time.perf_counter() - began < slow * start):
        yield start, image_problem(sources[start])
        start += 1
    if start == len(sources):
        return

    def run(first: int) -> list:
        return [image_problem(s) for s in sources[first:first + chunk]]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for block in range(start, len(sources), workers * chunk):
            firsts = range(block, min(len(sources), block + workers * chunk), chunk)
            for first, problems in zip(firsts, pool.map(run, firsts)):
                for k, problem in enumerate(problems):
                    yield first + k, problem


class Dataset:
    """A sequence of examples; ``kind`` says what they hold ("images" or "pairs")."""

    kind = "images"
    name = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"data": self.name, "format": type(self).__name__, "examples": len(self)}


@dataclass
class _Item:
    load: Callable[[], bytes | Path]   # the image's bytes or file
    caption: str
    where: str                         # for error messages


class ImageCaptionDataset(Dataset):
    """Images with captions from any of the image formats; decoded lazily."""

    def __init__(self, name: str, items: list[_Item], resolution: int):
        if not items:
            raise BadInput(f"--data {name}: no images in it")
        self.name, self.items, self.resolution = name, items, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {"image": decode_image(item.load(), item.where, self.resolution), "caption": item.caption}

    def captions(self) -> list[str]:
        return [it.caption for it in self.items]

    def check_images(self) -> None:
        """Every image's header, now: a file that cannot be decoded would stop the run only when its batch
        comes, maybe hours in. The first one is refused, in one line (about 1 s per 10,000 images)."""
        if len(self.items) >= 20000:
            log.info("data: checking the headers of %d images", len(self.items))
        for i, problem in check_images([it.load for it in self.items]):
            if problem is not None:
                raise BadInput(f"--data {self.items[i].where}: not a readable image ({problem})")


# ---------------------------------------------------------------------------
# The formats


def _refuse_missing(where: str, missing: list[str], total: int, allowed: bool, what: str,
                    things: str = "images") -> None:
    if missing and not allowed:
        raise BadInput(f"--data {where}: {len(missing)} of {total} {things} have no {what} (e.g. "
                       f"{', '.join(missing[:3])}); pass --allow-missing-captions to train them with empty captions")


def image_folder(path: Path, resolution: int, allow_missing_captions: bool) -> ImageCaptionDataset:
    # hidden folders are not data (e.g. a result --overwrite has set aside, .ipynb_checkpoints)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    items, missing = [], []
    for f in files:
        txt = f.with_suffix(".txt")
        if txt.is_file():
            caption = _text(txt.read_bytes(), str(txt)).strip()
        else:
            missing.append(f)
            caption = ""
        items.append(_Item(load=lambda f=f: f, caption=caption, where=str(f)))
    _refuse_missing(str(path), [str(m.relative_to(path)) for m in missing], len(files), allow_missing_captions,
                    ".txt caption")
    return ImageCaptionDataset(str(path), items, resolution)


def manifest(path: str, resolution: int) -> ImageCaptionDataset:
    from dtk.io import read_manifest   # it requires a prompt on every line

    name = "<stdin>" if path == "-" else path
    items = [_Item(load=lambda f=row["_file"]: f, caption=row.get("prompt", row.get("caption")),
                   where=f"{name}:{row['_line']} ({row['path']})") for row in read_manifest(path)]
    return ImageCaptionDataset(name, items, resolution)


def column_texts(table, name: str, where: str) -> list:
    """A column of an Arrow table as Python values; a string that is not UTF-8 names its row."""
    column = table.column(name)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for row in range(len(column)):
            try:
                column[row].as_py()
            except UnicodeDecodeError as e:
                raise BadInput(f"--data {where}: row {row}: column '{name}' is not UTF-8 text ({e.reason})") from None
        raise


def _column(names: list[str], wanted: tuple[str, ...], what: str, where: str) -> str:
    for w in wanted:
        if w in names:
            return w
    raise BadInput(f"--data {where}: no {what} column (looked for {', '.join(wanted)}; it has {', '.join(names)})")


def parquet(paths: list[Path], resolution: int, allow_missing_captions: bool = False) -> ImageCaptionDataset:
    import pyarrow.parquet as pq

    items, missing = [], []
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
            raise BadInput(f"--data {path}: not a readable parquet file ({e})") from None
        names = table.column_names
        image_col = _column(names, ("image", "jpg", "png", "image_bytes"), "image", str(path))
        caption_col = _column(names, ("caption", "text", "prompt"), "caption", str(path))
        images, captions = table.column(image_col).to_pylist(), column_texts(table, caption_col, str(path))
        for row, (img, cap) in enumerate(zip(images, captions)):
            data = img.get("bytes") if isinstance(img, dict) else img
            if not isinstance(data, (bytes, bytearray)):
                raise BadInput(f"--data {path}: row {row}: column '{image_col}' holds no image bytes")
            if cap is None:
                missing.append(f"{path.name} row {row}")
            items.append(_Item(load=lambda d=bytes(data): d, caption="" if cap is None else str(cap),
                               where=f"{path} row {row}"))
    _refuse_missing(", ".join(map(str, paths)), missing, len(items), allow_missing_captions, "caption (null)")
    return ImageCaptionDataset(", ".join(map(str, paths)), items, resolution)


def _expand_braces(spec: str) -> list[str]:
    """``a-{000..003}.tar`` → ``a-000.tar`` … ``a-003.tar`` (zero padding kept), as webdataset writes them."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return [x for n in range(int(lo), int(hi) + 1)
            for x in _expand_braces(spec[:m.start()] + str(n).zfill(width) + spec[m.end():])]


def webdataset(tars: list[Path], resolution: int) -> ImageCaptionDataset:
    """Index the tar shards once (member offsets), then read each image straight from its offset."""
    items = []
    for tar_path in tars:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    groups.setdefault(m.name[: len(m.name) - len(base)] + key, {})[ext.lower()] = m
                captions = {}
                for key, members in groups.items():
                    cap_member = next((members[k] for k in CAPTION_KEYS + ("json",) if k in members), None)
                    captions[key] = _tar_caption(tf, cap_member, f"{tar_path}:{key}") if cap_member else None
        except tarfile.TarError as e:
            raise BadInput(f"--data {tar_path}: not a readable tar shard ({e})") from None
        for key, members in groups.items():
            image = next((members[k] for k in IMAGE_KEYS if k in members), None)
            if image is None:
                continue
            if captions[key] is None:
                raise BadInput(f"--data {tar_path}: sample '{key}' has an image but no caption (txt/json member)")
            items.append(_Item(load=_TarMember(tar_path, image.offset_data, image.size),
                               caption=captions[key], where=f"{tar_path}:{image.name}"))
    return ImageCaptionDataset(", ".join(map(str, tars)), items, resolution)


def _text(data: bytes, where: str) -> str:
    """A caption's bytes as text: UTF-8, else bad input naming the file and the byte."""
    from dtk.io import decode_utf8

    return decode_utf8(data, f"--data {where}")


def _tar_caption(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> str:
    text = _text(tf.extractfile(member).read(), f"{where}.{member.name.rsplit('.', 1)[-1]}").strip()
    if member.name.endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise BadInput(f"--data {where}.json: not valid JSON") from None
        text = next((obj[k] for k in ("caption", "text", "prompt") if isinstance(obj.get(k), str)), None)
        if text is None:
            raise BadInput(f"--data {where}.json: no caption/text/prompt string in it")
    return text


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@dataclass(frozen=True)
class _TarMember:
    """A loader of one image of a tar shard: its bytes when called; ``view()``, the member as a file."""
    path: Path
    offset: int
    size: int

    def __call__(self) -> bytes:
        return _read_at(self.path, self.offset, self.size)

    def view(self):
        return _Window(open(self.path, "rb"), self.offset, self.size), self.size


def open_dataset(spec: str, *, resolution: int, allow_missing_captions: bool = False,
                 check: bool = True) -> Dataset:
    """Whatever ``--data`` names, as a Dataset; with ``check``, every image's header is read now (an
    unreadable image is refused before training, not when its batch comes)."""
    data = _open_dataset(spec, resolution, allow_missing_captions)
    if check and isinstance(data, ImageCaptionDataset):
        data.check_images()
    return data


def _open_dataset(spec: str, resolution: int, allow_missing_captions: bool) -> Dataset:
    if spec == "-" or spec.endswith(".jsonl"):
        if spec != "-" and not Path(spec).is_file():
            raise BadInput(f"--data {spec}: no such file")
        return manifest(spec, resolution)
    if "{" in spec:
        tars = [Path(p) for p in _expand_braces(spec)]
        missing = [p for p in tars if not p.is_file()]
        if missing:
            raise BadInput(f"--data {spec}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
        return webdataset(tars, resolution)
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInput(f"--data {spec}: no such file or directory")
    if path.is_file():
        if path.suffix == ".tar":
            return webdataset([path], resolution)
        if path.suffix == ".parquet":
            return parquet([path], resolution, allow_missing_captions)
        raise BadInput(f"--data {spec}: unknown format (expected a directory, .jsonl, .parquet or .tar)")
    from dtk.data.pairs import PairDataset, is_pair_dir

    if is_pair_dir(path):
        return PairDataset(path)
    if sorted(path.glob("*.tar")):
        return webdataset(sorted(path.glob("*.tar")), resolution)
    if sorted(path.glob("*.parquet")):
        return parquet(sorted(path.glob("*.parquet")), resolution, allow_missing_captions)
    return image_folder(path, resolution, allow_missing_captions)
