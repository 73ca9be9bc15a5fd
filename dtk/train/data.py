"""Training data: every format a training command reads, behind one small interface.

A dataset is a sequence of examples (``len`` and ``[i]``); an example is a dict
(``image`` as a float tensor [3, H, W] in [-1, 1] and ``caption``, or the
tensors of a pair shard). The order is the engine's business (see
``BatchOrder``), so every format resumes exactly.

Formats, detected from ``--data``:

* a directory of images with ``.txt`` caption sidecars (``a.png`` + ``a.txt``);
* a directory written by ``dtk reflow-pairs`` (pair shards, see ``dtk.pairs``);
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
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dtk.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")


# ---------------------------------------------------------------------------
# Images


def decode_image(data: bytes | Path, where: str, resolution: int):
    """Bytes or a file → float tensor [3, R, R] in [-1, 1]: shorter side resized to R, centre crop."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            if (w, h) != (resolution, resolution):
                im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                               Image.Resampling.BICUBIC)
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{where}: not a readable image ({' '.join(str(e).split())})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


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


# ---------------------------------------------------------------------------
# The formats


def _refuse_missing(where: str, missing: list[str], total: int, allowed: bool, what: str) -> None:
    if missing and not allowed:
        raise BadInput(f"--data {where}: {len(missing)} of {total} images have no {what} (e.g. "
                       f"{', '.join(missing[:3])}); pass --allow-missing-captions to train them with empty captions")


def image_folder(path: Path, resolution: int, allow_missing_captions: bool) -> ImageCaptionDataset:
    # hidden folders are not data (e.g. a result --overwrite has set aside, .ipynb_checkpoints)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    items, missing = [], []
    for f in files:
        txt = f.with_suffix(".txt")
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
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
        images, captions = table.column(image_col).to_pylist(), table.column(caption_col).to_pylist()
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
            items.append(_Item(load=lambda p=tar_path, o=image.offset_data, n=image.size: _read_at(p, o, n),
                               caption=captions[key], where=f"{tar_path}:{image.name}"))
    return ImageCaptionDataset(", ".join(map(str, tars)), items, resolution)


def _tar_caption(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> str:
    text = tf.extractfile(member).read().decode("utf-8").strip()
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


def open_dataset(spec: str, *, resolution: int, allow_missing_captions: bool = False) -> Dataset:
    """Whatever ``--data`` names, as a Dataset."""
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
    from dtk.pairs import is_pair_dir, PairDataset

    if is_pair_dir(path):
        return PairDataset(path)
    if sorted(path.glob("*.tar")):
        return webdataset(sorted(path.glob("*.tar")), resolution)
    if sorted(path.glob("*.parquet")):
        return parquet(sorted(path.glob("*.parquet")), resolution, allow_missing_captions)
    return image_folder(path, resolution, allow_missing_captions)


# ---------------------------------------------------------------------------
# Order


class BatchOrder:
    """Which examples make up micro-batch ``m`` of optimizer step ``s`` on process ``r``.

    The examples are read as one endless stream: epoch ``e`` is a permutation
    drawn from ``(seed, e)``, and the global batch of step ``s`` is positions
    ``[s·G, (s+1)·G)`` of the stream, G = batch × grad_accum × world. So the
    order depends only on the step, resuming at step ``s`` is exact, and one
    process with batch 4 sees the same examples as two with batch 2.
    """

    def __init__(self, size: int, seed: int, batch: int, grad_accum: int, world: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.batch, self.grad_accum, self.world = batch, grad_accum, world
        self._perm: tuple[int, Any] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch * self.grad_accum * self.world

    def _epoch(self, e: int):
        if self._perm is None or self._perm[0] != e:
            import torch

            from dtk.seeds import derive_seed

            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, e))
                perm = torch.randperm(self.size, generator=g).tolist()
            else:
                perm = list(range(self.size))
            self._perm = (e, perm)
        return self._perm[1]

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world + rank) * self.batch
        return list(range(start, start + self.batch))

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        return [self._epoch(p // self.size)[p % self.size] for p in self.positions(step, micro, rank)]


def collate(examples: list[dict]) -> dict:
    import torch

    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
