"""``dtk render-gs``: a pseudo-4D Gaussian field built from 3D tracks, rendered under new cameras (GS-DiT).

Writes, flat in OUT: ``camK-NNNNN.png`` per camera K and frame, ``camK.mp4``
(``ffmpeg`` on PATH) or ``camK.webp``/``.gif``, optionally ``camK-depth-NNNNN.png``
(16-bit, millimetres) and ``camK-alpha-NNNNN.png``, ``field-NNNNN.ply`` with
``--export-ply`` (``--ply-format full``: the float32 3DGS layout standard
viewers read, 248 bytes per Gaussian; ``compact``: no normals nor empty SH
bands, 56 bytes per Gaussian of a field from tracks; see ``dtk.gs.field``), and
``dtk.json`` last. One JSON line per camera on stdout. A ``--ply`` scene's
spherical harmonics (f_rest_*) colour it per view, as in 3DGS (``dtk.gs.sh``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dtk.errors import BadInput

log = logging.getLogger("dtk")
# an encoded camera's frames are held about 4 times over: read back from their PNGs, as PIL images or the
# bytes piped to ffmpeg, and the encoder's own (measured: 12 bytes per pixel and frame)
ENCODE_COPIES = 4
NO_INPUT = "no input: give --tracks NPZ (a 4D field from dtk track3d) or --ply FILE (a static 3DGS scene)"

@dataclass
class RenderOptions:
    out: str
    tracks: str | None = None
    ply: str | None = None
    video: str | None = None
    cameras: list[str] = field(default_factory=lambda: ["identity"])
    frames: int | None = None               # a static PLY: how many frames to render
    intrinsics: list[float] | None = None   # a static PLY: fx, fy, cx, cy
    size: tuple[int, int] | None = None     # (W, H)
    scale_px: float = 0.7
    opacity: float = 0.99
    color_source: str = "first"
    occluded: str = "keep"
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    depth: bool = False
    alpha: bool = False
    export_ply: bool = False
    ply_format: str = "full"                # "full" (3DGS layout, degree-3 SH slots) or "compact"
    video_format: str = "auto"
    fps: float = 12.0
    device: str = "auto"
    overwrite: bool = False


def _source(opts: RenderOptions):
    """(frames T, intrinsics, (W, H), median depth, a function t → Gaussians, the number of dropped points)."""
    from dtk.gs.field import colors_from_frames, frame_gaussians, load_tracks, read_ply
    from dtk.video import read_frames

    if opts.tracks is None and opts.ply is None:
        raise BadInput(NO_INPUT)
    if opts.tracks is not None and opts.ply is not None:
        raise BadInput("--tracks and --ply: give one of them, not both")
    if opts.size is not None and min(opts.size) < 1:
        raise BadInput(f"--size {opts.size[0]}x{opts.size[1]}: both sides must be at least 1 pixel")
    if opts.intrinsics is not None and not (all(np.isfinite(opts.intrinsics)) and min(opts.intrinsics[:2]) > 0):
        raise BadInput(f"--intrinsics {opts.intrinsics}: focal lengths must be positive and every value finite")
    if opts.ply:
        if opts.video:
            raise BadInput("--video colours tracks; a --ply scene has its own colours")
        if opts.intrinsics is None or opts.size is None:
            raise BadInput("--ply: also give --intrinsics fx,fy,cx,cy and --size WxH (a PLY has no camera)")
        g = read_ply(opts.ply)
        z = g.means[:, 2][g.means[:, 2] > 0]
        return (opts.frames or 1, opts.intrinsics, opts.size, float(z.median()) if len(z) else 1.0,
                lambda t: g, 0)
    tracks = load_tracks(opts.tracks)
    if opts.video:
        colors = colors_from_frames(tracks, read_frames(opts.video))
    elif tracks.colors is not None:
        colors = tracks.colors
    else:
        raise BadInput(f"--tracks {opts.tracks}: holds no colors; give --video with the clip's frames")
    fx, fy, cx, cy = tracks.intrinsics
    own = tuple(tracks.size) if tracks.size else (round(2 * cx), round(2 * cy))
    size = tuple(opts.size) if opts.size else own
    if size != own:  # another output size: the same view, scaled
        sx, sy = size[0] / own[0], size[1] / own[1]
        tracks.intrinsics = [fx * sx, fy * sy, cx * sx, cy * sy]
    if opts.color_source == "current" and colors.dim() == 2:
        log.warning("render-gs: --color-source current needs per-frame colours (--video); using the tracks' colours")
    if opts.frames is not None and opts.frames != tracks.frames:
        raise BadInput(f"--frames {opts.frames}: the tracks have {tracks.frames} frames")
    return (tracks.frames, list(tracks.intrinsics), tuple(size), tracks.median_depth(),
            lambda t: frame_gaussians(tracks, t, colors, scale_px=opts.scale_px, opacity=opts.opacity,
                                      color_source=opts.color_source, occluded=opts.occluded), tracks.dropped)


def _check_numbers(opts: RenderOptions) -> None:
    """Finite numbers in range (click's FloatRange lets NaN through, which rendered black images)."""
    import math

    from dtk.errors import check_number

    check_number("--scale-px", opts.scale_px, above=0)
    check_number("--opacity", opts.opacity, low=0)
    if opts.opacity > 1:
        raise BadInput(f"--opacity {opts.opacity:g}: must be at most 1")
    check_number("--fps", opts.fps, above=0)
    bg = list(opts.background)
    if len(bg) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1 for v in bg):
        shown = ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in bg)
        raise BadInput(f"--background {shown}: want R,G,B, three numbers in 0..1")


