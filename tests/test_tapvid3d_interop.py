"""dtk track3d's output read the way the official TAPVid-3D evaluator reads it, and scored the way it scores.

The official evaluator is tapnet/tapvid3d/evaluation/evaluate_model.py (google-deepmind/tapnet): per video it
opens the ground-truth npz (allow_pickle=True) and takes images_jpeg_bytes, queries_xyt, tracks_XYZ,
visibility and fx_fy_cx_cy; it rescales fx_fy_cx_cy to a 256-pixel short side (the size of the first decoded
JPEG); it opens the prediction npz of the same name and takes tracks_XYZ [T, N, 3] and visibility [T, N];
then metrics.compute_tapvid3d_metrics(gt_occluded=~visibility, ..., scaling="median",
query_points=queries_xyt[..., ::-1], order="t n"). The reader and metrics below are written here from that
description (nothing of tapnet is imported), to check dtk's file and dtk's --eval against them.
"""

import io
import json

import numpy as np
from PIL import Image

from test_track3d import pixel_queries, scene_ground_truth


def official_style_read(gt_path, pred_path):
    """The key accesses, shapes and dtypes of the official evaluator, on one video."""
    with open(gt_path, "rb") as f:
        gt = np.load(f, allow_pickle=True)
        jpegs, queries, tracks, visible, intrinsics = (gt["images_jpeg_bytes"], gt["queries_xyt"], gt["tracks_XYZ"],
                                                       gt["visibility"], gt["fx_fy_cx_cy"])
    with open(pred_path, "rb") as f:
        pred = np.load(f, allow_pickle=True)
        pred_tracks, pred_visible = pred["tracks_XYZ"], pred["visibility"]   # a KeyError fails the video
    height, width = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB")).shape[:2]
    scaled = intrinsics * (256 / min(height, width))
    assert pred_tracks.shape == tracks.shape and pred_visible.shape == visible.shape   # order "t n"
    assert queries.shape == (tracks.shape[1], 3)
    return dict(gt_occluded=np.logical_not(visible), gt_tracks=tracks, pred_occluded=np.logical_not(pred_visible),
                pred_tracks=pred_tracks, intrinsics=scaled, query_points=queries[..., ::-1])


def official_style_metrics(gt_occluded, gt_tracks, pred_occluded, pred_tracks, intrinsics, query_points):
    """TAPVid-3D 3D-AJ, APD and OA with "median" scaling over [T, N] arrays: every frame weighs 1 (the query
    points only matter to other scalings)."""
    assert query_points.shape[-1] == 3          # (t, y, x): unused by the median scaling
    either = gt_occluded | pred_occluded
    gt_norm = np.where(either, np.nan, np.sqrt(np.maximum(1e-12, (gt_tracks ** 2).sum(-1))))
    pred_norm = np.where(either, np.nan, np.sqrt(np.maximum(1e-12, (pred_tracks ** 2).sum(-1))))
    pred = pred_tracks * (np.nanmedian(gt_norm) / np.nanmedian(pred_norm))
    visible, pred_visible = ~gt_occluded, ~pred_occluded
    per_z = gt_tracks[..., 2] / np.sqrt(intrinsics[0] * intrinsics[1])
    apd, aj = [], []
    for thresh in (1, 2, 4, 8, 16):
        within = ((pred - gt_tracks) ** 2).sum(-1) < (thresh * per_z) ** 2
        correct = within & visible
        apd.append(correct.sum() / visible.sum())
        false_pos = (~visible & pred_visible) | (~within & pred_visible)
        aj.append((correct & pred_visible).sum() / (visible.sum() + false_pos.sum()))
    return {"aj3d": np.mean(aj), "apd3d": np.mean(apd), "oa": (pred_occluded == gt_occluded).mean()}


def official_ground_truth(path, frames, gt):
    """A ground-truth file as the TAPVid-3D generators write one: np.savez, frames as a list of JPEG bytes."""
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    np.savez(path, images_jpeg_bytes=jpegs, queries_xyt=gt["queries_xyt"], tracks_XYZ=gt["tracks_XYZ"],
             visibility=gt["visibility"], fx_fy_cx_cy=gt["fx_fy_cx_cy"])


