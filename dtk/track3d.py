"""``dtk track3d``: dense 3D point tracking of a video (every first-frame pixel), lifted with depth.

2D: optical flow (OpenCV DIS, no weights) chained frame to frame gives each
first-frame pixel a path; with refinement the flow from frame 0 straight to
frame t is then computed starting from the chained estimate, which removes the
drift chaining accumulates and re-acquires points after short occlusions. Per
point the refined position is kept where it matches frame 0 at least as well
(blurred intensity) as the chained one — long-range flow fails too, under
large deformation — and the chain continues from the kept position.
Visibility: a point is visible in frame t when it is inside the frame, the
backward flow t → 0 brings it back to where it started (forward–backward
consistency, |f + b(x + f)|² ≤ 0.01(|f|² + |b|²) + 0.5), and it still looks like
itself (blurred intensity within 24 grey levels of frame 0's: regularised flows
can agree with each other straight across an occluder). The 2D engine is one
class (``FlowTracker``): a learned refiner plugs in by overriding ``flow``.

Sparse queries at any frame (TAPVid-3D's ``queries_xyt``: x, y and the query's
own frame t): the same dense tracking is run from each distinct query frame t
— every pixel of frame t, forwards to the last frame and backwards to frame 0,
frame t taking frame 0's place above (its chain, refinement and checks) — and
each query takes the track of its own point: its position plus the dense
displacement interpolated bilinearly from the four nearest pixel tracks (so it
is exactly at the query in frame t), visible where those tracks' bilinear
weights that are visible sum above one half, lifted with the depth at its own
positions. One dense run per distinct query frame (the frame-to-frame flows
are computed once and shared between runs).

3D: each frame's depth (given maps, or a transformers depth model) is sampled
at the track's position and the point lifted: (x, y, z) = z·K⁻¹(u, v, 1) in
that frame's camera coordinates. Positions are continuous pixel coordinates:
pixel (i, j) covers [j, j + 1) × [i, i + 1), its centre is (j + 0.5, i + 0.5).

Output, TAPVid-3D layout under its official key spellings (those
tapnet/tapvid3d/evaluation/evaluate_model.py reads: ``tracks_XYZ`` [T, N, 3],
``visibility`` [T, N], time first; ``queries_xyt``, ``fx_fy_cx_cy``) and dtk's
lower-case ones (``tracks_xyz``, ``intrinsics``: the same arrays, what ``dtk
render-gs`` reads), plus ``tracks_uv``, ``image_size`` and per-point ``colors``.
Dense (the default): every first-frame pixel, row by row (``grid_shape``).
With ``queries``: one track per query, in the query file's pixel units.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtk.errors import BadInput, RunFailure, check_number

log = logging.getLogger("dtk")

THRESHOLDS = (1, 2, 4, 8, 16)
PHOTO_TOLERANCE = 24.0   # grey levels (of 255) a visible point's blurred intensity may change by
# bytes per pixel and frame (after --max-side) of a run: positions, visibility, blurred frames, depth, 3D
# tracks and their lifting, the shared flows (measured: 80–95 on dense runs); checked before tracking
TRACK_BYTES = 100


def _cv2():
    try:
        import cv2
    except ImportError:
        raise BadInput("dtk track3d needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def bilinear(field: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Sample ``field`` [H, W, C] at continuous positions ``pos`` [N, 2] (pixel centres at +0.5), edge-clamped."""
    h, w = field.shape[:2]
    x = np.clip(pos[:, 0] - 0.5, 0, w - 1)
    y = np.clip(pos[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    f = field.reshape(h, w, -1)
    top = f[y0, x0] * (1 - fx) + f[y0, x1] * fx
    bottom = f[y1, x0] * (1 - fx) + f[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).reshape(len(pos), *field.shape[2:])


class FlowTracker:
    """Dense 2D tracks of every first-frame pixel. Override ``flow`` to plug in another (learned) flow."""

    def __init__(self, preset: str = "medium"):
        cv2 = _cv2()
        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        self.dis = cv2.DISOpticalFlow_create(presets[preset])

    def flow(self, a: np.ndarray, b: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        """Flow [H, W, 2] from gray frame a to gray frame b (optionally starting from ``init``: DIS takes a
        flow argument of the right size and type as its initial estimate)."""
        # never None: OpenCV's DIS keeps the last initial flow it was given and starts from it again when a
        # later call passes none (a 200 px start leaked into the next frame-to-frame flow)
        start = np.zeros((*a.shape[:2], 2), np.float32) if init is None else np.ascontiguousarray(init, np.float32)
        return self.dis.calc(a, b, start)

    def track(self, gray: np.ndarray, refine: bool = True, start: int = 0, steps: dict | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Positions [T, H·W, 2] and visibility [T, H·W] of every pixel of frame ``start`` (row by row), for
        gray frames [T, H, W]: forwards to the last frame and backwards to frame 0. ``steps``, a dict, keeps
        the frame-to-frame flows (keyed (from, to)) for further calls on the same frames."""
        T, H, W = gray.shape
        if not 0 <= start < T:
            raise ValueError(f"start frame {start} outside 0..{T - 1}")
        ys, xs = np.mgrid[0:H, 0:W]
        grid = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) + 0.5
        pos = np.empty((T, H * W, 2), np.float32)
        vis = np.ones((T, H * W), bool)
        pos[start] = grid
        cv2 = _cv2()
        smooth = np.stack([cv2.blur(g, (3, 3)).astype(np.float32) for g in gray])
        ref = smooth[start].reshape(-1)
        # each frame continues from its neighbour towards the start frame: forwards, then backwards
        order = [(t, t - 1) for t in range(start + 1, T)] + [(t, t + 1) for t in range(start - 1, -1, -1)]
        for t, prev in order:
            step = steps.get((prev, t)) if steps is not None else None
            if step is None:
                step = self.flow(gray[prev], gray[t])
                if steps is not None:
                    steps[prev, t] = step
            pos[t] = pos[prev] + bilinear(step, pos[prev])
            if refine:  # the start frame → t directly, from the chained estimate
                direct = grid + self.flow(gray[start], gray[t], init=(pos[t] - grid).reshape(H, W, 2)).reshape(-1, 2)
                # kept per point where it matches the start frame at least as well (ties: the direct one): a
                # long-range flow can also fail (large deformation), and then the chained estimate is the
                # better one. (The choice favours photometric agreement, which the visibility test also checks.)
                err_chained = np.abs(bilinear(smooth[t][..., None], pos[t])[:, 0] - ref)
                err_direct = np.abs(bilinear(smooth[t][..., None], direct)[:, 0] - ref)
                pos[t] = np.where((err_direct <= err_chained)[:, None], direct, pos[t])
            fwd = pos[t] - grid
            # the backward flow t → start begins from the negated forward displacements, moved onto frame t's
            # pixels (where the points now are), as a large displacement is out of reach of an uninitialised
            # coarse-to-fine search
            back = bilinear(self.flow(gray[t], gray[start], init=splat(-fwd, pos[t], H, W)), pos[t])
            err = ((fwd + back) ** 2).sum(1)
            inside = (pos[t, :, 0] >= 0) & (pos[t, :, 0] < W) & (pos[t, :, 1] >= 0) & (pos[t, :, 1] < H)
            consistent = err <= 0.01 * ((fwd ** 2).sum(1) + (back ** 2).sum(1)) + 0.5
            # regularised flows can agree across an occluder (both smooth over it): the point must also still
            # look like itself (blurred intensity within PHOTO_TOLERANCE of the start frame's)
            looks = np.abs(bilinear(smooth[t][..., None], pos[t])[:, 0] - ref) <= PHOTO_TOLERANCE
            vis[t] = inside & consistent & looks
        return pos, vis


def sample_tracks(pos: np.ndarray, vis: np.ndarray, grid_shape: tuple[int, int], start: int, at: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The tracks [T, M, 2] and visibility [T, M] of points ``at`` [M, 2] of frame ``start``, from that frame's
    dense tracks (``FlowTracker.track``: pos [T, H·W, 2], vis [T, H·W]): each point's own position plus the
    displacement interpolated bilinearly from the four nearest pixel tracks (edge-clamped), so exactly the
    point in frame ``start``; visible where the bilinear weights of the visible ones sum above one half."""
    H, W = grid_shape
    at = np.asarray(at, np.float64)
    # displacements in float64: a query at a pixel centre then gets that pixel's track exactly
    uv = np.stack([at + bilinear((p.astype(np.float64) - pos[start]).reshape(H, W, 2), at) for p in pos])
    uv = uv.astype(np.float32)
    seen = np.stack([bilinear(v.reshape(H, W, 1).astype(np.float32), at)[:, 0] > 0.5 for v in vis])
    return uv, seen


def answer_queries(tracker: FlowTracker, gray: np.ndarray, query_sets: list[np.ndarray], refine: bool = True,
                   dense: tuple[np.ndarray, np.ndarray] | None = None, steps: dict | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tracks [T, N, 2] and visibility [T, N] for each set of queries [N, 3] (x, y on the tracking grid, and
    the integer query frame t), by the dense tracking from each distinct query frame (see the module
    docstring). ``dense``: the dense tracks from frame 0, when already made. One dense run at a time is held
    in memory; the frame-to-frame flows (2(T − 1) at most) are shared between the runs through ``steps``
    (made here when None and more than one run is needed)."""
    T, H, W = gray.shape
    out = [(np.zeros((T, len(q), 2), np.float32), np.zeros((T, len(q)), bool)) for q in query_sets]
    starts = sorted({int(t) for q in query_sets for t in q[:, 2]})
    if steps is None and len(starts) > 1:
        steps = {}
    for start in starts:
        pos, vis = dense if (start == 0 and dense is not None) else tracker.track(gray, refine, start, steps)
        for q, (uv, seen) in zip(query_sets, out):
            here = q[:, 2] == start
            if here.any():
                uv[:, here], seen[:, here] = sample_tracks(pos, vis, (H, W), start, q[here, :2])
    return out


def splat(values: np.ndarray, pos: np.ndarray, H: int, W: int) -> np.ndarray:
    """Per-point values [N, 2] as a field [H, W, 2] on the pixels where the points are: the mean of the points
    in each pixel; pixels no point reached (disocclusions) take the mean of the nearest ones found (box sums at
    growing sizes)."""
    cv2 = _cv2()
    x, y = np.floor(pos[:, 0]).astype(int), np.floor(pos[:, 1]).astype(int)
    ok = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    total, count = np.zeros((H, W, 2), np.float32), np.zeros((H, W), np.float32)
    np.add.at(total, (y[ok], x[ok]), values[ok])
    np.add.at(count, (y[ok], x[ok]), 1.0)
    field, filled = np.zeros((H, W, 2), np.float32), count > 0
    field[filled] = total[filled] / count[filled][:, None]
    k = 3
    while not filled.all() and filled.any() and k <= 4 * max(H, W):
        near_total = cv2.boxFilter(total, -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
        near_count = cv2.boxFilter(count, -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
        new = ~filled & (near_count > 0)
        field[new] = near_total[new] / near_count[new][:, None]
        filled |= new
        k = 2 * k + 1
    return field


def lift(uv: np.ndarray, depth: np.ndarray, intrinsics) -> np.ndarray:
    """(u, v) [..., 2] and depth [...] → camera coordinates [..., 3]: z·K⁻¹(u, v, 1)."""
    fx, fy, cx, cy = intrinsics
    return np.stack([(uv[..., 0] - cx) * depth / fx, (uv[..., 1] - cy) * depth / fy, depth], -1)


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> list[float]:
    """A pinhole camera with the given horizontal field of view, square pixels, centred principal point."""
    if not 0 < fov_deg < 180:
        raise BadInput(f"--fov {fov_deg}: must be between 0 and 180 degrees")
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return [f, f, width / 2, height / 2]


# ---------------------------------------------------------------------------
# Depth


def _png_depth(path: Path, spec: str) -> np.ndarray:
    """A 16-bit single-channel PNG in millimetres → metres; 8-bit or colour PNGs are not depth maps."""
    from dtk.video import open_image

    with open_image(path, f"--depth {spec}: {path.name}") as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise BadInput(f"--depth {spec}: {path.name} is a {im.mode} PNG; depth PNGs are 16-bit single-channel "
                           "(millimetres)")
        return np.asarray(im, dtype=np.float32) / 1000.0


def read_depth(spec: str, frames: int, size: tuple[int, int], stride: int = 1, max_frames: int | None = None
               ) -> np.ndarray:
    """Per-frame depth maps [T, H, W] in metres: an npz (key ``depth``, else its only array) or npy file
    [T, H, W], or a folder of per-frame .npy or 16-bit .png (millimetres) files in natural name order. Maps
    for the whole clip are cut by --stride/--max-frames like the frames; maps of another size are resized."""
    from PIL import Image

    from dtk.video import _natural

    path = Path(spec)
    try:
        if path.is_file():
            data = np.load(path, allow_pickle=False)
            if hasattr(data, "files"):
                if "depth" not in data.files and len(data.files) != 1:
                    raise BadInput(f"--depth {spec}: an npz with several arrays needs one named 'depth' "
                                   f"(it has {', '.join(data.files)})")
                data = data["depth" if "depth" in data.files else data.files[0]]
            maps = np.asarray(data, dtype=np.float32)
        elif path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix.lower() in (".npy", ".png")), key=_natural)
            if not files:
                raise BadInput(f"--depth {spec}: no .npy or 16-bit .png depth maps in it")
            loaded = [np.load(p, allow_pickle=False).astype(np.float32) if p.suffix.lower() == ".npy"
                      else _png_depth(p, spec) for p in files]
            if len({m.shape for m in loaded}) != 1:
                raise BadInput(f"--depth {spec}: maps of different sizes ({', '.join(sorted({str(m.shape) for m in loaded}))})")
            maps = np.stack(loaded)
        else:
            raise BadInput(f"--depth {spec}: no such file or directory")
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable file is bad input
        raise BadInput(f"--depth {spec}: not readable depth maps ({type(e).__name__}: {e})") from None
    if maps.ndim == 3 and len(maps) != frames:
        cut = maps[::stride][:max_frames] if max_frames else maps[::stride]
        if len(cut) == frames and (stride > 1 or max_frames):
            maps = cut   # maps of the whole clip
    if maps.ndim != 3 or len(maps) != frames:
        raise BadInput(f"--depth {spec}: {maps.shape[0] if maps.ndim == 3 else maps.shape} depth map(s) of shape "
                       f"{maps.shape[1:] if maps.ndim == 3 else '?'}; the video has {frames} frames")
    # 0 (a 16-bit PNG's "no reading"), negative and NaN depths are missing: NaN, so their points are dropped
    # downstream (render-gs counts them) instead of landing on the camera centre
    maps = np.where(maps > 0, maps, np.nan).astype(np.float32)
    if not np.isfinite(maps).any():
        raise BadInput(f"--depth {spec}: no positive finite depth in it")
    w, h = size
    mh, mw = maps.shape[1:]
    # the same aspect ratio, up to a pixel of rounding at the frames' (possibly --max-side reduced) size
    if abs(mw * h / mh - w) > max(1.0, 0.02 * w):
        raise BadInput(f"--depth {spec}: maps of {mw}x{mh}, the frames are {w}x{h} (after --max-side); another "
                       "resolution is resized, another aspect ratio is refused")
    if maps.shape[1:] != (h, w):
        maps = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.BILINEAR)) for m in maps])
    return maps


METRIC_MODEL_TYPES = ("zoedepth", "depth_pro", "glpn")   # GLPN: sigmoid × max_depth, in metres


def model_depth(model: str, frames: np.ndarray, device: str = "auto", kind: str = "auto"
                ) -> tuple[np.ndarray, float | None]:
    """Depth [T, H, W] from a transformers depth-estimation model (local files or the hub cache only), and
    the focal length in pixels when the model predicts one (Depth Pro), else None.

    ``kind``: "depth" (metric models: used as they are), "disparity" (relative models such as Depth Anything
    V2: inverse depth up to scale — and a shift, which is ignored — turned into 1/(d/median d), a median depth
    of 1 m, a global scale the TAPVid-3D metrics remove by their median alignment), or "auto": metric when the
    model's config says so (depth_estimation_type "metric", ZoeDepth, DepthPro, GLPN), else disparity."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from dtk.device import resolve_device

    try:
        processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
        net = AutoModelForDepthEstimation.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - missing weights offline, a wrong id
        raise BadInput(f"--depth-model {model}: could not load it from local files or the hub cache "
                       f"({type(e).__name__}); download it where there is network, e.g. "
                       f"`hf download {model}`") from None
    dev = resolve_device(device)
    net.to(dev).eval()
    out, focals = [], []
    for frame in frames:
        h, w = frame.shape[:2]
        inputs = processor(images=Image.fromarray(frame), return_tensors="pt").to(dev)
        with torch.no_grad():
            outputs = net(**inputs)
        # the frame size: target size for most models, the source size (padding removed) for ZoeDepth
        post = processor.post_process_depth_estimation(outputs, [(h, w)])[0]
        pred = post["predicted_depth"].squeeze().float().cpu().numpy()
        if pred.shape != (h, w):
            pred = np.asarray(Image.fromarray(pred).resize((w, h), Image.Resampling.BILINEAR))
        out.append(pred)
        if post.get("focal_length") is not None:
            focals.append(float(post["focal_length"]))
    depth = np.stack(out)
    if kind == "auto":
        metric = (getattr(net.config, "depth_estimation_type", None) == "metric"
                  or getattr(net.config, "model_type", "") in METRIC_MODEL_TYPES)
        kind = "depth" if metric else "disparity"
        log.info("track3d: %s predicts %s", model, "metric depth" if metric else "relative inverse depth")
    if not np.isfinite(depth).all() or np.median(depth) <= 0:
        raise RunFailure(f"--depth-model {model}: predicts no usable depth (non-finite values, or a median of "
                         f"{float(np.median(depth)):.3g})")
    if kind == "disparity":
        depth = np.median(depth) / np.maximum(depth, 1e-6)
    return depth.astype(np.float32), (float(np.median(focals)) if focals else None)


# ---------------------------------------------------------------------------
# Metrics (TAPVid-3D)

# The TAPVid-3D key spellings: the official evaluator (tapnet/tapvid3d/evaluation/evaluate_model.py) reads
# ground truth images_jpeg_bytes, queries_xyt, tracks_XYZ, visibility and fx_fy_cx_cy, and predictions
# tracks_XYZ [T, N, 3] and visibility [T, N] (order "t n"); dtk's lower-case spellings are read too
GT_KEYS = {"tracks_xyz": ("tracks_XYZ", "tracks_xyz"), "visibility": ("visibility",),
           "intrinsics": ("fx_fy_cx_cy", "intrinsics")}
METRIC_RESOLUTION = 256   # evaluate_model.py's metric_eval_resolution: the short side thresholds are measured at


@dataclass
class Scores:
    aj3d: float
    apd3d: float
    oa: float
    aj2d: float | None = None
    delta_avg: float | None = None


def evaluate(pred_xyz, pred_vis, gt_xyz, gt_vis, intrinsics, pred_uv=None, gt_uv=None, query_frames=None,
             pixel_scale: float = 1.0) -> Scores:
    """3D-AJ, APD and OA of TAPVid-3D (Koppula et al., NeurIPS 2024), as tapnet's
    ``compute_tapvid3d_metrics`` computes them with "median" scaling: the predictions scaled by
    median‖gt‖ / median‖pred‖ over the points visible in both; a point within thr·z_gt / √(fx·fy) of the
    ground truth for thr = 1, 2, 4, 8, 16 pixels; every frame counts, each query's own frame included (the
    official evaluation weights are all ones; query frames feed only its per-trajectory scalings).
    ``pixel_scale``: evaluation pixels per pixel of the intrinsics' size; ``evaluate_model.py`` rescales fx,
    fy to a 256-pixel short side (its metric_eval_resolution), i.e. ``pixel_scale`` = 256 / short side.

    2D AJ and δ_avg (TAP-Vid, Doersch et al. 2022) when 2D tracks are given, at the same ``pixel_scale``:
    every frame but each query's own (``compute_tapvid_metrics``' "strided" query mode; ``query_frames`` [N],
    default all 0)."""
    pred_xyz, gt_xyz = np.asarray(pred_xyz, np.float64), np.asarray(gt_xyz, np.float64)
    pred_vis, gt_vis = np.asarray(pred_vis, bool), np.asarray(gt_vis, bool)
    focal = math.sqrt(float(intrinsics[0]) * float(intrinsics[1])) * pixel_scale
    both = gt_vis & pred_vis
    if both.any():
        scale = float(np.nanmedian(np.linalg.norm(gt_xyz[both], axis=-1)) /
                      max(np.nanmedian(np.linalg.norm(pred_xyz[both], axis=-1)), 1e-12))
    else:
        scale = 1.0
    dist2 = ((pred_xyz * scale - gt_xyz) ** 2).sum(-1)
    oa = float((pred_vis == gt_vis).mean())
    apd, aj = [], []
    for thr in THRESHOLDS:
        within = dist2 < (thr * gt_xyz[..., 2] / focal) ** 2   # squared, as the official code compares
        apd.append(_frac(within & gt_vis, gt_vis))
        aj.append(_jaccard(within, pred_vis, gt_vis))
    scores = Scores(aj3d=float(np.mean(aj)), apd3d=float(np.mean(apd)), oa=oa)
    if pred_uv is not None and gt_uv is not None:
        T, N = gt_vis.shape
        frames = np.zeros(N, int) if query_frames is None else np.asarray(query_frames, int)
        scored = np.arange(T)[:, None] != frames[None, :]
        d2 = np.linalg.norm(np.asarray(pred_uv) - np.asarray(gt_uv), axis=-1)[scored] * pixel_scale
        pv, gv = pred_vis[scored], gt_vis[scored]
        scores.delta_avg = float(np.mean([_frac((d2 < t) & gv, gv) for t in THRESHOLDS]))
        scores.aj2d = float(np.mean([_jaccard(d2 < t, pv, gv) for t in THRESHOLDS]))
    return scores


def _frac(hits, total) -> float:
    n = total.sum()
    return float(hits.sum() / n) if n else 1.0


def _jaccard(within, pred_vis, gt_vis) -> float:
    tp = (within & pred_vis & gt_vis).sum()
    fp = (pred_vis & ~(gt_vis & within)).sum()
    fn = (gt_vis & ~(pred_vis & within)).sum()
    return float(tp / max(tp + fp + fn, 1))


def _jpeg_size(data, path: str) -> tuple[int, int] | None:
    """(W, H) of the first of a TAPVid-3D file's ``images_jpeg_bytes`` (the size the official evaluator
    scales to 256 from); None when it has none, or only pickled ones."""
    if "images_jpeg_bytes" not in data.files:
        return None
    import io

    from dtk.video import open_image

    try:
        first = _jpegs(data, path)[0]
    except BadInput as e:   # the size only guards against another video: the tracks are still scored
        log.info("track3d: %s", e)
        return None
    with open_image(io.BytesIO(bytes(first)), f"{path}: images_jpeg_bytes[0]", warn=False) as im:
        return im.size


def _jpegs(data, path: str) -> np.ndarray:
    try:
        jpegs = data["images_jpeg_bytes"]
    except ValueError:   # an object array: only readable by unpickling, which can run code
        raise BadInput(f"{path}: its images_jpeg_bytes are pickled objects, which dtk does not load; "
                       "extract the frames to a folder of images") from None
    if len(jpegs) == 0:
        raise BadInput(f"{path}: images_jpeg_bytes is empty")
    return jpegs


@contextlib.contextmanager
def _npz_input(where: str, what: str = "npz"):
    """Reading a user's npz: a missing or corrupt file is bad input naming it (``where``: option and path)."""
    try:
        yield
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput(f"{where}: no such file") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file is bad input
        raise BadInput(f"{where}: not a readable {what} ({type(e).__name__})") from None


def load_ground_truth(path: str) -> dict:
    """Ground truth in the TAPVid-3D layout (``tracks_XYZ``/``tracks_xyz``, ``visibility``,
    ``fx_fy_cx_cy``/``intrinsics``, optional ``queries_xyt``, ``tracks_uv`` and ``images_jpeg_bytes``, whose
    first frame's size is kept as ``image_size``)."""
    with _npz_input(f"--eval {path}"):
        data = np.load(path, allow_pickle=False)
        gt = {}
        for name, spellings in GT_KEYS.items():
            key = next((k for k in spellings if k in data.files), None)
            if key is None:
                raise BadInput(f"--eval {path}: no {' or '.join(spellings)} (ground truth needs 3D tracks, "
                               "visibility and intrinsics)")
            gt[name] = np.asarray(data[key])
        for key in ("queries_xyt", "tracks_uv"):
            if key in data.files:
                gt[key] = np.asarray(data[key])
        size = _jpeg_size(data, f"--eval {path}")
        if size is not None:
            gt["image_size"] = size
    xyz, vis = gt["tracks_xyz"], gt["visibility"]
    if xyz.ndim != 3 or xyz.shape[2] != 3 or vis.shape != xyz.shape[:2]:
        raise BadInput(f"--eval {path}: tracks {xyz.shape} and visibility {vis.shape} (want [T, N, 3] and [T, N])")
    if "tracks_uv" in gt and gt["tracks_uv"].shape != xyz.shape[:2] + (2,):
        raise BadInput(f"--eval {path}: tracks_uv {gt['tracks_uv'].shape}, want {xyz.shape[:2] + (2,)}")
    k = gt["intrinsics"]
    if k.shape != (4,) or not np.issubdtype(k.dtype, np.number) or not np.isfinite(k).all() or min(k[:2]) <= 0:
        raise BadInput(f"--eval {path}: intrinsics {k.tolist() if k.size <= 9 else k.shape}, want [fx, fy, cx, cy] "
                       "with positive focal lengths")
    gt["intrinsics"] = k.astype(np.float64)
    gt["visibility"] = vis.astype(bool)
    return gt


def checked_queries(queries, frames: int, where: str, n: int | None = None) -> np.ndarray:
    """TAPVid-3D ``queries_xyt`` [N, 3] (x, y in pixels, t the query's frame) as float64 with t rounded to
    the nearest frame (the official metrics round it too); refused unless finite and t within the clip."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != 3 or (n is not None and len(q) != n) or len(q) == 0:
        raise BadInput(f"{where}: queries_xyt {q.shape}, want [{n if n is not None else 'N'}, 3] (x, y, t)")
    if not np.issubdtype(q.dtype, np.number) or not np.isfinite(q).all():
        raise BadInput(f"{where}: queries_xyt holds non-numbers or non-finite values")
    q = q.astype(np.float64)
    q[:, 2] = np.round(q[:, 2])
    outside = (q[:, 2] < 0) | (q[:, 2] >= frames)
    if outside.any():
        raise BadInput(f"{where}: {int(outside.sum())} query frame(s) outside 0..{frames - 1} (e.g. "
                       f"t = {q[outside, 2][0]:g}; the clip has {frames} frames after --stride/--max-frames)")
    return q


def gt_queries(gt: dict, video_size: tuple[int, int], frames: int, path: str) -> np.ndarray:
    """The queries [N, 3] the ground truth asks, in its (the video's own) pixels: its ``queries_xyt``, or for
    dense ground truth [T, H·W] of the video's size, every pixel centre of frame 0, row by row."""
    T, N = gt["tracks_xyz"].shape[:2]
    W, H = video_size
    if T != frames:
        raise BadInput(f"--eval {path}: {T} frames of ground truth, the tracks have {frames} "
                       "(the same --stride/--max-frames needed)")
    if "image_size" in gt and tuple(gt["image_size"]) != (W, H):
        raise BadInput(f"--eval {path}: its frames are {gt['image_size'][0]}x{gt['image_size'][1]}, VIDEO's "
                       f"{W}x{H} (before --max-side); the ground truth's pixels must be the video's")
    queries = gt.get("queries_xyt")
    if queries is None:
        if N != H * W:
            raise BadInput(f"--eval {path}: {N} ground-truth tracks for {H}x{W} pixels, and no queries_xyt [N, 3]")
        ys, xs = np.mgrid[0:H, 0:W]
        queries = np.concatenate([np.stack([xs, ys], -1).reshape(-1, 2) + 0.5, np.zeros((N, 1))], 1)
    return checked_queries(queries, frames, f"--eval {path}", N)


def read_queries(path: str, frames: int) -> np.ndarray:
    """``queries_xyt`` [N, 3] of an npz (a TAPVid-3D file, e.g. the ground truth itself)."""
    with _npz_input(f"--queries {path}"):
        data = np.load(path, allow_pickle=False)
        if "queries_xyt" not in data.files:
            raise BadInput(f"--queries {path}: no queries_xyt [N, 3] (x, y, t) in it")
        queries = np.asarray(data["queries_xyt"])
    return checked_queries(queries, frames, f"--queries {path}")


# ---------------------------------------------------------------------------
# Overlay


def overlay(frames: np.ndarray, uv: np.ndarray, visible: np.ndarray, points: int = 400, trail: int = 8
            ) -> list[np.ndarray]:
    """Frames [T, H, W, 3] with about ``points`` tracks drawn (a regular subsample of the first frame's
    pixels, coloured by where they started): a dot where visible, a ring where occluded, and the last
    ``trail`` frames of the path. Small videos are drawn enlarged (at least 256 pixels on the long side)."""
    import colorsys

    from PIL import Image, ImageDraw

    T, H, W = frames.shape[:3]
    step = max(1, round(math.sqrt(H * W / points)))
    ys, xs = np.mgrid[step // 2:H:step, step // 2:W:step]
    idx = (ys * W + xs).ravel()
    colours = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(x / W, 0.9, 1.0 - 0.4 * y / H))
               for x, y in zip(xs.ravel(), ys.ravel())]
    zoom = max(1, math.ceil(256 / max(H, W)))
    path = uv[:, idx] * zoom
    out = []
    for t in range(T):
        image = Image.fromarray(frames[t]).resize((W * zoom, H * zoom), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        for i, colour in enumerate(colours):
            for s in range(max(1, t - trail + 1), t + 1):   # the trail: segments between visible positions
                if visible[s, idx[i]] and visible[s - 1, idx[i]]:
                    draw.line([tuple(path[s - 1, i]), tuple(path[s, i])], fill=colour, width=1)
            x, y = path[t, i]
            r = 1.5 + zoom * 0.5
            if visible[t, idx[i]]:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            else:
                draw.ellipse([x - r, y - r, x + r, y + r], outline=colour)
        out.append(np.asarray(image))
    return out


# ---------------------------------------------------------------------------
# The command


@dataclass
class TrackOptions:
    video: str
    out: str
    depth: str | None = None
    depth_model: str | None = None
    depth_kind: str = "auto"
    intrinsics: list[float] | None = None
    fov: float | None = None
    max_frames: int | None = None
    max_side: int | None = None
    stride: int = 1
    refine: bool = True
    preset: str = "medium"
    queries: str | None = None
    eval: str | None = None
    eval_resolution: int = METRIC_RESOLUTION   # 0: the video's own pixels
    viz: str | None = None
    viz_points: int = 400
    fps: float = 12.0
    device: str = "auto"
    overwrite: bool = False


def tapvid3d_frames(spec: str, stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """The frames [T, H, W, 3] of a TAPVid-3D npz: its ``images_jpeg_bytes``, one JPEG per frame."""
    import io

    from dtk.video import check_decode, open_image

    with _npz_input(f"VIDEO {spec}", "TAPVid-3D npz"):
        data = np.load(spec, allow_pickle=False)
        if "images_jpeg_bytes" not in data.files:
            raise BadInput(f"VIDEO {spec}: an npz without images_jpeg_bytes (a TAPVid-3D file holds the video "
                           "as one JPEG per frame)")
        jpegs = _jpegs(data, f"VIDEO {spec}")[::stride][:max_frames]
        frames = []
        for i, b in enumerate(jpegs):
            with open_image(io.BytesIO(bytes(b)), f"VIDEO {spec}: images_jpeg_bytes[{i * stride}]") as im:
                if i == 0:   # the whole clip's memory, from the first frame's size, before decoding
                    check_decode(f"VIDEO {spec}", len(jpegs), *im.size)
                frames.append(np.asarray(im.convert("RGB")))
    if len({f.shape for f in frames}) != 1:
        raise BadInput(f"VIDEO {spec}: frames of different sizes")
    return np.stack(frames)


def load_clip(opts: TrackOptions) -> tuple[np.ndarray, tuple[float, float]]:
    """uint8 frames [T, H, W, 3] after --stride, --max-frames and --max-side; and the resize factors (x, y)."""
    from PIL import Image

    from dtk.video import read_frames

    if Path(opts.video).suffix.lower() == ".npz" and Path(opts.video).is_file():
        frames = tapvid3d_frames(opts.video, opts.stride, opts.max_frames)
    else:
        frames = read_frames(opts.video, "VIDEO", stride=opts.stride, max_frames=opts.max_frames)
    if len(frames) < 2:
        raise BadInput(f"VIDEO {opts.video}: {len(frames)} frame(s) after --stride/--max-frames; tracking needs 2+")
    h, w = frames.shape[1:3]
    if opts.max_side and max(h, w) > opts.max_side:
        factor = opts.max_side / max(h, w)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.LANCZOS)) for f in frames])
    if max(frames.shape[1:3]) < 12 or min(frames.shape[1:3]) < 8:   # DIS flow's smallest image
        raise BadInput(f"VIDEO {opts.video}: frames of {frames.shape[2]}x{frames.shape[1]} (after --max-side); "
                       "tracking needs at least 12 pixels on the long side and 8 on the short one")
    return frames, (frames.shape[2] / w, frames.shape[1] / h)


def run_track(opts: TrackOptions, on_record=None) -> dict:
    import time

    from dtk.io import atomic_write

    check_number("--fps", opts.fps, above=0)   # click's FloatRange lets NaN through
    if opts.fov is not None and not (math.isfinite(opts.fov) and 0 < opts.fov < 180):
        raise BadInput(f"--fov {opts.fov}: must be between 0 and 180 degrees")
    out = Path(opts.out)
    if out.suffix != ".npz":
        raise BadInput(f"--out {out}: the tracks are written as an .npz file")
    if out.exists() and not opts.overwrite:
        raise BadInput(f"--out {out}: exists; pass --overwrite or choose another file")
    if opts.viz:
        from dtk.video import video_problem

        problem = video_problem(Path(opts.viz).suffix)
        if problem:
            raise BadInput(f"--viz {opts.viz}: {problem}")
    if opts.viz and Path(opts.viz).exists() and not opts.overwrite:
        raise BadInput(f"--viz {opts.viz}: exists; pass --overwrite or choose another file")
    from dtk.io import check_out_apart

    # an --overwrite would replace an input, and a --viz inside the frames folder would become a frame
    inputs = [("VIDEO", opts.video), ("--depth", opts.depth), ("--queries", opts.queries), ("--eval", opts.eval)]
    check_out_apart(out, inputs)
    if opts.viz:
        try:
            check_out_apart(opts.viz, inputs + [("--out", opts.out)])
        except BadInput as e:
            raise BadInput(str(e).replace("--out ", "--viz ", 1)) from None
    if opts.intrinsics and opts.fov is not None:
        raise BadInput("give --intrinsics or --fov, not both (--fov would be ignored)")
    if (opts.depth is None) == (opts.depth_model is None):
        raise BadInput("give --depth FILE|DIR (per-frame depth maps) or --depth-model ID|PATH")
    gt = load_ground_truth(opts.eval) if opts.eval else None
    if opts.intrinsics and not (all(math.isfinite(v) for v in opts.intrinsics) and min(opts.intrinsics[:2]) > 0):
        raise BadInput(f"--intrinsics {opts.intrinsics}: focal lengths must be positive and every value finite")
    frames, (sx, sy) = load_clip(opts)
    T, H, W = frames.shape[:3]
    from dtk.resources import check_fits

    check_fits(f"VIDEO {opts.video}: {T} frames of {W}x{H} to track (fewer with --max-side, --max-frames or "
               "--stride)", TRACK_BYTES * T * H * W)
    own = (round(W / sx), round(H / sy))   # the video's own size (W, H), before --max-side
    to_grid = np.array([sx, sy, 1.0])      # queries (x, y, t) in the video's pixels → on the tracking grid
    # before any work: the queries and the ground truth must fit these frames
    eval_q = gt_queries(gt, own, T, opts.eval) if gt is not None else None
    out_q = read_queries(opts.queries, T) if opts.queries else None
    if opts.fov is not None:
        intrinsics_from_fov(opts.fov, W, H)   # a bad --fov is refused before the depth model runs
    focal = None
    if opts.depth:
        depth = read_depth(opts.depth, T, (W, H), opts.stride, opts.max_frames)
    else:
        depth, focal = model_depth(opts.depth_model, frames, opts.device, opts.depth_kind)
    if opts.intrinsics:
        fx, fy, cx, cy = opts.intrinsics
        intrinsics = [fx * sx, fy * sy, cx * sx, cy * sy]  # given for the video's own size
    elif opts.fov is None and focal is not None:
        intrinsics = [focal, focal, W / 2, H / 2]
        log.info("track3d: focal length %.1f px from %s", focal, opts.depth_model)
    else:
        if opts.fov is None:
            log.warning("track3d: no --intrinsics or --fov; assuming a 60° horizontal field of view")
        intrinsics = intrinsics_from_fov(opts.fov if opts.fov is not None else 60.0, W, H)
    cv2 = _cv2()
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    query_sets = [q * to_grid for q in (eval_q, out_q) if q is not None]
    starts = {int(t) for q in query_sets for t in q[:, 2]}
    dense_needed = out_q is None or bool(opts.viz)
    steps = {} if len(starts | ({0} if dense_needed else set())) > 1 else None
    from dtk import threads

    threads.report()   # the work starts: say how many CPU threads it has
    tracker = FlowTracker(opts.preset)
    t0 = time.perf_counter()
    dense = tracker.track(gray, opts.refine, 0, steps) if dense_needed else None
    answers = answer_queries(tracker, gray, query_sets, opts.refine, dense, steps)
    seconds = time.perf_counter() - t0

    def lifted(uv):
        z = np.stack([bilinear(depth[t][..., None], uv[t])[:, 0] for t in range(T)])
        return lift(uv, z, intrinsics).astype(np.float32)

    if out_q is None:   # dense: every first-frame pixel
        uv, visible = dense
        xyz, k = lifted(uv), np.asarray(intrinsics, np.float32)
        arrays = {"tracks_uv": uv, "queries_xyt": np.concatenate([uv[0], np.zeros((H * W, 1), np.float32)], 1),
                  "grid_shape": np.asarray([H, W]), "image_size": np.asarray([W, H]),
                  "colors": frames[0].reshape(-1, 3)}
    else:               # one track per query, in the query file's (the video's own) pixels
        uv, visible = answers[-1]
        xyz, k = lifted(uv), np.asarray(intrinsics, np.float64) / [sx, sy, sx, sy]
        at = np.floor(uv[out_q[:, 2].astype(int), np.arange(len(out_q))]).astype(int)   # each at its own frame
        arrays = {"tracks_uv": (uv / to_grid[:2]).astype(np.float32), "queries_xyt": out_q,
                  "image_size": np.asarray(own),
                  "colors": frames[out_q[:, 2].astype(int), np.clip(at[:, 1], 0, H - 1), np.clip(at[:, 0], 0, W - 1)]}
    k = np.asarray(k, np.float32)
    # the official spellings (what the TAPVid-3D evaluator reads) and dtk's own (what render-gs reads)
    arrays.update(tracks_XYZ=xyz, tracks_xyz=xyz, visibility=visible, fx_fy_cx_cy=k, intrinsics=k)
    with atomic_write(out, "wb") as f:
        np.savez_compressed(f, **arrays)
    if opts.viz:
        from dtk.video import write_video

        write_video(Path(opts.viz), overlay(frames, dense[0], dense[1], opts.viz_points), opts.fps)
    record = {"out": str(out), "frames": T, "points": xyz.shape[1], "width": W, "height": H,
              "intrinsics": [float(v) for v in k] if out_q is not None else intrinsics,
              "refine": opts.refine, "tracking_seconds": round(seconds, 3),
              "visible_fraction": float(visible.mean())}
    if starts:
        record["query_frames"] = len(starts)   # dense runs made for the queries, one per distinct query frame
    if opts.viz:
        record["viz"] = opts.viz
    if gt is not None:
        q_uv, q_vis = answers[0]
        # thresholds in pixels at --eval-resolution on the short side, as the official evaluator measures them
        pixel_scale = opts.eval_resolution / min(own) if opts.eval_resolution else 1.0
        scores = evaluate(lifted(q_uv), q_vis, gt["tracks_xyz"], gt["visibility"], gt["intrinsics"],
                          q_uv / to_grid[:2], gt.get("tracks_uv"), eval_q[:, 2].astype(int), pixel_scale)
        record["scores"] = {name: v for name, v in scores.__dict__.items() if v is not None}
    if on_record is not None:
        on_record(record)
    return record
