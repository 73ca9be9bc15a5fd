"""Video training data (groundwork of video models): captioned clips as fixed-length frame stacks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dtk.data.videos import open_videos
from dtk.errors import BadInput


def coloured_frames(n: int, size=(24, 16)) -> list[np.ndarray]:
    """Frame i is one colour: red = 10·i, so which frames were taken can be read back."""
    w, h = size
    return [np.full((h, w, 3), (10 * i, 100, 200), dtype=np.uint8) for i in range(n)]


def write_clips(folder):
    from dtk.video import write_video

    folder.mkdir()
    write_video(folder / "a.webp", coloured_frames(12), fps=8)              # an animated WebP (lossless)
    (folder / "a.txt").write_text("a red circle moving right\n")
    frames = folder / "b"                                         # a folder of frames
    frames.mkdir()
    for i, f in enumerate(coloured_frames(9)):
        Image.fromarray(f).save(frames / f"{i}.png")
    (folder / "b.txt").write_text("a blue star")
    return folder


def red_values(video: torch.Tensor) -> list[int]:
    """The red value of each frame of a [3, F, R, R] tensor in [-1, 1]."""
    return [round(float((video[0, f].mean() + 1) * 127.5)) for f in range(video.shape[1])]


def test_clips_and_frame_folders_at_a_stride(tmp_path):
    data = open_videos(str(write_clips(tmp_path / "v")), frames=5, stride=2, resolution=16)
    assert len(data) == 2 and data.captions() == ["a red circle moving right", "a blue star"]
    a, b = data[0], data[1]
    assert a["video"].shape == b["video"].shape == (3, 5, 16, 16)
    assert red_values(a["video"]) == red_values(b["video"]) == [0, 20, 40, 60, 80]   # frames 0, 2, 4, 6, 8
    assert float(a["video"].min()) >= -1 and float(a["video"].max()) <= 1
    assert data.describe()["format"] == "videos" and data.kind == "videos"


def test_a_manifest_of_clips(tmp_path):
    folder = write_clips(tmp_path / "v")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(folder / "a.webp"), "prompt": "a red circle"}) + "\n")
    data = open_videos(str(manifest), frames=3, resolution=8)
    assert len(data) == 1 and red_values(data[0]["video"]) == [0, 10, 20] and data[0]["caption"] == "a red circle"


def test_bad_clips_are_named(tmp_path):
    folder = write_clips(tmp_path / "v")
    with pytest.raises(BadInput, match=r"b: too short: 5 of the 6 frames the model takes at stride 2 "
                                       r"\(a clip of at least 11\)"):
        open_videos(str(folder), frames=6, stride=2, resolution=16)[1]
    (folder / "c.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnot a video")
    (folder / "c.txt").write_text("broken")
    with pytest.raises(BadInput, match=r"c\.webp"):
        open_videos(str(folder), frames=2, resolution=16)[2]
    Image.fromarray(coloured_frames(1, size=(8, 8))[0]).save(folder / "b" / "9.png")   # a 10th frame of another size
    with pytest.raises(BadInput, match="frames of different sizes"):
        open_videos(str(folder), frames=10, resolution=16)[1]
    (folder / "c.txt").unlink()
    with pytest.raises(BadInput, match="1 of 3 clips have no .txt caption"):
        open_videos(str(folder), frames=2, resolution=16)
    with pytest.raises(BadInput, match="no such file or directory"):
        open_videos(str(tmp_path / "nothing"), frames=2, resolution=16)
