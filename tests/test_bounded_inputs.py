"""Issue #23 "Nothing lost" (render-gs, track3d, score): non-finite numbers, decompression bombs, broken text and
PLY headers, and runs too large for the machine are refused as bad input (exit 2, one line naming the option or
file) before any work or output."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import dtk.resources as resources
from helpers import refused
from test_gs_field import synthetic_clip
from test_render_gs import write_frames
from test_track3d import texture, write_clip

RED = "a large red circle on a white background"


def errors(r):
    return [line for line in r.stderr.splitlines() if "error" in line]


def png_header(path, w, h):
    """A PNG that claims w×h pixels (no pixel data): PIL reads the size from its header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def clip(tmp_path):
    tracks, video, _ = synthetic_clip(tmp_path, frames=2)
    return tracks, write_frames(video, tmp_path / "frames")


# ---------------------------------------------------------------------------
# item 10: NaN and other non-finite numbers


@pytest.mark.parametrize("option,value,says", [
    ("--scale-px", "nan", "--scale-px nan: must be a finite number"),
    ("--scale-px", "inf", "--scale-px inf: must be a finite number"),
    ("--opacity", "nan", "--opacity nan: must be a finite number"),
    ("--background", "nan,0,0", "--background nan,0,0: want R,G,B"),
    ("--background", "0,inf,0", "--background 0,inf,0: want R,G,B"),
    ("--background", "255,255,255", "three numbers in 0..1"),
    ("--fps", "nan", "--fps nan: must be a finite number"),
    ("--fps", "inf", "--fps inf: must be a finite number"),
])
def test_render_gs_refuses_non_finite_numbers(run_dtk, tmp_path, clip, option, value, says):
    tracks, frames = clip
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, option, value, "--video-format", "gif",
                "--device", "cpu", "--out", tmp_path / "o")
    refused(r, says, out=tmp_path / "o")
    assert "CPU thread" not in r.stderr   # refused before the work starts


@pytest.mark.parametrize("size", ["infxinf", "nanxnan", "1e9x1e9", "-5x5"])
def test_render_gs_size_is_whole_pixels(run_dtk, tmp_path, clip, size):
    tracks, frames = clip
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--size", size, "--device", "cpu",
                "--out", tmp_path / "o")
    refused(r, "--size", "WxH", out=tmp_path / "o")


def test_render_gs_nan_intrinsics(run_dtk, tmp_path):
    (tmp_path / "s.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nend_header\n")
    r = run_dtk("render-gs", "--ply", tmp_path / "s.ply", "--intrinsics", "nan,1,1,1", "--size", "4x4",
                "--out", tmp_path / "o")
    refused(r, "--intrinsics", "finite")


@pytest.mark.parametrize("option,value,says", [
    ("--fps", "nan", "--fps nan: must be a finite number"),
    ("--fov", "nan", "--fov nan: must be between 0 and 180"),
    ("--fov", "inf", "--fov inf: must be between 0 and 180"),
])
def test_track3d_refuses_non_finite_numbers_before_reading_the_video(run_dtk, tmp_path, option, value, says):
    # the video does not exist: the number is what is said, before anything is read
    r = run_dtk("track3d", tmp_path / "missing", "--depth", tmp_path / "d.npz", option, value,
                "--out", tmp_path / "t.npz")
    refused(r, says)


# ---------------------------------------------------------------------------
# item 11: decompression bombs, non-UTF-8 text, broken PLY headers


def test_pil_limit_is_kept():
    import dtk.score  # noqa: F401
    import dtk.track3d  # noqa: F401
    import dtk.video  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == 89478485   # PIL's own default: dtk neither lifts nor lowers it


def _red_manifest(tmp_path, images):
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"path": str(p), "prompt": RED}) + "\n" for p in images))
    return f


