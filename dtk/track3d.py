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

3D: each frame's depth (given maps, or a transformers depth model) is sampled
at the track's position and the point lifted: (x, y, z) = z·K⁻¹(u, v, 1) in
that frame's camera coordinates. Positions are continuous pixel coordinates:
pixel (i, j) covers [j, j + 1) × [i, i + 1), its centre is (j + 0.5, i + 0.5).

Output: TAPVid-3D-layout npz (``tracks_xyz``, ``visibility``, ``queries_xyt``,
``intrinsics``) plus ``tracks_uv``, ``grid_shape``, ``image_size`` and per-point
``colors`` — what ``dtk render-gs`` reads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtk.errors import BadInput, RunFailure

log = logging.getLogger("dtk")

THRESHOLDS = (1, 2, 4, 8, 16)
PHOTO_TOLERANCE = 24.0   # grey levels (of 255) a visible point's blurred intensity may change by


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

    def track(self, gray: np.ndarray, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Positions [T, H·W, 2] and visibility [T, H·W] of every pixel of frame 0, for gray frames [T, H, W]."""
        T, H, W = gray.shape
        ys, xs = np.mgrid[0:H, 0:W]
        grid = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) + 0.5
        pos = np.empty((T, H * W, 2), np.float32)
        vis = np.ones((T, H * W), bool)
        pos[0] = grid
        cv2 = _cv2()
        smooth = np.stack([cv2.blur(g, (3, 3)).astype(np.float32) for g in gray])
        for t in range(1, T):
            step = self.flow(gray[t - 1], gray[t])
            pos[t] = pos[t - 1] + bilinear(step, pos[t - 1])
            if refine:  # frame 0 → t directly, from the chained estimate
                direct = grid + self.flow(gray[0], gray[t], init=(pos[t] - grid).reshape(H, W, 2)).reshape(-1, 2)
                # kept per point where it matches frame 0 at least as well (ties: the direct one): a long-range
                # flow can also fail (large deformation), and then the chained estimate is the better one. (The
                # choice favours photometric agreement, which the visibility test below also checks.)
                err_chained = np.abs(bilinear(smooth[t][..., None], pos[t])[:, 0] - smooth[0].reshape(-1))
                err_direct = np.abs(bilinear(smooth[t][..., None], direct)[:, 0] - smooth[0].reshape(-1))
                pos[t] = np.where((err_direct <= err_chained)[:, None], direct, pos[t])
            fwd = pos[t] - grid
            # the backward flow t → 0 starts from the negated forward displacements, moved onto frame t's pixels
            # (where the points now are), as a large displacement is out of reach of an uninitialised
            # coarse-to-fine search
            back = bilinear(self.flow(gray[t], gray[0], init=splat(-fwd, pos[t], H, W)), pos[t])
            err = ((fwd + back) ** 2).sum(1)
            inside = (pos[t, :, 0] >= 0) & (pos[t, :, 0] < W) & (pos[t, :, 1] >= 0) & (pos[t, :, 1] < H)
            consistent = err <= 0.01 * ((fwd ** 2).sum(1) + (back ** 2).sum(1)) + 0.5
            # regularised flows can agree across an occluder (both smooth over it): the point must also still
            # look like itself (blurred intensity within PHOTO_TOLERANCE of frame 0's)
            looks = np.abs(bilinear(smooth[t][..., None], pos[t])[:, 0] - smooth[0].reshape(-1)) <= PHOTO_TOLERANCE
            vis[t] = inside & consistent & looks
        return pos, vis


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
    from PIL import Image

    with Image.open(path) as im:
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
                       f"`huggingface-cli download {model}`") from None
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


@dataclass
class Scores:
    aj3d: float
    apd3d: float
    oa: float
    aj2d: float | None = None
    delta_avg: float | None = None


def evaluate(pred_xyz, pred_vis, gt_xyz, gt_vis, intrinsics, pred_uv=None, gt_uv=None) -> Scores:
    """3D-AJ, APD and OA as TAPVid-3D defines them (the predictions scaled by median‖gt‖/median‖pred‖ over
    points visible in both, its "median" alignment), and 2D AJ / δ_avg when 2D tracks are given (thresholds
    in pixels; the query frame 0 left out, as TAP-Vid does)."""
    fx, fy = intrinsics[:2]
    both = gt_vis & pred_vis
    if both.any():
        scale = float(np.nanmedian(np.linalg.norm(gt_xyz[both], axis=-1)) /
                      max(np.nanmedian(np.linalg.norm(pred_xyz[both], axis=-1)), 1e-12))
    else:
        scale = 1.0
    pred = pred_xyz * scale
    dist = np.linalg.norm(pred - gt_xyz, axis=-1)
    oa = float((pred_vis == gt_vis).mean())
    apd, aj = [], []
    for thr in THRESHOLDS:
        within = dist < thr * gt_xyz[..., 2] / math.sqrt(fx * fy)
        apd.append(_frac(within & gt_vis, gt_vis))
        aj.append(_jaccard(within, pred_vis, gt_vis))
    scores = Scores(aj3d=float(np.mean(aj)), apd3d=float(np.mean(apd)), oa=oa)
    if pred_uv is not None and gt_uv is not None:
        d2 = np.linalg.norm(pred_uv[1:] - gt_uv[1:], axis=-1)
        pv, gv = pred_vis[1:], gt_vis[1:]
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


GT_KEYS = {"tracks_xyz": ("tracks_xyz", "tracks_XYZ"), "visibility": ("visibility",),
           "intrinsics": ("intrinsics", "fx_fy_cx_cy")}


def load_ground_truth(path: str) -> dict:
    """Ground truth in the TAPVid-3D layout (``tracks_XYZ``/``tracks_xyz``, ``visibility``,
    ``fx_fy_cx_cy``/``intrinsics``, optional ``queries_xyt`` and ``tracks_uv``)."""
    try:
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
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput(f"--eval {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file is bad input
        raise BadInput(f"--eval {path}: not a readable npz ({type(e).__name__})") from None
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


def at_queries(gt: dict, grid_shape: tuple[int, int], frames: int, path: str, uv=None, xyz=None, vis=None,
               scale: tuple[float, float] = (1.0, 1.0)):
    """The dense prediction where the ground truth asks, in the ground truth's (the video's own) pixel units:
    all of it for dense ground truth [T, H·W] of the video's size, else each query (x, y, t = 0) sampled
    bilinearly from the dense fields. The fields live on the tracking grid ``grid_shape``; ``scale`` (x, y) is
    its size over the video's (--max-side), so queries are scaled onto it and the 2D positions back."""
    T, N = gt["tracks_xyz"].shape[:2]
    grid_h, grid_w = grid_shape
    H, W = round(grid_h / scale[1]), round(grid_w / scale[0])   # the video's own size
    if T != frames:
        raise BadInput(f"--eval {path}: {T} frames of ground truth, the tracks have {frames} "
                       "(the same --stride/--max-frames needed)")
    queries = gt.get("queries_xyt")
    if queries is None:
        if N != H * W:
            raise BadInput(f"--eval {path}: {N} ground-truth tracks for {H}x{W} pixels, and no queries_xyt [N, 3]")
        if uv is not None and scale == (1.0, 1.0):
            return uv, xyz, vis
        ys, xs = np.mgrid[0:H, 0:W]   # dense ground truth: every pixel centre of the video, row by row
        queries = np.concatenate([np.stack([xs, ys], -1).reshape(-1, 2) + 0.5, np.zeros((N, 1))], 1)
    if queries.shape != (N, 3):
        raise BadInput(f"--eval {path}: queries_xyt {queries.shape}, want [{N}, 3]")
    if np.any(queries[:, 2] != 0):
        raise BadInput(f"--eval {path}: queries after frame 0; dense tracks answer queries at frame 0 only")
    if uv is None:  # checked only
        return None
    to_grid = np.asarray(scale, np.float64)
    at = queries[:, :2] * to_grid
    pick = lambda field: np.stack([bilinear(f.reshape(grid_h, grid_w, -1), at) for f in field])  # noqa: E731
    return (pick(uv) / to_grid, pick(xyz), pick(vis[..., None].astype(np.float32))[..., 0] > 0.5)


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
    eval: str | None = None
    viz: str | None = None
    viz_points: int = 400
    fps: float = 12.0
    device: str = "auto"
    overwrite: bool = False


