"""dtk render-gs — a pseudo-4D Gaussian field from 3D tracks, rendered under new cameras."""

from __future__ import annotations

import re

import click

from dtk.cli.common import comma_option, emit, config_option, device_option

CAMERA_HELP = ("Camera path, repeatable (one output per camera): identity | translate:X,Y,Z | "
               "rotate:YAW,PITCH,ROLL | orbit:DEG[,DEPTH] | dolly:DELTA[,DEPTH] | focal:FACTOR | json:FILE; "
               "amounts are reached at the last frame.")


def _floats(n: int):
    return comma_option(float, count=n, expect=f"{n} comma-separated numbers")


def _size(ctx, param, value):
    """WxH only: "10,20" is refused (it reads as W,H to some and H,W to others)."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
    if not match:
        raise click.BadParameter(f"{value!r}: the format is WxH in whole pixels, e.g. 640x480")
    return int(match[1]), int(match[2])


@click.command("render-gs", short_help="Render a pseudo-4D Gaussian field from 3D tracks under new cameras.")
@click.option("--tracks", metavar="NPZ", help="TAPVid-3D-style tracks (dtk track3d's output): tracks_xyz, "
              "visibility, intrinsics, optional colors.")
@click.option("--video", metavar="FRAMES", help="The clip the tracks were made on (folder of frames, animated "
              "GIF/WebP, or a video ffmpeg reads): colours of the points.")
@click.option("--ply", metavar="FILE", help="Instead of --tracks: a static 3DGS PLY scene (with --intrinsics, --size).")
@click.option("--camera", "cameras", multiple=True, default=["identity"], show_default=True, help=CAMERA_HELP)
@click.option("--frames", type=click.IntRange(min=1), default=None, help="Frames to render of a static --ply [1].")
@click.option("--intrinsics", callback=_floats(4), metavar="FX,FY,CX,CY", help="Camera of a --ply scene.")
@click.option("--size", callback=_size, metavar="WxH", help="Output size, e.g. 640x480 [the tracks' image size].")
@click.option("--scale-px", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True,
              help="Gaussian scale in pixels at its depth (s = scale·z/f).")
@click.option("--opacity", type=click.FloatRange(0, 1), default=0.99, show_default=True)
@click.option("--color-source", type=click.Choice(["first", "current"]), default="first", show_default=True,
              help="Colour per point: the first frame's, or the current frame's where visible (last seen otherwise).")
@click.option("--occluded", type=click.Choice(["keep", "hide", "seen"]), default="keep", show_default=True,
              help="Occluded points: kept, hidden, or kept once they have been visible.")
@click.option("--background", callback=_floats(3), default="0,0,0", show_default=True, metavar="R,G,B",
              help="Background colour in 0..1 (holes where content appears after frame 0 show it).")
@click.option("--depth", is_flag=True, help="Also write camK-depth-NNNNN.png (16-bit millimetres).")
@click.option("--alpha", is_flag=True, help="Also write camK-alpha-NNNNN.png.")
@click.option("--export-ply", is_flag=True, help="Also write field-NNNNN.ply per frame (the 3DGS layout; a --ply "
              "scene's SH colours kept).")
@click.option("--ply-format", type=click.Choice(["full", "compact"]), default="full", show_default=True,
              help="--export-ply layout. full: float32 with normals and 45 f_rest_* (degree-3 SH, unused bands 0), "
              "what the original 3DGS code and standard viewers read; 248 bytes per Gaussian (16.3 MB per frame of "
              "256x256 tracks). compact: float32 without normals or unused SH bands; 56 bytes per Gaussian of a "
              "field from tracks (3.7 MB), read by dtk and by loaders that accept degree-0 scenes.")
@click.option("--video-format", type=click.Choice(["auto", "mp4", "webp", "gif"]), default="auto", show_default=True,
              help="auto: mp4 when ffmpeg is installed, else webp.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True)
@device_option
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (required).")
@click.option("--overwrite", is_flag=True, help="Replace a finished result in --out.")
@config_option
def command(tracks, video, ply, cameras, frames, intrinsics, size, scale_px, opacity, color_source, occluded,
            background, depth, alpha, export_ply, ply_format, video_format, fps, device, out, overwrite):
    """Build one Gaussian per track (GS-DiT's pseudo-4D field) and render every frame under each --camera.

    A Gaussian's mean at frame t is its track point (the input camera's
    coordinates of frame t), isotropic with scale --scale-px pixels at its
    depth, colour from the tracks or --video. The identity camera reproduces
    the clip; moved cameras show the field from elsewhere, with holes where
    content appears only later (a video model fills those). Rendering is EWA
    splatting: a vectorised pure-torch rasteriser on the CPU, gsplat's on CUDA.
    A --ply scene's spherical harmonics (f_rest_*, degree ≤ 3) give each
    camera its view-dependent colour, as in 3DGS.

    \b
    Examples:
      dtk render-gs --tracks tracks.npz --video clip/ --camera identity --camera orbit:20 --out render/
      dtk render-gs --tracks tracks.npz --video clip.mp4 --camera dolly:0.5 --depth --export-ply --out dolly/
      dtk render-gs --ply scene.ply --intrinsics 500,500,320,240 --size 640x480 --frames 24 \\
          --camera orbit:30 --out orbit/
    """
    from dtk.errors import BadInput
    from dtk.render_gs import NO_INPUT, RenderOptions, run_render

    if not tracks and not ply:   # checked before --out: the missing input is what to say first
        raise BadInput(NO_INPUT)
    if out is None:
        raise click.UsageError("Missing option '--out'.", ctx=click.get_current_context())
    run_render(on_record=emit, opts=RenderOptions(
        out=out, tracks=tracks, ply=ply, video=video, cameras=list(cameras), frames=frames, intrinsics=intrinsics,
        size=size, scale_px=scale_px, opacity=opacity, color_source=color_source, occluded=occluded,
        background=tuple(background), depth=depth, alpha=alpha, export_ply=export_ply, ply_format=ply_format,
        video_format=video_format, fps=fps, device=device, overwrite=overwrite))