def test_score_refuses_a_decompression_bomb_naming_it(run_dtk, tmp_path):
    from dtk.demo import shapes

    good = tmp_path / "good.png"
    shapes.render(shapes.parse_caption(RED), rng=np.random.default_rng(0)).save(good)
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)   # 400 Mpixels: more than PIL opens
    r = run_dtk("score", "--data", _red_manifest(tmp_path, [good, bomb]), "--out", tmp_path / "s.jsonl")
    line = refused(r, "m.jsonl:2: image", "bomb.png", "too large to decode safely", "178956970 pixels")
    assert r.stderr.strip() == line        # the header check runs before any reward (and its thread line)
    assert not (tmp_path / "s.jsonl").exists()


def test_score_warns_in_one_line_between_the_limit_and_twice_it(run_dtk, tmp_path, monkeypatch):
    from dtk.demo import shapes

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    path = tmp_path / "x.png"
    image = shapes.render(shapes.parse_caption(RED), rng=np.random.default_rng(0))
    image.save(path)
    assert 3000 < image.size[0] * image.size[1] <= 6000   # PIL warns (above the limit), and opens it (not above twice)
    r = run_dtk("score", "--data", _red_manifest(tmp_path, [path]))
    assert r.exit_code == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "decompression bomb" in line]
    assert len(warned) == 1 and "x.png" in warned[0] and "reading it anyway" in warned[0], r.stderr
    assert "DecompressionBombWarning" not in r.stderr
    assert json.loads(r.stdout)["scores"]["shapes"] == 1.0


def test_video_frames_bombs_are_bad_input_naming_the_frame(run_dtk, tmp_path, clip):
    tracks, frames = clip
    png_header(frames / "0001.png", 20000, 20000)
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--device", "cpu", "--out", tmp_path / "o")
    refused(r, "--video", "frame 0001.png", "too large to decode safely", out=tmp_path / "o")
    np.savez(tmp_path / "d.npz", depth=np.ones((2, 40, 48), np.float32))
    r = run_dtk("track3d", frames, "--depth", tmp_path / "d.npz", "--out", tmp_path / "t.npz")
    refused(r, "VIDEO", "frame 0001.png", "too large to decode safely")
    assert not (tmp_path / "t.npz").exists()


def test_track3d_depth_png_and_tapvid3d_jpeg_bombs(run_dtk, tmp_path):
    frames = [np.ascontiguousarray(texture(32, 44, seed=1)[:, t:t + 40]) for t in range(2)]
    video = write_clip(tmp_path / "v", frames)
    depth = tmp_path / "depth"
    depth.mkdir()
    Image.fromarray(np.full((32, 40), 2000, np.uint16)).save(depth / "0.png")
    png_header(depth / "1.png", 20000, 20000)
    r = run_dtk("track3d", video, "--depth", depth, "--fov", 60, "--out", tmp_path / "t.npz")
    refused(r, "--depth", "1.png", "too large to decode safely")
    # a TAPVid-3D npz whose second JPEG claims 20000x20000 (the size fields of its SOF0 header rewritten)
    jpegs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG")
        jpegs.append(bytearray(buf.getvalue()))
    sof = jpegs[1].index(b"\xff\xc0")
    jpegs[1][sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    width = max(len(j) for j in jpegs)
    np.savez(tmp_path / "clip.npz", images_jpeg_bytes=np.array([bytes(j) for j in jpegs], dtype=f"S{width}"))
    np.savez(tmp_path / "d.npz", depth=np.ones((2, 32, 40), np.float32))
    r = run_dtk("track3d", tmp_path / "clip.npz", "--depth", tmp_path / "d.npz", "--fov", 60,
                "--out", tmp_path / "t.npz")
    refused(r, "VIDEO", "images_jpeg_bytes[1]", "too large to decode safely")


def test_render_gs_reads_its_own_frames_back_whatever_pils_limit(run_dtk, tmp_path, monkeypatch):
    """Frames it rendered itself are not input: encoding them is not stopped by the bomb check (it was, for
    frames above 179 Mpixels, after the whole render)."""
    from test_render_gs import sh_ply

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 32x32 = 1024 pixels: more than twice the limit
    r = run_dtk("render-gs", "--ply", sh_ply(tmp_path / "s.ply", 0), "--intrinsics", "40,40,16,16", "--size", "32x32",
                "--video-format", "webp", "--device", "cpu", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "o" / "cam0.webp").is_file()


def test_json_camera_that_is_not_utf8(run_dtk, tmp_path, clip):
    tracks, frames = clip
    (tmp_path / "cam.json").write_bytes(b'{"viewmats": "\xff"}')
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--camera", f"json:{tmp_path / 'cam.json'}",
                "--device", "cpu", "--out", tmp_path / "o")
    refused(r, "--camera json:", "cam.json", "not UTF-8 text (byte 0xff at offset 14)")
    (tmp_path / "deep.json").write_text("[" * 100000)
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--camera", f"json:{tmp_path / 'deep.json'}",
                "--device", "cpu", "--out", tmp_path / "o")
    refused(r, "--camera json:", "deep.json", "needs viewmats")


