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

An image that cannot be decoded drops its pair (counted in the log), or with
``--strict`` stops the run naming it. Images are checked once when the data
is opened, so the order of training never depends on which ones fail.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtk.errors import BadInput
from dtk.train.data import Dataset, decode_image

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

    def __init__(self, name: str, pairs: list[PreferencePair], resolution: int, counts: dict):
        self.name, self.pairs, self.resolution, self.counts = name, pairs, resolution, counts

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        return {"image_w": decode_image(p.preferred(), f"{p.where} (preferred)", self.resolution),
                "image_l": decode_image(p.other(), f"{p.where} (other)", self.resolution), "caption": p.caption}

    def captions(self) -> list[str]:
        return [p.caption for p in self.pairs]

    def describe(self) -> dict:
        return {**super().describe(), **self.counts}


def _readable(data: bytes | Path) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - whatever PIL raises, the image is unusable
        return False


def _as_bytes(value, column: str, where: str) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        raise BadInput(f"--data {where}: column '{column}' holds no image bytes")
    return bytes(data)


def _from_table(table, where: str, pairs: list, counts: dict) -> None:
    names = table.column_names
    missing = [c for c in PAIR_COLUMNS if c not in names]
    if missing:
        raise BadInput(f"--data {where}: no {', '.join(missing)} column (preference pairs need "
                       f"{', '.join(PAIR_COLUMNS)}; it has {', '.join(names)})")
    cols = {c: table.column(c).to_pylist() for c in PAIR_COLUMNS}
    for row in range(table.num_rows):
        label = cols["label_0"][row]
        if label is None or float(label) == 0.5:
            counts["ties_dropped"] += 1
            continue
        first, second = (_as_bytes(cols[c][row], c, f"{where} row {row}") for c in ("jpg_0", "jpg_1"))
        w, l = (first, second) if float(label) > 0.5 else (second, first)
        pairs.append(PreferencePair(str(cols["caption"][row] or ""), lambda d=w: d, lambda d=l: d,
                                    f"{where} row {row}"))


def _arrow_files(path: Path) -> list[Path]:
    if (path / "dataset_dict.json").exists():
        if not (path / "train").is_dir():
            raise BadInput(f"--data {path}: a DatasetDict without a 'train' split")
        path = path / "train"
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state.get("_data_files", [])]


def _read_arrow(file: Path):
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception:  # noqa: BLE001 - older datasets wrote the file format
        try:
            with pa.memory_map(str(file)) as source:
                return pa.ipc.open_file(source).read_all()
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"--data {file}: not a readable Arrow file ({e})") from None


def _from_manifest(spec: str, pair_by: str | None, min_margin: float, pairs: list, counts: dict) -> None:
    from dtk.io import read_manifest

    by_prompt: dict[str, list[tuple[float, Path, str]]] = {}
    for row in read_manifest(spec):
        where = f"{spec}:{row['_line']}"
        scores = row.get("scores") or {}
        if not scores:
            raise BadInput(f"--data {where}: no scores; run the manifest through `dtk score` first")
        key = pair_by or (next(iter(scores)) if len(scores) == 1 else None)
        if key is None:
            raise BadInput(f"--data {where}: several scores ({', '.join(scores)}); choose one with --pair-by")
        if key not in scores:
            raise BadInput(f"--data {where}: no score '{key}' (it has {', '.join(scores)})")
        by_prompt.setdefault(row.get("prompt", row.get("caption", "")), []).append(
            (float(scores[key]), row["_file"], where))
    for prompt, scored in by_prompt.items():
        if len(scored) < 2:
            continue
        scored.sort(key=lambda s: s[0])
        (low, low_file, low_where), (high, high_file, _) = scored[0], scored[-1]
        if high - low <= min_margin:
            counts["ties_dropped"] += 1
            continue
        pairs.append(PreferencePair(prompt, lambda f=high_file: f, lambda f=low_file: f, low_where))


def open_preferences(spec: str, *, resolution: int, strict: bool = False, pair_by: str | None = None,
                     min_margin: float = 0.0) -> PreferenceDataset:
    import pyarrow.parquet as pq

    pairs: list[PreferencePair] = []
    counts = {"ties_dropped": 0, "unreadable_dropped": 0}
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
    kept = []
    for p in pairs:
        bad = next((which for which, load in (("preferred", p.preferred), ("other", p.other))
                    if not _readable(load())), None)
        if bad is None:
            kept.append(p)
        elif strict:
            raise BadInput(f"--data {p.where}: the {bad} image cannot be decoded (--strict)")
        else:
            counts["unreadable_dropped"] += 1
    if counts["unreadable_dropped"]:
        log.warning("data: %d pair(s) dropped: an image cannot be decoded (--strict stops instead)",
                    counts["unreadable_dropped"])
    if counts["ties_dropped"]:
        log.info("data: %d tied pair(s) dropped", counts["ties_dropped"])
    if not kept:
        raise BadInput(f"--data {spec}: no usable preference pair ({counts['ties_dropped']} tied, "
                       f"{counts['unreadable_dropped']} unreadable)")
    return PreferenceDataset("<stdin>" if spec == "-" else spec, kept, resolution, counts)
