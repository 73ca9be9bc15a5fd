"""Reading a video: a folder of frames, an animated GIF/WebP/PNG, or anything ffmpeg decodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from dtk.errors import BadInput

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DECODE_COPIES = 2   # a clip is held twice while it is decoded: the frames one by one, then stacked


def open_image(source, where: str, warn: bool = True):
    """``PIL.Image.open`` (the header only; pixels load on use) with PIL's decompression-bomb limit kept:
    ``Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels unless changed). An image of more than twice that, which
    PIL refuses to open, is refused with ``BadInput`` naming ``where`` (the option and file) instead of PIL's
    DecompressionBombError; one above it, which PIL opens with a DecompressionBombWarning, is opened, the
    warning said as one log line naming ``where`` (none when ``warn`` is false). Other failures (not an
    image, unreadable) are left to the caller, which knows what to call them."""
    import logging
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except Image.DecompressionBombError as e:
            raise BadInput(f"{where}: too large to decode safely: {' '.join(str(e).split()).rstrip('.')}") from None
        except Image.DecompressionBombWarning as e:
            if warn:
                logging.getLogger("dtk").warning("%s: %s; reading it anyway", where,
                                                 " ".join(str(e).split()).rstrip("."))
    if hasattr(source, "seek"):
        source.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def check_decode(where: str, frames: int, width: int, height: int) -> None:
    """Refuse, before decoding, a clip whose uint8 RGB frames would not fit in memory (see ``dtk.resources``)."""
    from dtk.resources import check_fits

    check_fits(f"{where}: {frames} frame(s) of {width}x{height} to decode", DECODE_COPIES * frames * width * height * 3)


def _natural(path: Path):
    """Sort key: 2.png before 10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_frames(spec: str, option: str = "--video", stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """A video as uint8 frames [T, H, W, 3] (every ``stride``-th, at most ``max_frames``): a folder of images
    (in natural order of their names), an animated GIF/WebP/PNG, or any video ffmpeg decodes."""
    from PIL import ImageSequence, UnidentifiedImageError

    def wanted(i: int) -> bool:
        return i % stride == 0 and (max_frames is None or i // stride < max_frames)

    path = Path(spec)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not files:
            raise BadInput(f"{option} {spec}: no image frames in it")
        files = [p for i, p in enumerate(files) if wanted(i)]
        frames = []
        for p in files:
            try:
                with open_image(p, f"{option} {spec}: frame {p.name}") as im:
                    if not frames:   # the first frame's size: the whole clip's memory, checked before decoding
                        check_decode(f"{option} {spec}", len(files), *im.size)
                    frames.append(np.asarray(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as e:
                raise BadInput(f"{option} {spec}: frame {p.name} is not a readable image "
                               f"({' '.join(str(e).split())})") from None
    elif not path.is_file():
        raise BadInput(f"{option} {spec}: no such file or directory")
    else:
        try:
            with open_image(path, f"{option} {spec}") as im:
                n = getattr(im, "n_frames", 1)
                check_decode(f"{option} {spec}", sum(wanted(i) for i in range(n)), *im.size)
                frames = [np.asarray(f.convert("RGB")) for i, f in enumerate(ImageSequence.Iterator(im)) if wanted(i)]
        except (UnidentifiedImageError, OSError):
            frames = [f for i, f in enumerate(_ffmpeg_frames(path, option, wanted)) if wanted(i)]
    if len({f.shape for f in frames}) != 1:
        raise BadInput(f"{option} {spec}: frames of different sizes")
    return np.stack(frames)


def _ffmpeg_frames(path: Path, option: str, wanted=lambda i: True) -> list[np.ndarray]:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise BadInput(f"{option} {path}: not an image sequence PIL reads, and ffmpeg is not installed to decode it "
                       "(give a folder of frames instead)")
    import json

    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height,nb_frames:stream_side_data=rotation", "-of", "json", str(path)],
                           capture_output=True, text=True, errors="replace")
    try:
        stream = json.loads(probe.stdout)["streams"][0]
        w, h = int(stream["width"]), int(stream["height"])
        rotation = next((int(d["rotation"]) for d in stream.get("side_data_list", []) if "rotation" in d), 0)
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadInput(f"{option} {path}: ffprobe finds no video stream") from None
    if rotation % 180:   # ffmpeg turns phone videos upright as it decodes: their frames are h × w
        w, h = h, w
    if str(stream.get("nb_frames", "")).isdigit():   # the container's frame count, where it gives one
        check_decode(f"{option} {path}", sum(wanted(i) for i in range(int(stream["nb_frames"]))), w, h)
    decoded = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True)
    raw = decoded.stdout
    if decoded.returncode != 0:   # a corrupt or cut video: say so rather than track its first part
        raise BadInput(f"{option} {path}: ffmpeg could not decode it "
                       f"({decoded.stderr.decode(errors='replace').strip()[-200:]})")
    n = len(raw) // (w * h * 3)
    if n == 0:
        raise BadInput(f"{option} {path}: ffmpeg decodes no frames")
    return list(np.frombuffer(raw[: n * w * h * 3], dtype=np.uint8).reshape(n, h, w, 3))


VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")


def video_problem(suffix: str) -> str | None:
    """Why a video with this suffix cannot be written here (None: it can): what callers check before any work."""
    if suffix.lower() not in VIDEO_SUFFIXES:
        return "a video is written as .mp4, .webp or .gif"
    if suffix.lower() == ".mp4" and shutil.which("ffmpeg") is None:
        return "writing mp4 needs ffmpeg, and ffmpeg is not installed (use .webp or .gif)"
    return None


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """uint8 frames [H, W, 3] as a video chosen by the suffix: .mp4 (H.264 through ffmpeg), .webp (lossless,
    animated) or .gif; written atomically (a partial file never stands under the final name)."""
    from PIL import Image

    from dtk.errors import RunFailure
    from dtk.io import atomic_write

    if not frames:
        raise BadInput(f"{path}: no frames to write")
    problem = video_problem(path.suffix)
    if problem:
        raise BadInput(f"{path}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        import os
        import tempfile

        h, w = frames[0].shape[:2]
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:   # renamed into place when complete
            partial = Path(tmp) / "video.mp4"
            cmd = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                   "-framerate", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                   "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", str(partial)]
            result = subprocess.run(cmd, input=b"".join(np.ascontiguousarray(fr).tobytes() for fr in frames),
                                    capture_output=True)
            if result.returncode != 0:
                raise RunFailure(f"ffmpeg could not encode {path.name}: "
                                 f"{result.stderr.decode(errors='replace').strip()[-300:]}")
            os.replace(partial, path)
        return
    images = [Image.fromarray(fr) for fr in frames]
    with atomic_write(path, "wb") as f:
        images[0].save(f, format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0, **({"lossless": True} if suffix == ".webp" else {}))
