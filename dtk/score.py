"""``dtk score``: add reward scores to a manifest, and form preference pairs from them."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dtk.errors import BadInput
from dtk.io import read_manifest

log = logging.getLogger("dtk")


@dataclass
class ScoreOptions:
    data: str = "-"
    rewards: list[str] = field(default_factory=lambda: ["shapes"])
    clip_model: str = "openai/clip-vit-large-patch14"
    out: str | None = None
    pairs_out: str | None = None
    pair_by: str | None = None
    tie_margin: float = 0.0
    batch_size: int = 32
    device: str = "auto"
    overwrite: bool = False


def _open_image(row: dict, name: str, load: bool = True):
    """The manifest line's image in RGB; ``load`` false: only its header is read (what is checked for every
    image before any reward loads: not an image, or too large for PIL's decompression-bomb limit)."""
    from PIL import UnidentifiedImageError

    from dtk.video import open_image

    where = f"{name}:{row['_line']}: image {row['path']}"
    try:
        with open_image(row["_file"], where, warn=not load) as im:
            return im.convert("RGB") if load else None
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{where}: not a readable image ({' '.join(str(e).split())})") from None


def run_score(opts: ScoreOptions, on_record=None) -> list[dict]:
    from dtk.device import resolve_device
    from dtk.eval.rewards import load_reward, parse_reward_spec
    from dtk.logs import progress_enabled
    from dtk.progress import Progress

    for spec in opts.rewards:
        parse_reward_spec(spec)
    from dtk.eval.rewards import RANK_BY

    names = [parse_reward_spec(s)[0] for s in opts.rewards]
    pair_by = opts.pair_by or RANK_BY.get(names[0], names[0])
    if opts.pairs_out and not pair_by.split("/")[0] in names:
        raise BadInput(f"--pair-by {pair_by}: not among the rewards computed ({', '.join(names)})")
    for option, target in (("--out", opts.out), ("--pairs-out", opts.pairs_out)):
        if target and opts.data != "-" and Path(target).resolve() == Path(opts.data).resolve():
            raise BadInput(f"{option} {target}: is the input --data; choose another file")
        if target and Path(target).exists() and not opts.overwrite:
            raise BadInput(f"{target}: exists; pass --overwrite or choose another file")
    rows = read_manifest(opts.data)
    name = "<stdin>" if opts.data == "-" else opts.data
    for row in rows:   # every image's header before any work: a bad one is bad input, not a failure mid-run
        _open_image(row, name, load=False)
    device = resolve_device(opts.device)
    rewards = [load_reward(spec, device, opts.clip_model) for spec in opts.rewards]
    jpegs: list[bytes] = []
    results = []
    with Progress(len(rows), "score", unit="img", enabled=progress_enabled()) as bar:
        for start in range(0, len(rows), opts.batch_size):
            batch = rows[start:start + opts.batch_size]
            images = [_open_image(r, name) for r in batch]
            prompts = [r.get("prompt", r.get("caption")) for r in batch]
            scores = [dict() for _ in batch]
            for reward in rewards:
                for s, new in zip(scores, reward(images, prompts)):
                    s.update(new)
            if opts.pairs_out:   # the ranking key must exist on every image: checked before anything is written
                lacking = next((r for r, sc in zip(batch, scores) if not isinstance(sc.get(pair_by), (int, float))),
                               None)
                if lacking is not None:
                    known = sorted(k for sc in scores for k in sc)
                    raise BadInput(f"--pair-by {pair_by}: no such score for {name}:{lacking['_line']} (the rewards "
                                   f"give {', '.join(dict.fromkeys(known))})")
            for row, im, s in zip(batch, images, scores):
                rec = {k: v for k, v in row.items() if not k.startswith("_")}
                rec["scores"] = {**rec.get("scores", {}), **s}
                results.append(rec)
                if opts.pairs_out:
                    jpegs.append(_jpeg(im))
            bar.update(len(batch))
    if opts.pairs_out and not preference_pairs(results, pair_by, opts.tie_margin):
        raise BadInput(f"--pairs-out {opts.pairs_out}: no prompt has two or more images, so there are no pairs "
                       "(sample with --num-per-prompt 2 or more)")
    if opts.out:
        from dtk.io import write_jsonl

        write_jsonl(opts.out, results)
    if opts.pairs_out:
        n = write_pairs(opts.pairs_out, results, jpegs, pair_by, opts.tie_margin)
        log.info("score: %d preference pairs by %s → %s", n, pair_by, opts.pairs_out)
    for rec in results:
        if on_record is not None:
            on_record(rec)
    return results


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def preference_pairs(records: list[dict], key: str, tie_margin: float = 0.0) -> list[tuple[int, int, float]]:
    """Every pair (i, j), i before j, of images with the same prompt: ``label_0`` = 1 if i scores
    higher by more than ``tie_margin``, 0 if lower, 0.5 for a tie (Pick-a-Pic's convention)."""
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.get("prompt", rec.get("caption")), []).append(i)
    pairs = []
    for members in groups.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                diff = records[i]["scores"][key] - records[j]["scores"][key]
                pairs.append((i, j, 0.5 if abs(diff) <= tie_margin else float(diff > 0)))
    return pairs


def write_pairs(path: str, records: list[dict], jpegs: list[bytes], key: str, tie_margin: float) -> int:
    """Pick-a-Pic layout: caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1; plus scores and paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtk.io import atomic_write

    pairs = preference_pairs(records, key, tie_margin)
    table = pa.table({
        "caption": [records[i].get("prompt", records[i].get("caption")) for i, _, _ in pairs],
        "jpg_0": pa.array([jpegs[i] for i, _, _ in pairs], type=pa.binary()),
        "jpg_1": pa.array([jpegs[j] for _, j, _ in pairs], type=pa.binary()),
        "label_0": [label for _, _, label in pairs],
        "label_1": [1.0 - label for _, _, label in pairs],
        "score_0": [float(records[i]["scores"][key]) for i, _, _ in pairs],
        "score_1": [float(records[j]["scores"][key]) for _, j, _ in pairs],
        "path_0": [records[i]["path"] for i, _, _ in pairs],
        "path_1": [records[j]["path"] for _, j, _ in pairs],
    })
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)
    return len(pairs)
