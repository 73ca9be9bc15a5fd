"""dtk.gs fields and cameras: identity reproduces the frame, dolly zoom keeps the subject's size, PLY round trip."""

import json

import numpy as np
import pytest
import torch

from dtk.errors import BadInput
from dtk.gs.cameras import camera_path
from dtk.gs.field import (PLY_ORDER, colors_from_frames, frame_gaussians, load_tracks, read_ply, write_ply)
from dtk.gs.render import render


def synthetic_clip(tmp_path, frames=3, w=48, h=40, f=50.0):
    """Every pixel of a smooth image lifted onto a tilted plane; the clip drifts sideways."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([xs / w, ys / h, 0.5 + 0.5 * np.sin(xs / 5.0) * np.cos(ys / 7.0)], -1)
    depth = 2.0 + 0.01 * xs + 0.005 * ys
    cx, cy = w / 2, h / 2
    x, y = (xs + 0.5 - cx) * depth / f, (ys + 0.5 - cy) * depth / f
    base = np.stack([x, y, depth], -1).reshape(-1, 3)
    xyz = np.stack([base + [0.01 * t, 0, 0] for t in range(frames)])
    np.savez(tmp_path / "tracks.npz", tracks_xyz=xyz, visibility=np.ones(xyz.shape[:2], bool),
             intrinsics=[f, f, cx, cy], image_size=[w, h])
    video = np.stack([image] * frames)
    return tmp_path / "tracks.npz", torch.from_numpy(video), (w, h, f)


def render_frame(tracks, t, colors, view, K, w, h, **options):
    g = frame_gaussians(tracks, t, colors, **options)
    return render(g.means, g.quats, g.scales, g.opacities, g.colors, view[None], K[None], w, h)


def test_identity_camera_reproduces_the_frame(tmp_path):
    path, video, (w, h, f) = synthetic_clip(tmp_path)
    tracks = load_tracks(str(path))
    colors = colors_from_frames(tracks, video)
    views, Ks = camera_path("identity", tracks.frames, tracks.intrinsics, tracks.median_depth())
    assert torch.equal(views[0], torch.eye(4, dtype=torch.float64))
    rgb, alpha, depth = render_frame(tracks, 0, colors, views[0], Ks[0], w, h)
    coverage = float((alpha[0, ..., 0] > 0.99).double().mean())
    error = float((rgb[0] - video[0]).abs().mean())
    # each pixel also sees its nearer neighbours' Gaussians (about a pixel wide): small, but not zero
    shifted = float((video[0, :, 3:] - video[0, :, :-3]).abs().mean())
    assert coverage > 0.99 and error < 0.04 and error < 0.5 * shifted, (coverage, error, shifted)
    z = torch.from_numpy(2.0 + 0.01 * np.arange(w)[None, :] + 0.005 * np.arange(h)[:, None])
    assert float((depth[0, ..., 0] - z).abs().mean()) < 0.02


def test_dolly_zoom_keeps_the_subject_size(tmp_path):
    # a 20 cm square of points at 2 m
    grid = np.stack(np.meshgrid(np.linspace(-0.1, 0.1, 41), np.linspace(-0.1, 0.1, 41)), -1).reshape(-1, 2)
    xyz = np.concatenate([grid, np.full((len(grid), 1), 2.0)], 1)[None].repeat(5, 0)
    np.savez(tmp_path / "t.npz", tracks_xyz=xyz, visibility=np.ones(xyz.shape[:2], bool),
             intrinsics=[80.0, 80.0, 32.0, 32.0], colors=np.ones((len(grid), 3)))
    tracks = load_tracks(str(tmp_path / "t.npz"))
    colors = tracks.colors
    widths = {}
    for spec in ("dolly:1.5,2.0", "translate:0,0,-1.5"):
        views, Ks = camera_path(spec, 5, tracks.intrinsics, tracks.median_depth())
        spans = []
        for t in (0, 4):
            _, alpha, _ = render_frame(tracks, t, colors, views[t], Ks[t], 64, 64, scale_px=0.5)
            cols = (alpha[0, ..., 0] > 0.5).any(0).nonzero()
            spans.append(int(cols.max() - cols.min() + 1))
        widths[spec] = spans
    start, end = widths["dolly:1.5,2.0"]
    assert start >= 10 and abs(end - start) <= 1, widths
    moved_back = widths["translate:0,0,-1.5"]
    assert moved_back[1] < 0.75 * moved_back[0], widths  # without the focal change the subject shrinks


def test_cameras_and_bad_specs(tmp_path):
    views, Ks = camera_path("orbit:30,2", 4, [50, 50, 24, 20], 2.0)
    pivot = torch.tensor([0.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    for view in views:  # the orbit keeps looking at its pivot, at the same distance
        p = view @ pivot
        assert abs(float(p[0])) < 1e-9 and abs(float(p[1])) < 1e-9 and abs(float(p[2]) - 2.0) < 1e-9
    views, Ks = camera_path("focal:2", 3, [50, 50, 24, 20], 2.0)
    assert [float(k[0, 0]) for k in Ks] == [50.0, 75.0, 100.0]
    (tmp_path / "cams.json").write_text(json.dumps({"viewmats": [np.eye(4).tolist()] * 2,
                                                    "intrinsics": [[50, 50, 24, 20]] * 2}))
    views, Ks = camera_path(f"json:{tmp_path / 'cams.json'}", 2, [1, 1, 0, 0], 1.0)
    assert Ks.shape == (2, 3, 3) and float(Ks[1, 0, 0]) == 50.0
    views, Ks = camera_path("orbit:30,2", 1, [50, 50, 24, 20], 2.0)   # one frame: the move's end, not identity
    assert torch.allclose(views[0], camera_path("orbit:30,2", 4, [50, 50, 24, 20], 2.0)[0][-1])
    for name, cams in (("nan", {"viewmats": [[[float("nan")] * 4] * 4] * 3, "intrinsics": [[50, 50, 24, 20]] * 3}),
                       ("row", {"viewmats": [np.ones((4, 4)).tolist()] * 3, "intrinsics": [[50, 50, 24, 20]] * 3}),
                       ("focal", {"viewmats": [np.eye(4).tolist()] * 3, "intrinsics": [[0, 50, 24, 20]] * 3})):
        (tmp_path / f"{name}.json").write_text(json.dumps(cams))
        with pytest.raises(BadInput, match={"nan": "NaN", "row": "last row", "focal": "focal"}[name]):
            camera_path(f"json:{tmp_path / name}.json", 3, [50, 50, 24, 20], 2.0)
    for bad, message in (("spin:3", "unknown camera 'spin'"), ("translate:1,2", "expected 3 number(s)"),
                         ("rotate:a,b,c", "expected 3 number(s)"), (f"json:{tmp_path / 'cams.json'}", "for a clip of 3"),
                         (f"json:{tmp_path}", "cannot read it"), ("dolly:-3,2", "depth + DELTA must be positive")):
        with pytest.raises(BadInput) as e:
            camera_path(bad, 3, [50, 50, 24, 20], 2.0)
        assert message in str(e.value)
        assert "grammar" in str(e.value) or "json" in bad or "dolly" in bad


def test_tracks_bad_input_and_nan_points(tmp_path):
    xyz = np.ones((2, 5, 3))
    xyz[1, 2] = np.nan
    np.savez(tmp_path / "a.npz", tracks_xyz=xyz, visibility=np.ones((2, 5), bool), intrinsics=[10, 10, 5, 5])
    tracks = load_tracks(str(tmp_path / "a.npz"))
    assert tracks.dropped == 1
    g = frame_gaussians(tracks, 1, torch.ones(5, 3, dtype=torch.float64))
    assert len(g.means) == 4 and torch.isfinite(g.means).all()
    np.savez(tmp_path / "b.npz", tracks_xyz=xyz, visibility=np.ones((3, 5), bool), intrinsics=[10, 10, 5, 5])
    with pytest.raises(BadInput, match="visibility"):
        load_tracks(str(tmp_path / "b.npz"))
    with pytest.raises(BadInput, match=r"--video: 4 frames, the tracks have 2"):
        colors_from_frames(tracks, torch.zeros(4, 10, 10, 3))
    # uint8 colours are 0..255 even when a dark frame holds only 0s and 1s
    good = dict(tracks_xyz=np.ones((2, 5, 3)), visibility=np.ones((2, 5), bool), intrinsics=[10, 10, 5, 5])
    np.savez(tmp_path / "c.npz", colors=np.ones((5, 3), np.uint8), **good)
    assert float(load_tracks(str(tmp_path / "c.npz")).colors.max()) == pytest.approx(1 / 255)
    for extra, message in ((dict(image_size=[64]), "image_size"), (dict(image_size=[0, 0]), "image_size"),
                           (dict(image_size=np.array(["a", "b"])), "image_size"),
                           (dict(colors=np.full((5, 3), "x")), "colors")):
        np.savez(tmp_path / "d.npz", **good, **extra)
        with pytest.raises(BadInput, match=message):
            load_tracks(str(tmp_path / "d.npz"))


def test_ply_round_trip(tmp_path):
    g0 = frame_gaussians(load_tracks(str(synthetic_clip(tmp_path)[0])), 0,
                         torch.rand(48 * 40, 3, dtype=torch.float64), opacity=0.7)
    write_ply(tmp_path / "f.ply", g0)
    header = (tmp_path / "f.ply").read_bytes().split(b"end_header")[0].decode()
    assert [line.split()[-1] for line in header.splitlines() if line.startswith("property")] == list(PLY_ORDER)
    g1 = read_ply(str(tmp_path / "f.ply"))
    for name in ("means", "scales", "opacities", "colors"):
        assert torch.allclose(getattr(g0, name), getattr(g1, name), rtol=1e-5, atol=1e-6), name
    broken = header.replace("property float opacity\n", "").encode() + b"end_header\n"
    (tmp_path / "bad.ply").write_bytes(broken)
    with pytest.raises(BadInput, match="missing properties opacity"):
        read_ply(str(tmp_path / "bad.ply"))
