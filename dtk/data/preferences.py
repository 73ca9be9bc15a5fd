"""Preference pairs for `dtk dpo` and `dtk train-npo --from-pairs`: (caption, preferred image, other image).

Formats, detected from ``--data``:

* Pick-a-Pic-style parquet (a file or a directory of them): ``caption``,
  ``jpg_0``, ``jpg_1`` (image bytes, or ``{"bytes": ...}``) and ``label_0`` ∈
  {0, 0.5, 1} (1: the first image is preferred); ties (0.5) are dropped and
  counted — this is what ``dtk score --pairs-out`` writes;
* a Hugging Face ``datasets`` directory of the same columns (``save_to_disk``:
  ``state.json`` + Arrow files; a ``DatasetDict`` directory uses its ``train``
  split), read with pyarrow, no download;
* a scored JSONL manifest from ``dtk score`` (``path``, ``prompt``, ``scores``):
  per prompt the best and the worst image form a pair when their scores differ
  by more than ``--min-margin`` (``--pair-by`` names the score when there are several).

Parquet files are read into memory as Arrow (compact: no Python objects per
image); a ``datasets`` directory is memory-mapped, which is the way to train on
all of Pick-a-Pic. Images are decoded when their pair is drawn: a pair with an
image that cannot be decoded is masked out of its batch's loss and counted
(``unreadable`` in the metrics), or with ``--strict`` stops the run naming it —
so the order of training never depends on which images fail. Every image's
header is read when the data is opened (about 1 s per 10,000 images): with
``--strict`` an image that plainly cannot be read (not an image, cut short) is
refused then, not hours in; without, such pairs are counted then
(``unreadable_pairs``) and masked when drawn.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtk.errors import BadInput
from dtk.data.images import Dataset, check_images, column_texts, decode_image

log = logging.getLogger("dtk")

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass
class PreferencePair:
    caption: str
    preferred: Callable[[], bytes | Path]
    other: Callable[[], bytes | Path]
    where: str


class PreferenceDataset(Dataset):
    """Examples ``{"image_w", "image_l", "caption"}``: the preferred ("winner") and the other image."""

    kind = "preferences"

    def __init__(self, name: str, pairs: list[PreferencePair], resolution: int, counts: dict, strict: bool = False):
        self.name, self.pairs, self.resolution, self.counts, self.strict = name, pairs, resolution, counts, strict

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        import torch

        p = self.pairs[i]
        try:
            images = [decode_image(load(), f"{p.where} ({which} image)", self.resolution)
                      for which, load in (("preferred", p.preferred), ("other", p.other))]
            valid = True
        except BadInput as e:
            if self.strict:
                raise BadInput(f"{e} (--strict)") from None
            images, valid = [torch.zeros(3, self.resolution, self.resolution)] * 2, False
        return {"image_w": images[0], "image_l": images[1], "caption": p.caption, "valid": valid}

    def captions(self) -> list[str]:
        return [p.caption for p in self.pairs]

    def check_some_decode(self, tries: int = 16) -> None:
        """Refuse data none of whose first pairs decodes (a wrong image column, a broken export): masked out
        one by one, they would train nothing, and the run would still end as if it had."""
        errors = []
        for p in self.pairs[:tries]:
            try:
                for which, load in (("preferred", p.preferred), ("other", p.other)):
                    decode_image(load(), f"{p.where} ({which} image)", self.resolution)
                return
            except BadInput as e:
                errors.append(str(e))
        if errors:
            raise BadInput(f"{errors[0]}; and none of the first {len(errors)} pairs decodes")

    def describe(self) -> dict:
        return {**super().describe(), **self.counts}


@dataclass(frozen=True)
class _Cell:
    """A loader of one image cell of an Arrow column (bytes, or {"bytes": ...}), read when called; ``view()``:
    the cell as a file, read in place (a memory-mapped table stays on disk but for the bytes read)."""
    column: object
    row: int
    name: str
    where: str

    def __call__(self) -> bytes:
        value = self.column[self.row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)):
            raise BadInput(f"--data {self.where} row {self.row}: column '{self.name}' holds no image bytes")
        return bytes(data)

    def view(self):
        import io

        import pyarrow as pa

        scalar = self.column[self.row]
        if isinstance(scalar, pa.StructScalar):
            scalar = scalar["bytes"] if "bytes" in [f.name for f in scalar.type] else None
        buffer = scalar.as_buffer() if isinstance(scalar, (pa.BinaryScalar, pa.LargeBinaryScalar)) else None
        if buffer is None:   # no bytes in this cell: reading it says so
            data = self()
            return io.BytesIO(data), len(data)
        return pa.BufferReader(buffer), buffer.size


def _cell(column, row: int, name: str, where: str) -> Callable[[], bytes]:
    return _Cell(column, row, name, where)


def _label(value, where: str) -> float | None:
    if value is None:
        return None
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"--data {where}: label_0 {value!r} is not a number (0, 0.5 or 1)") from None
    if not 0.0 <= label <= 1.0:   # NaN included: it would silently make jpg_1 the winner
        raise BadInput(f"--data {where}: label_0 {value!r} is not a preference in [0, 1] (0, 0.5 or 1)")
    return label


def _from_table(table, where: str, pairs: list, counts: dict) -> None:
    names = table.column_names
    missing = [c for c in PAIR_COLUMNS if c not in names]
    if missing:
        raise BadInput(f"--data {where}: no {', '.join(missing)} column (preference pairs need "
                       f"{', '.join(PAIR_COLUMNS)}; it has {', '.join(names)})")
    labels, captions = table.column("label_0").to_pylist(), column_texts(table, "caption", where)
    first, second = table.column("jpg_0"), table.column("jpg_1")
    for row, value in enumerate(labels):
        label = _label(value, f"{where} row {row}")
        if label is None or label == 0.5:
            counts["ties_dropped"] += 1
            continue
        (w, w_name), (l, l_name) = ((first, "jpg_0"), (second, "jpg_1"))[:: 1 if label > 0.5 else -1]
        pairs.append(PreferencePair(str(captions[row] or ""), _cell(w, row, w_name, where),
                                    _cell(l, row, l_name, where), f"{where} row {row}"))


def _arrow_files(path: Path) -> list[Path]:
    if (path / "dataset_dict.json").exists():
        if not (path / "train").is_dir():
            raise BadInput(f"--data {path}: a DatasetDict without a 'train' split")
        path = path / "train"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"--data {path}/state.json: not a datasets state file ({type(e).__name__}: {e})") from None


def _read_arrow(file: Path):
    import pyarrow as pa

    try:  # memory-mapped: the table's buffers stay on disk until a cell is read
        return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
    except Exception:  # noqa: BLE001 - older datasets wrote the file format
        try:
            return pa.ipc.open_file(pa.memory_map(str(file))).read_all()
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"--data {file}: not a readable Arrow file ({e})") from None


def _from_manifest(spec: str, pair_by: str | None, min_margin: float, pairs: list, counts: dict) -> None:
    from dtk.eval.rewards import default_rank_key
    from dtk.io import read_manifest

    by_prompt: dict[str, list[tuple[float, Path, str]]] = {}
    for row in read_manifest(spec):
        where = f"{spec}:{row['_line']}"
        scores = row.get("scores") or {}
        if not isinstance(scores, dict):
            raise BadInput(f"--data {where}: 'scores' is not an object of reward → value")
        if not scores:
            raise BadInput(f"--data {where}: no scores; run the manifest through `dtk score` first")
        key = pair_by or default_rank_key(scores)   # the first reward's continuous score, as `dtk score` pairs
        if key not in scores:
            raise BadInput(f"--data {where}: no score '{key}' (it has {', '.join(scores)})")
        try:
            value = float(scores[key])
        except (TypeError, ValueError):
            raise BadInput(f"--data {where}: score '{key}' {scores[key]!r} is not a number") from None
        if not math.isfinite(value):   # a NaN would sort anywhere and win or lose its prompt at random
            raise BadInput(f"--data {where}: score '{key}' is {value}")
        by_prompt.setdefault(row.get("prompt", row.get("caption", "")), []).append((value, row["_file"], where))
    for prompt, scored in by_prompt.items():
        if len(scored) < 2:
            continue
        scored.sort(key=lambda s: s[0])
        (low, low_file, low_where), (high, high_file, high_where) = scored[0], scored[-1]
        if high - low <= min_margin:
            counts["ties_dropped"] += 1
            continue
        pairs.append(PreferencePair(prompt, lambda f=high_file: f, lambda f=low_file: f,
                                    f"{high_where} vs {low_where.rsplit(':', 1)[-1]}"))


def _check_readable(pairs: list[PreferencePair], counts: dict, strict: bool) -> None:
    """Every image's header, before training (about 1 s per 10,000 images). With ``strict`` the first that
    cannot be read is refused now, not when its batch comes, maybe hours in; without, the pairs stay (masked
    out of their batch's loss when drawn, as before) and are counted now (``unreadable_pairs``), in one line."""
    if len(pairs) >= 10000:
        log.info("data: checking the headers of %d pairs' images", len(pairs))
    sources = [load for p in pairs for load in (p.preferred, p.other)]
    bad: dict[int, str] = {}
    for i, problem in check_images(sources):
        if problem is None:
            continue
        pair, which = pairs[i // 2], ("preferred", "other")[i % 2]
        message = f"--data {pair.where} ({which} image): not a readable image ({problem})"
        if strict:
            raise BadInput(f"{message} (--strict)")
        bad.setdefault(i // 2, message)
    if bad:
        counts["unreadable_pairs"] = len(bad)
        log.warning("data: %d of %d pair(s) have an image that cannot be read (e.g. %s); they are masked out of "
                    "the loss (--strict refuses them)", len(bad), len(pairs), next(iter(bad.values())))


def open_preferences(spec: str, *, resolution: int, strict: bool = False, pair_by: str | None = None,
                     min_margin: float = 0.0) -> PreferenceDataset:
    import pyarrow.parquet as pq

    pairs: list[PreferencePair] = []
    counts = {"ties_dropped": 0}
    path = Path(spec).expanduser()
    if spec == "-" or spec.endswith(".jsonl"):
        if spec != "-" and not path.is_file():
            raise BadInput(f"--data {spec}: no such file")
        _from_manifest(spec, pair_by, min_margin, pairs, counts)
    elif not path.exists():
        raise BadInput(f"--data {spec}: no such file or directory")
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        for file in _arrow_files(path):
            _from_table(_read_arrow(file), str(file), pairs, counts)
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise BadInput(f"--data {spec}: expected preference pairs (Pick-a-Pic parquet, a datasets directory "
                           "or a scored JSONL manifest)")
        for file in files:
            try:
                table = pq.read_table(file)
            except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
                raise BadInput(f"--data {file}: not a readable parquet file ({' '.join(str(e).split())})") from None
            _from_table(table, str(file), pairs, counts)
    if counts["ties_dropped"]:
        log.info("data: %d tied pair(s) dropped", counts["ties_dropped"])
    if not pairs:
        hint = ("; every pair is a tie: rank by a continuous score (`dtk score --pair-by SCORE`, e.g. "
                "shapes/confidence, or --pair-by here for a manifest) or lower --min-margin / --tie-margin"
                if counts["ties_dropped"] else "")
        raise BadInput(f"--data {spec}: no usable preference pair ({counts['ties_dropped']} tied){hint}")
    _check_readable(pairs, counts, strict)
    return PreferenceDataset("<stdin>" if spec == "-" else spec, pairs, resolution, counts, strict)
