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


def test_render_gs_refuses_size_not_wxh_and_asks_for_an_input(run_dtk, tmp_path):
    tracks, video, _ = synthetic_clip(tmp_path, frames=2)
    for size in ("10,20", "10.5x20", "640"):
        r = run_dtk("render-gs", "--tracks", tracks, "--size", size, "--device", "cpu", "--out", tmp_path / "x")
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert r.exit_code == 2 and len(errors) == 1, r.stderr
        assert "--size" in errors[0] and "WxH" in errors[0] and size in errors[0]
        assert not (tmp_path / "x").exists()
    for args in ((), ("--out", tmp_path / "x")):   # with no input, that is what is missing, --out or not
        r = run_dtk("render-gs", *args)
        assert r.exit_code == 2 and "no input: give --tracks NPZ" in r.stderr and "--ply FILE" in r.stderr, r.stderr
    r = run_dtk("render-gs", "--tracks", tracks)
    assert r.exit_code == 2 and "Missing option '--out'" in r.stderr
    r = run_dtk("render-gs", "--tracks", tracks, "--ply", tracks, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "give one of them, not both" in r.stderr


def sh_ply(path, degree, seed=0, n=1):
    """A 3DGS PLY: Gaussians around the origin with degree-``degree`` SH (random; one Gaussian: only red's x term)."""
    import torch

    from dtk.gs.field import Gaussians, write_ply

    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(1, 3, dtype=torch.float64) if n == 1 else torch.randn(n, 3, generator=g).double() * 0.3
    sh = torch.randn(n, (degree + 1) ** 2, 3, generator=g).double() * 0.3
    if n == 1 and degree:
        sh[:, 1:] = 0
        sh[:, 3, 0] = 0.8
    scales = torch.full((n, 3), 0.3 if n == 1 else 0.08, dtype=torch.float64)
    write_ply(path, Gaussians(means=means, quats=torch.tensor([[1.0, 0, 0, 0]]).double().expand(n, 4), scales=scales,
                              opacities=torch.full((n,), 0.9, dtype=torch.float64), colors=torch.zeros(n, 3), sh=sh))
    return path


def opposite_cameras(tmp_path):
    """json cameras 2 m from the origin on −x and on +x, both looking at it (one frame)."""
    import math

    from dtk.gs.cameras import pose, rotation

    specs = []
    for name, yaw in (("minus-x", math.pi / 2), ("plus-x", -math.pi / 2)):
        R = rotation(yaw, 0.0, 0.0)
        (tmp_path / f"{name}.json").write_text(json.dumps({"viewmats": [pose(R, -2.0 * R[:, 2]).tolist()],
                                                           "intrinsics": [[40.0, 40.0, 16.0, 16.0]]}))
        specs += ["--camera", f"json:{tmp_path / name}.json"]
    return specs


def test_render_gs_ply_sh_is_view_dependent_and_survives_export(run_dtk, tmp_path):
    cams = opposite_cameras(tmp_path)
    common = ("--intrinsics", "40,40,16,16", "--size", "32x32", *cams, "--video-format", "gif", "--device", "cpu")

    def images(out):
        return [np.asarray(Image.open(out / f"cam{k}-00000.png")).astype(int) for k in range(2)]

    # one isotropic Gaussian at the origin looks the same from −x and +x, but for its view-dependent colour
    for degree in (0, 1):
        r = run_dtk("render-gs", "--ply", sh_ply(tmp_path / f"d{degree}.ply", degree), *common,
                    "--out", tmp_path / f"d{degree}")
        assert r.exit_code == 0, r.stderr
        a, b = images(tmp_path / f"d{degree}")
        if degree == 0:
            assert np.abs(a - b).max() <= 1 and a.max() > 50
        else:   # red: 0.5 + C0·dc ∓ C1·0.8 from −x / +x (v = ±x), times α ≈ 0.9 at the centre
            assert b[16, 16, 0] - a[16, 16, 0] > 150, (a[16, 16], b[16, 16])
            assert np.abs(a[..., 1:] - b[..., 1:]).max() <= 1
        assert json.loads((tmp_path / f"d{degree}" / "dtk.json").read_text())["sh_degree"] == degree
    # export → --ply → render gives the same images, in either PLY layout; compact is smaller
    sh_ply(tmp_path / "scene.ply", 3, seed=2, n=300)
    r = run_dtk("render-gs", "--ply", tmp_path / "scene.ply", *common, "--export-ply", "--out", tmp_path / "first")
    assert r.exit_code == 0, r.stderr
    first = images(tmp_path / "first")
    assert np.abs(first[0] - first[1]).max() > 30
    r = run_dtk("render-gs", "--ply", tmp_path / "first" / "field-00000.ply", *common, "--export-ply",
                "--ply-format", "compact", "--out", tmp_path / "again")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("render-gs", "--ply", tmp_path / "again" / "field-00000.ply", *common, "--out", tmp_path / "compact")
    assert r.exit_code == 0, r.stderr
    for out in ("again", "compact"):
        for x, y in zip(first, images(tmp_path / out)):
            assert np.array_equal(x, y), out
    full, compact = (tmp_path / "first" / "field-00000.ply").stat().st_size, \
        (tmp_path / "again" / "field-00000.ply").stat().st_size
    assert compact < full   # degree 3 needs all 45 f_rest_*: only the normals go


def test_render_gs_compact_export_of_a_track_field(run_dtk, tmp_path):
    tracks, video, (w, h, f) = synthetic_clip(tmp_path, frames=2)
    frames = write_frames(video, tmp_path / "frames")
    sizes = {}
    for fmt in ("full", "compact"):
        r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--export-ply", "--ply-format", fmt,
                    "--video-format", "gif", "--device", "cpu", "--out", tmp_path / fmt)
        assert r.exit_code == 0, r.stderr
        sizes[fmt] = (tmp_path / fmt / "field-00001.ply").stat().st_size
    header = (tmp_path / "compact" / "field-00001.ply").read_bytes().split(b"end_header")[0].decode()
    assert "f_rest_0" not in header and "nx" not in header
    assert sizes["compact"] < 0.25 * sizes["full"], sizes   # 56 against 248 bytes per Gaussian
    for fmt in ("full", "compact"):
        r = run_dtk("render-gs", "--ply", tmp_path / fmt / "field-00001.ply",
                    "--intrinsics", f"{f},{f},{w / 2},{h / 2}", "--size", f"{w}x{h}", "--video-format", "gif",
                    "--device", "cpu", "--out", tmp_path / f"{fmt}-r")
        assert r.exit_code == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "full-r" / "cam0-00000.png")),
                          np.asarray(Image.open(tmp_path / "compact-r" / "cam0-00000.png")))
    assert json.loads((tmp_path / "full-r" / "dtk.json").read_text())["sh_degree"] == 0