def test_the_official_evaluator_reads_and_scores_dtk_output(run_dtk, tmp_path):
    from dtk.demo.tracks import make_scene, write_scene

    T, size = 6, 64
    info = write_scene(tmp_path / "scene", seed=5, frames=T, size=size, queries=16)
    scene, rng = make_scene(5, T, size), np.random.default_rng(1)
    frames = [np.asarray(Image.open(tmp_path / "scene" / "frames" / f"{t:03d}.png")) for t in range(T)]
    queries = np.concatenate([pixel_queries(rng, 150, size, f) for f in (0, 2, 5)])
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    official_ground_truth(tmp_path / "gt" / "video.npz", frames, scene_ground_truth(scene, queries))
    # the TAPVid-3D file is the video, the queries and the ground truth at once
    gt_file = tmp_path / "gt" / "video.npz"
    r = run_dtk("track3d", gt_file, "--depth", tmp_path / "scene" / "depth.npy",
                "--intrinsics", ",".join(map(str, info["intrinsics"])), "--queries", gt_file, "--eval", gt_file,
                "--out", tmp_path / "pred" / "video.npz")
    assert r.exit_code == 0, r.stderr
    ours = json.loads(r.stdout)["scores"]
    theirs = official_style_metrics(**official_style_read(gt_file, tmp_path / "pred" / "video.npz"))
    for name, value in theirs.items():   # --eval (at its default 256-pixel resolution) is the official number
        assert abs(ours[name] - value) < 1e-9, (name, ours[name], value)
    assert 0.2 < theirs["apd3d"] < 1 and theirs["oa"] > 0.7, theirs
    pred = np.load(tmp_path / "pred" / "video.npz")
    assert pred["tracks_XYZ"].dtype == np.float32 and pred["visibility"].dtype == bool
    assert np.array_equal(pred["queries_xyt"], queries) and np.allclose(pred["fx_fy_cx_cy"], info["intrinsics"])
    # the dense output (no --queries) carries the official spellings too, the same arrays as dtk's own
    r = run_dtk("track3d", tmp_path / "scene" / "frames", "--depth", tmp_path / "scene" / "depth.npy",
                "--intrinsics", ",".join(map(str, info["intrinsics"])), "--out", tmp_path / "dense.npz")
    assert r.exit_code == 0, r.stderr
    dense = np.load(tmp_path / "dense.npz")
    assert dense["tracks_XYZ"].shape == (T, size * size, 3) and dense["visibility"].shape == (T, size * size)
    assert np.array_equal(dense["tracks_XYZ"], dense["tracks_xyz"], equal_nan=True)
    assert np.array_equal(dense["fx_fy_cx_cy"], dense["intrinsics"])
    assert dense["queries_xyt"].shape == (size * size, 3) and (dense["queries_xyt"][:, 2] == 0).all()


def test_ground_truth_with_pickled_frames_is_refused_not_unpickled(run_dtk, tmp_path):
    """Frames stored as a pickled object array are not loaded (unpickling can run code): a one-line refusal."""
    frames = [np.full((16, 16, 3), 10 * t, np.uint8) for t in range(3)]
    jpegs = np.empty(3, object)
    for t, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG")
        jpegs[t] = buffer.getvalue()
    np.savez(tmp_path / "v.npz", images_jpeg_bytes=jpegs)
    np.save(tmp_path / "d.npy", np.ones((3, 16, 16), np.float32))
    r = run_dtk("track3d", tmp_path / "v.npz", "--depth", tmp_path / "d.npy", "--out", tmp_path / "t.npz")
    assert r.exit_code == 2 and "pickled objects" in r.stderr, r.stderr
    np.savez(tmp_path / "none.npz", depth=np.ones((3, 16, 16)))
    r = run_dtk("track3d", tmp_path / "none.npz", "--depth", tmp_path / "d.npy", "--out", tmp_path / "t.npz")
    assert r.exit_code == 2 and "without images_jpeg_bytes" in r.stderr, r.stderr
