"""dtk render-gs end to end on a synthetic clip: outputs, identity reproduces the frames, bad input."""

import json

import numpy as np
from PIL import Image

from test_gs_field import synthetic_clip


def write_frames(video, folder):
    folder.mkdir()
    for t, frame in enumerate(video.numpy()):
        Image.fromarray((frame * 255).round().astype("uint8")).save(folder / f"{t:04d}.png")
    return folder


def test_render_gs_end_to_end(run_dtk, tmp_path):
    tracks, video, (w, h, f) = synthetic_clip(tmp_path, frames=3)
    frames = write_frames(video, tmp_path / "frames")
    out = tmp_path / "out"
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--camera", "identity", "--camera", "orbit:10",
                "--depth", "--alpha", "--export-ply", "--video-format", "webp", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["camera"] for rec in records] == ["identity", "orbit:10"]
    for k in range(2):
        for t in range(3):
            assert (out / f"cam{k}-{t:05d}.png").is_file() and (out / f"cam{k}-alpha-{t:05d}.png").is_file()
        assert Image.open(out / f"cam{k}.webp").n_frames == 3
    depth = np.asarray(Image.open(out / "cam0-depth-00000.png"))
    assert depth.dtype == np.uint16 and 1900 < np.median(depth) < 2600  # millimetres of a plane at 2.0–2.7 m
    first = np.asarray(Image.open(out / "cam0-00000.png")).astype(float) / 255
    assert np.abs(first - video[0].numpy()).mean() < 0.04
    moved = np.asarray(Image.open(out / "cam1-00002.png")).astype(float) / 255
    assert np.abs(moved - video[2].numpy()).mean() > 0.05  # the orbit sees it from elsewhere
    assert (out / "field-00002.ply").is_file()
    meta = json.loads((out / "dtk.json").read_text())
    assert meta["command"] == "render-gs" and "cam1.webp" in meta["files"]
    r = run_dtk("render-gs", "--ply", out / "field-00000.ply", "--intrinsics", f"{f},{f},{w / 2},{h / 2}",
                "--size", f"{w}x{h}", "--frames", 2, "--camera", "dolly:0.5", "--video-format", "gif",
                "--device", "cpu", "--out", tmp_path / "ply")
    assert r.exit_code == 0, r.stderr
    assert Image.open(tmp_path / "ply" / "cam0.gif").n_frames == 2


def test_render_gs_bad_input(run_dtk, tmp_path):
    tracks, video, _ = synthetic_clip(tmp_path, frames=3)
    frames = write_frames(video[:2], tmp_path / "frames")

    def bad(*args):
        r = run_dtk("render-gs", *args, "--device", "cpu", "--out", tmp_path / "x")
        assert r.exit_code == 2, r.stderr
        assert not (tmp_path / "x" / "dtk.json").exists()
        return r.stderr

    assert "--video: 2 frames, the tracks have 3" in bad("--tracks", tracks, "--video", frames)
    err = bad("--tracks", tracks, "--video", frames, "--camera", "spin:3")
    assert "unknown camera 'spin'" in err and "grammar: identity | translate:X,Y,Z" in err
    assert "holds no colors; give --video" in bad("--tracks", tracks)
    assert "give --tracks NPZ" in bad()
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\n"
                                       b"property float x\nend_header\n")
    assert "missing properties y, z" in bad("--ply", tmp_path / "bad.ply", "--intrinsics", "1,1,1,1", "--size", "4x4")
    assert "expected 4 comma-separated numbers" in bad("--ply", tmp_path / "bad.ply", "--intrinsics", "1,1")
    assert "focal lengths must be positive" in bad("--ply", tmp_path / "bad.ply", "--intrinsics", "0,0,4,4",
                                                   "--size", "4x4")
    assert "both sides must be at least 1" in bad("--tracks", tracks, "--video", frames, "--size", "0x0")
    assert "depth + DELTA must be positive" in bad("--tracks", tracks, "--video", frames, "--camera", "dolly:-3,2")
    import shutil

    if shutil.which("ffmpeg") is None:   # refused before anything is rendered
        assert "ffmpeg is not installed" in bad("--tracks", tracks, "--video", frames, "--video-format", "mp4")
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
