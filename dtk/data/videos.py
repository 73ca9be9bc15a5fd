"""Video training data: captioned clips as the fixed-length frame stacks a video model trains on.

A clip is a folder of frames, an animated GIF/WebP/PNG, or any video ffmpeg decodes (``dtk.video.read_frames``).
Formats, detected from ``--data``:

* a directory of clips with ``.txt`` caption sidecars: ``a.mp4`` + ``a.txt``, or a frame folder ``b/`` +
  ``b.txt``;
* a JSONL manifest (``path`` + ``prompt``/``caption`` per line, ``-`` = stdin).

An example is ``video``, a float tensor [3, F, R, R] in [-1, 1] — frames 0, s, 2s, … of the clip (F of them at
stride s), each frame's shorter side resized to R and centre-cropped as images are — and ``caption``. A clip
too short for F frames at stride s, with frames of mixed sizes, or that does not decode is bad input naming
its path. Clips are decoded when their example is read (no headers to check up front, as video containers
must be decoded to be checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtk.data.images import Dataset, _refuse_missing, _text, fit_square
from dtk.errors import BadInput

CLIP_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp")


def frames_to_tensor(frames: np.ndarray, resolution: int):
    """uint8 frames [F, H, W, 3] → float [3, F, R, R] in [-1, 1], each frame fitted as images are."""
    import torch
    from PIL import Image

    out = [np.asarray(fit_square(Image.fromarray(frame), resolution), dtype=np.uint8) for frame in frames]
    return torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class _Clip:
    path: Path
    caption: str
    where: str   # for error messages


class VideoCaptionDataset(Dataset):
    """Captioned clips, decoded lazily into ``frames`` frames at ``stride``, ``resolution`` pixels square."""

    kind = "videos"

    def __init__(self, name: str, clips: list[_Clip], frames: int, stride: int, resolution: int):
        if not clips:
            raise BadInput(f"--data {name}: no clips in it")
        if frames < 1 or stride < 1:
            raise ValueError(f"frames {frames}, stride {stride}: must be at least 1")
        self.name, self.clips = name, clips
        self.frames, self.stride, self.resolution = frames, stride, resolution

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        from dtk.video import read_frames

        clip = self.clips[i]
        # only the frames the model takes are decoded (at most that many, every stride-th)
        frames = read_frames(str(clip.path), option="--data", stride=self.stride, max_frames=self.frames)
        if len(frames) < self.frames:
            raise BadInput(f"--data {clip.where}: too short: {len(frames)} of the {self.frames} frames the model "
                           f"takes at stride {self.stride} (a clip of at least {(self.frames - 1) * self.stride + 1})")
        return {"video": frames_to_tensor(frames, self.resolution), "caption": clip.caption}

    def captions(self) -> list[str]:
        return [c.caption for c in self.clips]

    def describe(self) -> dict:
        return {"data": self.name, "format": "videos", "examples": len(self), "frames": self.frames,
                "stride": self.stride}


def video_folder(path: Path, frames: int, stride: int, resolution: int,
                 allow_missing_captions: bool = False) -> VideoCaptionDataset:
    """Clip files and frame folders directly in ``path``, each with its ``.txt`` caption beside it."""
    entries = sorted(p for p in path.iterdir() if not p.name.startswith(".")
                     and ((p.is_file() and p.suffix.lower() in CLIP_SUFFIXES) or p.is_dir()))
    clips, missing = [], []
    for p in entries:
        txt = p.with_suffix(".txt") if p.is_file() else p.parent / f"{p.name}.txt"
        if txt.is_file():
            caption = _text(txt.read_bytes(), str(txt)).strip()
        else:
            missing.append(p.name)
            caption = ""
        clips.append(_Clip(p, caption, str(p)))
    _refuse_missing(str(path), missing, len(entries), allow_missing_captions, ".txt caption", things="clips")
    return VideoCaptionDataset(str(path), clips, frames, stride, resolution)


def video_manifest(spec: str, frames: int, stride: int, resolution: int) -> VideoCaptionDataset:
    """A JSONL manifest of clips (``path`` + ``prompt``/``caption``), relative paths from the manifest's folder."""
    from dtk.io import read_manifest   # it requires a prompt on every line

    name = "<stdin>" if spec == "-" else spec
    clips = [_Clip(Path(row["_file"]), row.get("prompt", row.get("caption")), f"{name}:{row['_line']} ({row['path']})")
             for row in read_manifest(spec)]
    return VideoCaptionDataset(name, clips, frames, stride, resolution)


def open_videos(spec: str, *, frames: int, stride: int = 1, resolution: int,
                allow_missing_captions: bool = False) -> VideoCaptionDataset:
    """Whatever ``--data`` names, as captioned clips."""
    if spec == "-" or spec.endswith(".jsonl"):
        if spec != "-" and not Path(spec).is_file():
            raise BadInput(f"--data {spec}: no such file")
        return video_manifest(spec, frames, stride, resolution)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BadInput(f"--data {spec}: " + ("not a folder of clips or a .jsonl manifest" if path.exists()
                                             else "no such file or directory"))
    return video_folder(path, frames, stride, resolution, allow_missing_captions)