def _check_memory(opts: RenderOptions, gaussians: int, frames: int, width: int, height: int, device,
                  backend: str) -> None:
    """Refuse, before rendering, a run that would not fit in memory (``dtk.resources``): the renderer's peak
    per frame (``render_memory``; on CUDA in GPU memory, with the frames' host copies in RAM) and the encoding
    of a camera's frames into its video (ENCODE_COPIES of them), with the last frame's images still held."""
    from dtk.gs.render import render_memory
    from dtk.resources import check_fits

    cameras, pixels = len(opts.cameras), width * height
    source = f"--size {width}x{height}" if opts.size else f"--tracks {opts.tracks}: image_size {width}x{height}"
    what = f"{source}, {cameras} camera(s), {frames} frame(s)"
    rendering = render_memory(gaussians, cameras, width, height, backend)
    held = 60 * cameras * pixels                       # a frame's images (colour, alpha, depth) while encoding
    encoding = ENCODE_COPIES * 3 * frames * pixels + held
    if backend == "gsplat":
        check_fits(what, rendering, device)
        check_fits(what, encoding, None)
    else:
        check_fits(what, max(rendering, encoding), None)


def run_render(opts: RenderOptions, on_record=None) -> list[dict]:
    from PIL import Image

    from dtk.device import resolve_device
    from dtk.gs.cameras import camera_path
    from dtk.gs.field import write_ply
    from dtk.gs.render import render
    from dtk.io import Replacing, atomic_write, prepare_out_dir, run_record, write_json
    from dtk.video import video_problem

    from dtk.gs.field import PLY_FORMATS

    _check_numbers(opts)
    if opts.ply_format not in PLY_FORMATS:
        raise BadInput(f"--ply-format {opts.ply_format}: choose {', '.join(PLY_FORMATS)}")
    problem = opts.video_format != "auto" and video_problem("." + opts.video_format)
    if problem:   # refused before any rendering
        raise BadInput(f"--video-format {opts.video_format}: {problem}")
    out = prepare_out_dir(opts.out, overwrite=opts.overwrite,
                          inputs=[("--tracks", opts.tracks), ("--video", opts.video), ("--ply", opts.ply)])
    for spec in opts.cameras:  # the grammar first, before any data is read
        if not spec.startswith("json:"):
            camera_path(spec, 2, [1.0, 1.0, 0.0, 0.0], 1.0)
    frames, intrinsics, (width, height), median_depth, gaussians_at, dropped = _source(opts)
    if dropped:
        log.warning("render-gs: %d NaN/inf track points dropped", dropped)
    paths = [camera_path(spec, frames, intrinsics, median_depth) for spec in opts.cameras]
    from dtk.gs.render import _has_gsplat

    device = resolve_device(opts.device)
    if device.type != "cpu" and not (device.type == "cuda" and _has_gsplat()):
        log.warning("render-gs: no gsplat for %s (pip install gsplat); rendering on the CPU", device)
        device = torch.device("cpu")
    backend = "gsplat" if device.type == "cuda" else "torch"
    _check_memory(opts, len(gaussians_at(0).means), frames, width, height, device, backend)
    dtype = torch.float32
    from dtk import threads

    threads.report()   # the work starts: say how many CPU threads it has
    with Replacing(out, overwrite=opts.overwrite):   # everything is accepted: only now is a replaced result set aside
        out.mkdir(parents=True, exist_ok=True)
        background = torch.tensor(opts.background, dtype=dtype, device=device)
        files: list[str] = []
        sh_degree = None
        for t in range(frames):
            g = gaussians_at(t)
            sh_degree = g.sh_degree
            if opts.export_ply:
                write_ply(out / f"field-{t:05d}.ply", g, opts.ply_format)
                files.append(f"field-{t:05d}.ply")
            views = torch.stack([p[0][t] for p in paths]).to(device, dtype)
            Ks = torch.stack([p[1][t] for p in paths]).to(device, dtype)
            # a 3DGS scene's SH coefficients are coloured per camera (on either backend); a field's colours are fixed
            colors = g.colors if g.sh is None else g.sh
            rgb, alpha, depth = render(*(x.to(device, dtype) for x in (g.means, g.quats, g.scales, g.opacities,
                                                                       colors)),
                                       views, Ks, width, height, background=background, backend=backend,
                                       sh_degree=g.sh_degree)
            for k in range(len(paths)):
                name = f"cam{k}-{t:05d}.png"
                image = (rgb[k].clamp(0, 1) * 255).round().byte().cpu().numpy()
                with atomic_write(out / name, "wb") as f:
                    Image.fromarray(image).save(f, format="PNG")
                files.append(name)
                if opts.depth:
                    mm = (depth[k, ..., 0] * 1000).clamp(0, 65535).round().cpu().numpy().astype(np.uint16)
                    files.append(_save_png(out / f"cam{k}-depth-{t:05d}.png", Image.fromarray(mm)))
                if opts.alpha:
                    a8 = (alpha[k, ..., 0].clamp(0, 1) * 255).round().byte().cpu().numpy()
                    files.append(_save_png(out / f"cam{k}-alpha-{t:05d}.png", Image.fromarray(a8)))
        records = []
        for k, spec in enumerate(opts.cameras):
            video = _encode(out, k, frames, opts.fps, opts.video_format)
            files.append(video)
            record = {"camera": spec, "index": k, "video": str(out / video), "frames": frames,
                      "first_frame": str(out / f"cam{k}-00000.png"), "width": width, "height": height}
            records.append(record)
            if on_record is not None:
                on_record(record)
        write_json(out / "dtk.json", run_record("render-gs", asdict(opts), kind="render", files=files,
                                                cameras=records, dropped_points=dropped, backend=backend,
                                                sh_degree=sh_degree))
    return records


def _save_png(path: Path, image) -> str:
    from dtk.io import atomic_write

    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
    return path.name


def _encode(out: Path, k: int, frames: int, fps: float, fmt: str) -> str:
    """camK.mp4 through ffmpeg when it is there (or asked for), else an animated WebP (or GIF)."""
    from PIL import PngImagePlugin

    from dtk.video import write_video

    if fmt == "auto":
        fmt = "mp4" if shutil.which("ffmpeg") else "webp"
    name = f"cam{k}.{fmt}"
    images = []
    for t in range(frames):   # its own PNGs: read without Image.open's decompression-bomb check (not input)
        with PngImagePlugin.PngImageFile(out / f"cam{k}-{t:05d}.png") as im:
            images.append(np.asarray(im.convert("RGB")))
    write_video(out / name, images, fps)
    return name
