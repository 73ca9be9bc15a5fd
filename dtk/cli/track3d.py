"""dtk track3d — dense 3D point tracking of a video."""

from __future__ import annotations

import click

from dtk.cli.common import emit, config_option, device_option
from dtk.cli.render_gs import _floats


@click.command("track3d", short_help="Dense 3D tracks of every first-frame pixel of a video, or of queries.")
@click.argument("video", metavar="VIDEO")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="TRACKS.npz",
              help="The tracks, TAPVid-3D layout (what the official evaluator and dtk render-gs read).")
@click.option("--depth", metavar="FILE|DIR", help="Per-frame depth maps in metres: npz/npy [T,H,W], or a folder of "
              ".npy or 16-bit .png (mm) files.")
@click.option("--depth-model", metavar="ID|PATH", help="A transformers depth-estimation model from local files or "
              "the hub cache (e.g. depth-anything/Depth-Anything-V2-Small-hf); relative depth is scaled to a "
              "median of 1 m.")
@click.option("--depth-kind", type=click.Choice(["auto", "depth", "disparity"]), default="auto", show_default=True,
              help="What --depth-model predicts: metric depth, or relative inverse depth; auto reads its config.")
@click.option("--intrinsics", callback=_floats(4), metavar="FX,FY,CX,CY", help="Of the video at its own size.")
@click.option("--fov", type=float, default=None, help="Horizontal field of view in degrees [without --intrinsics: "
              "the depth model's focal length when it predicts one (Depth Pro), else 60].")
@click.option("--max-frames", type=click.IntRange(min=2), default=None)
@click.option("--max-side", type=click.IntRange(min=12), default=None, help="Downscale so the longer side is at most this.")
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True, help="Use every N-th frame.")
@click.option("--refine/--no-refine", default=True, show_default=True,
              help="After chaining, refine with the flow from frame 0 straight to frame t.")
@click.option("--preset", type=click.Choice(["ultrafast", "fast", "medium"]), default="medium", show_default=True,
              help="OpenCV DIS flow preset.")
@click.option("--queries", metavar="Q.npz", help="Answer the queries_xyt (x, y, t: any frame) of a TAPVid-3D file "
              "(e.g. the ground truth): --out then holds one track per query, what the official evaluator scores.")
@click.option("--eval", "eval_gt", metavar="GT.npz", help="Score against TAPVid-3D ground truth (queries at any frame, "
              "or dense): 3D-AJ, APD, OA as the official evaluator computes them (and 2D AJ, δ_avg when it has "
              "tracks_uv).")
@click.option("--eval-resolution", type=click.IntRange(min=0), default=256, show_default=True, metavar="PIXELS",
              help="--eval's pixel thresholds are pixels of the video scaled to this short side, as the official "
                   "evaluator's (0: the video's own pixels).")
@click.option("--viz", type=click.Path(dir_okay=False), metavar="FILE.mp4|.webp|.gif",
              help="Also write an overlay video of a subsample of the tracks (dot: visible, ring: occluded).")
@click.option("--viz-points", type=click.IntRange(min=1), default=400, show_default=True,
              help="About how many tracks the overlay draws.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True,
              help="Frame rate of the overlay video.")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (and --viz) file.")
@config_option
def command(video, out, depth, depth_model, depth_kind, intrinsics, fov, max_frames, max_side, stride, refine, preset,
            queries, eval_gt, eval_resolution, viz, viz_points, fps, device, overwrite):
    """Track every pixel of the first frame of VIDEO through the clip and lift the tracks to 3D.

    VIDEO is a folder of frames, an animated GIF/WebP, a video ffmpeg
    decodes, or a TAPVid-3D .npz (its images_jpeg_bytes). Optical flow
    (OpenCV DIS) chained frame to frame, then refined from frame 0 straight to
    each frame; visibility by forward–backward consistency; depth from --depth
    maps or a --depth-model lifts (u, v) to the camera coordinates of each
    frame. Prints one JSON line (with scores when --eval is given).

    Queries at a later frame t (--queries, --eval): the same dense tracking
    runs from every pixel of frame t, forwards to the end and backwards to
    frame 0, once per distinct query frame; a query takes the track of its own
    point, interpolated bilinearly from the four nearest pixel tracks. The
    output keeps both key spellings: tracks_XYZ, fx_fy_cx_cy (official) and
    tracks_xyz, intrinsics.

    \b
    Examples:
      dtk track3d clip/ --depth depth.npz --intrinsics 500,500,320,240 --out tracks.npz
      dtk track3d clip.mp4 --depth-model depth-anything/Depth-Anything-V2-Small-hf --max-side 256 --out t.npz
      dtk track3d clip/ --depth depth.npz --fov 60 --out t.npz --viz tracks.webp
      dtk track3d adt/x.npz --depth-model ID --queries adt/x.npz --eval adt/x.npz --out pred/adt/x.npz
      dtk render-gs --tracks tracks.npz --video clip/ --camera orbit:15 --out render/
    """
    from dtk.track3d import TrackOptions, run_track

    run_track(on_record=emit, opts=TrackOptions(video=video, out=out, depth=depth, depth_model=depth_model, depth_kind=depth_kind,
                           intrinsics=intrinsics,
                           fov=fov, max_frames=max_frames, max_side=max_side, stride=stride, refine=refine,
                           preset=preset, queries=queries, eval=eval_gt,
                           eval_resolution=eval_resolution, viz=viz, viz_points=viz_points, fps=fps,
                           device=device, overwrite=overwrite))