@pytest.mark.parametrize("header,says", [
    (b"element vertex 1\nproperty float x\nproperty float x\n", "property x appears twice"),
    (b"element vertex 1\nproperty float x\nelement vertex 1\nproperty float y\n", "two vertex elements"),
])
def test_ply_header_with_a_duplicate(run_dtk, tmp_path, header, says):
    (tmp_path / "s.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\n" + header + b"end_header\n" + bytes(8))
    r = run_dtk("render-gs", "--ply", tmp_path / "s.ply", "--intrinsics", "1,1,1,1", "--size", "4x4",
                "--device", "cpu", "--out", tmp_path / "o")
    refused(r, "--ply", "s.ply", says)


# ---------------------------------------------------------------------------
# item 12: runs too large for the machine


def test_check_fits(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 3 << 30)
    resources.check_fits("--size 8x8", 1 << 30)
    with pytest.raises(resources.BadInput, match=r"^--size 9x9: needs about 4.0 GiB of memory, 3.0 GiB available$"):
        resources.check_fits("--size 9x9", 4 << 30)
    monkeypatch.setattr(resources, "available_memory", lambda device=None: None)
    resources.check_fits("anything", 1 << 60)   # unknown: not checked


def test_available_memory_reads_meminfo_and_cgroup_limits(monkeypatch, tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(resources, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(resources, "_PROC_CGROUP", tmp_path / "none")
    assert resources.available_memory() == 8000000 * 1024
    # cgroup v2: a job's limit of 2 GiB, 1.5 GiB used of which 1 GiB is file cache
    root = tmp_path / "cg2"
    job = root / "slurm" / "job1"
    job.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "memory.max").write_text("max\n")
    (job / "memory.max").write_text(f"{2 << 30}\n")
    (job / "memory.current").write_text(f"{3 << 29}\n")
    (job / "memory.stat").write_text(f"anon 1\ninactive_file {1 << 29}\nactive_file {1 << 29}\n")
    (tmp_path / "cgroup").write_text("0::/slurm/job1\n")
    monkeypatch.setattr(resources, "_PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(resources, "_CGROUP_ROOT", root)
    assert resources.available_memory("cpu") == (2 << 30) - (1 << 29)
    # cgroup v1's memory controller, unlimited at the root, limited in the container's group
    root = tmp_path / "cg1"
    group = root / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "memory.usage_in_bytes").write_text("5\n")
    (group / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    (group / "memory.usage_in_bytes").write_text(f"{1 << 28}\n")
    (tmp_path / "cgroup").write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    monkeypatch.setattr(resources, "_CGROUP_ROOT", root)
    assert resources.available_memory() == (1 << 30) - (1 << 28)


def test_available_memory_on_this_machine():
    available = resources.available_memory()
    assert available is None or available > 0


def test_render_gs_refuses_a_size_that_cannot_fit(run_dtk, tmp_path, clip, monkeypatch):
    """200000x200000 was OOM-killed at 22 GB with no message; now it is refused before anything is rendered
    (the estimate, about 5.5 TiB, is beyond any machine's memory: the machine's own is read)."""
    tracks, frames = clip
    if resources.available_memory() is None:   # where it cannot be read, nothing is checked: say 16 GiB
        monkeypatch.setattr(resources, "available_memory", lambda device=None: 16 << 30)
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--size", "200000x200000", "--device", "cpu",
                "--out", tmp_path / "o")
    line = refused(r, "--size 200000x200000, 1 camera(s), 2 frame(s): needs about", "TiB of memory", "available",
                   out=tmp_path / "o")
    assert "CPU thread" not in r.stderr, line
    # tracks whose image_size claims it: the tracks are named
    data = dict(np.load(tracks))
    data["image_size"] = np.array([200000, 200000])
    data["colors"] = np.full((data["tracks_xyz"].shape[1], 3), 0.5)
    np.savez(tmp_path / "big.npz", **data)
    r = run_dtk("render-gs", "--tracks", tmp_path / "big.npz", "--camera", "identity", "--camera", "orbit:5",
                "--device", "cpu", "--out", tmp_path / "o")
    refused(r, f"--tracks {tmp_path / 'big.npz'}: image_size 200000x200000, 2 camera(s)", "needs about",
            out=tmp_path / "o")


def test_render_gs_estimate_counts_cameras_frames_and_pixels(run_dtk, tmp_path, clip, monkeypatch):
    """With 64 MiB available, a 48x40 render fits and a long static --ply render does not (its frames are held
    while it is encoded)."""
    from test_render_gs import sh_ply

    tracks, frames = clip
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 64 << 20)
    monkeypatch.setattr("dtk.gs.render._BAND_ELEMENTS", 100_000)   # the per-thread term: small here
    r = run_dtk("render-gs", "--tracks", tracks, "--video", frames, "--device", "cpu", "--video-format", "gif",
                "--out", tmp_path / "ok")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("render-gs", "--ply", sh_ply(tmp_path / "s.ply", 0), "--intrinsics", "500,500,320,240", "--size",
                "640x480", "--frames", 100, "--device", "cpu", "--out", tmp_path / "o")
    refused(r, "--size 640x480, 1 camera(s), 100 frame(s): needs about", "64.0 MiB available", out=tmp_path / "o")