def load_clip(opts: TrackOptions) -> tuple[np.ndarray, tuple[float, float]]:
    """uint8 frames [T, H, W, 3] after --stride, --max-frames and --max-side; and the resize factors (x, y)."""
    from PIL import Image

    from dtk.video import read_frames

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


def run_track(opts: TrackOptions) -> dict:
    import time

    from dtk.io import atomic_write, emit

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
    if opts.intrinsics and opts.fov is not None:
        raise BadInput("give --intrinsics or --fov, not both (--fov would be ignored)")
    if (opts.depth is None) == (opts.depth_model is None):
        raise BadInput("give --depth FILE|DIR (per-frame depth maps) or --depth-model ID|PATH")
    gt = load_ground_truth(opts.eval) if opts.eval else None
    if opts.intrinsics and not (all(math.isfinite(v) for v in opts.intrinsics) and min(opts.intrinsics[:2]) > 0):
        raise BadInput(f"--intrinsics {opts.intrinsics}: focal lengths must be positive and every value finite")
    frames, (sx, sy) = load_clip(opts)
    T, H, W = frames.shape[:3]
    if gt is not None:
        at_queries(gt, (H, W), T, opts.eval, scale=(sx, sy))   # before any work: the ground truth must fit these tracks
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
    t0 = time.perf_counter()
    uv, visible = FlowTracker(opts.preset).track(gray, refine=opts.refine)
    seconds = time.perf_counter() - t0
    z = np.stack([bilinear(depth[t][..., None], uv[t])[:, 0] for t in range(T)])
    xyz = lift(uv, z, intrinsics).astype(np.float32)
    n = H * W
    arrays = {"tracks_xyz": xyz, "visibility": visible, "tracks_uv": uv,
              "queries_xyt": np.concatenate([uv[0], np.zeros((n, 1), np.float32)], 1),
              "intrinsics": np.asarray(intrinsics, np.float32), "grid_shape": np.asarray([H, W]),
              "image_size": np.asarray([W, H]), "colors": frames[0].reshape(-1, 3)}
    with atomic_write(out, "wb") as f:
        np.savez_compressed(f, **arrays)
    if opts.viz:
        from dtk.video import write_video

        write_video(Path(opts.viz), overlay(frames, uv, visible, opts.viz_points), opts.fps)
    record = {"out": str(out), "frames": T, "points": n, "width": W, "height": H, "intrinsics": intrinsics,
              "refine": opts.refine, "tracking_seconds": round(seconds, 3),
              "visible_fraction": float(visible.mean())}
    if opts.viz:
        record["viz"] = opts.viz
    if gt is not None:
        q_uv, q_xyz, q_vis = at_queries(gt, (H, W), T, opts.eval, uv, xyz, visible, (sx, sy))
        scores = evaluate(q_xyz, q_vis, gt["tracks_xyz"], gt["visibility"], gt["intrinsics"], q_uv,
                          gt.get("tracks_uv"))
        record["scores"] = {k: v for k, v in scores.__dict__.items() if v is not None}
    emit(record)
    return record