def test_track3d_refuses_a_clip_too_large_to_track_or_decode(run_dtk, tmp_path, monkeypatch):
    frames = [np.ascontiguousarray(texture(32, 44, seed=1)[:, t:t + 40]) for t in range(3)]
    video = write_clip(tmp_path / "v", frames)
    np.savez(tmp_path / "d.npz", depth=np.ones((3, 32, 40), np.float32))
    # decoding needs 2·3·32·40·3 = 23 KB, tracking about 100 bytes per pixel and frame: 384 KB
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 100_000)
    r = run_dtk("track3d", video, "--depth", tmp_path / "d.npz", "--fov", 60, "--out", tmp_path / "t.npz")
    refused(r, f"VIDEO {video}: 3 frames of 40x32 to track (fewer with --max-side", "needs about 375.0 KiB",
            "97.7 KiB available")
    assert "CPU thread" not in r.stderr and not (tmp_path / "t.npz").exists()
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 10_000)
    r = run_dtk("track3d", video, "--depth", tmp_path / "d.npz", "--fov", 60, "--out", tmp_path / "t.npz")
    refused(r, f"VIDEO {video}: 3 frame(s) of 40x32 to decode: needs about 22.5 KiB")
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 1 << 30)
    r = run_dtk("track3d", video, "--depth", tmp_path / "d.npz", "--fov", 60, "--out", tmp_path / "t.npz")
    assert r.exit_code == 0, r.stderr
