"""The pseudo-4D Gaussian field of GS-DiT: one Gaussian per tracked point, moving with its 3D track.

Tracks come in the TAPVid-3D layout ``dtk track3d`` writes (npz): ``tracks_xyz``
[T, N, 3] (metres, the camera coordinates of each frame), ``visibility`` [T, N],
``intrinsics`` [fx, fy, cx, cy], and optionally ``colors`` [N, 3] or [T, N, 3]
(0–1 or 0–255) and ``image_size`` [W, H]. Colours may also come from the video's
frames (the pixel each track occupies). Gaussians are isotropic with a scale of
``scale_px`` pixels at their depth (s = scale_px · z / f), opacity ``opacity``,
identity rotation; occluded points are kept, hidden, or kept only once they
have been seen. Points that are NaN/inf in a frame are dropped from it (counted).

The standard 3DGS PLY (x, y, z, nx, ny, nz, f_dc_0..2, f_rest_*, opacity as a
logit, scale_0..2 as logs, rot_0..3 as wxyz) is written per frame and read back,
spherical-harmonic colour included (``dtk.gs.sh``: f_rest_* are channel-major,
all of R's coefficients, then G's, then B's). Two layouts are written: "full",
float32 with normals and the 45 f_rest_* of degree 3 (unused bands 0), which
the original 3DGS code and the usual viewers read (248 bytes per Gaussian); and
"compact", float32 without the (zero) normals and with only the SH bands the
field uses, none for a field from tracks (56 bytes per Gaussian, 4.4× smaller).
PLY has no 16-bit float type, so "compact" stays float32 to remain readable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtk.errors import BadInput
from dtk.gs.sh import C0 as SH_C0, MAX_DEGREE, degree_of   # degree 0: colour = 0.5 + C0 · f_dc

OCCLUDED = ("keep", "hide", "seen")


@dataclass
class Tracks:
    xyz: torch.Tensor          # [T, N, 3]
    visible: torch.Tensor      # [T, N] bool
    intrinsics: list[float]    # fx, fy, cx, cy
    colors: torch.Tensor | None  # [N, 3] or [T, N, 3] in 0..1
    size: tuple[int, int] | None  # (W, H)
    dropped: int = 0           # NaN/inf point-frames

    @property
    def frames(self) -> int:
        return self.xyz.shape[0]

    def median_depth(self) -> float:
        z = self.xyz[..., 2][self.finite & (self.xyz[..., 2] > 0)]
        return float(z.median()) if len(z) else 1.0

    @property
    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.xyz).all(-1)


def load_tracks(path: str) -> Tracks:
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"--tracks {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise BadInput(f"--tracks {path}: not a readable npz ({type(e).__name__})") from None
    missing = [k for k in ("tracks_xyz", "visibility", "intrinsics") if k not in data]
    if missing:
        raise BadInput(f"--tracks {path}: no {', '.join(missing)} (TAPVid-3D layout: tracks_xyz [T,N,3], "
                       "visibility [T,N], intrinsics [fx,fy,cx,cy])")
    try:
        xyz = torch.from_numpy(np.asarray(data["tracks_xyz"], dtype=np.float64))
        vis = torch.from_numpy(np.asarray(data["visibility"]).astype(bool))
        intr = [float(v) for v in np.asarray(data["intrinsics"], dtype=np.float64).reshape(-1)]
    except (ValueError, TypeError) as e:
        raise BadInput(f"--tracks {path}: arrays of the wrong kind ({e})") from None
    if xyz.dim() != 3 or xyz.shape[2] != 3:
        raise BadInput(f"--tracks {path}: tracks_xyz has shape {tuple(xyz.shape)}, want [T, N, 3]")
    if tuple(vis.shape) != tuple(xyz.shape[:2]):
        raise BadInput(f"--tracks {path}: visibility {tuple(vis.shape)} does not match tracks_xyz "
                       f"{tuple(xyz.shape[:2])}")
    if 0 in xyz.shape[:2]:
        raise BadInput(f"--tracks {path}: no points or no frames (tracks_xyz {tuple(xyz.shape)})")
    if len(intr) != 4 or not all(np.isfinite(intr)) or intr[0] <= 0 or intr[1] <= 0:
        raise BadInput(f"--tracks {path}: intrinsics {intr}: want [fx, fy, cx, cy] with positive focal lengths")
    colors = None
    try:
        if "colors" in data:
            raw = np.asarray(data["colors"])
            colors = torch.from_numpy(raw.astype(np.float64))
            if colors.numel() and not torch.isfinite(colors).all():
                raise BadInput(f"--tracks {path}: colors hold NaN or infinite values")
            # integer colours are 0..255 whatever their values (a dark first frame may hold only 0s and 1s)
            if np.issubdtype(raw.dtype, np.integer) or (colors.numel() and colors.max() > 1.0):
                colors = colors / 255.0
        size = tuple(int(v) for v in np.asarray(data["image_size"]).reshape(-1)) if "image_size" in data else None
    except (ValueError, TypeError) as e:
        raise BadInput(f"--tracks {path}: colors or image_size of the wrong kind ({e})") from None
    if colors is not None and (colors.shape[-1:] != (3,) or
                               tuple(colors.shape[:-1]) not in (tuple(xyz.shape[1:2]), tuple(xyz.shape[:2]))):
        raise BadInput(f"--tracks {path}: colors {tuple(colors.shape)}, want [N, 3] or [T, N, 3]")
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise BadInput(f"--tracks {path}: image_size {list(size)}, want [width, height], both positive")
    tracks = Tracks(xyz, vis, intr, colors, size)
    tracks.dropped = int((~tracks.finite).sum())
    return tracks


def colors_from_frames(tracks: Tracks, frames) -> torch.Tensor:
    """Per-frame colours [T, N, 3] in 0..1, sampled (nearest pixel) where each track projects in its frame;
    ``frames`` [T, H, W, 3]: uint8, or floats in 0..1."""
    frames = torch.as_tensor(np.asarray(frames))   # uint8 until sampled: a float64 copy of the clip is 8× its size
    T, H, W, _ = frames.shape
    if T != tracks.frames:
        raise BadInput(f"--video: {T} frames, the tracks have {tracks.frames}")
    if tracks.size is not None and tuple(tracks.size) != (W, H):
        raise BadInput(f"--video: frames of {W}x{H}, the tracks were made on {tracks.size[0]}x{tracks.size[1]}")
    fx, fy, cx, cy = tracks.intrinsics
    xyz = torch.nan_to_num(tracks.xyz, nan=0.0, posinf=0.0, neginf=0.0)
    z = xyz[..., 2].clamp(min=1e-6)
    u = (fx * xyz[..., 0] / z + cx).floor().long().clamp(0, W - 1)   # pixel u spans [u, u + 1)
    v = (fy * xyz[..., 1] / z + cy).floor().long().clamp(0, H - 1)
    t = torch.arange(T)[:, None].expand_as(u)
    sampled = frames[t, v, u]
    return sampled.double() / 255.0 if sampled.dtype == torch.uint8 else sampled.double()


@dataclass
class Gaussians:
    means: torch.Tensor       # [N, 3]
    quats: torch.Tensor       # [N, 4] wxyz
    scales: torch.Tensor      # [N, 3]
    opacities: torch.Tensor   # [N]
    colors: torch.Tensor      # [N, 3] in 0..1 (view-independent; the DC colour of an SH scene)
    sh: torch.Tensor | None = None   # [N, K, 3] SH coefficients, K = (d+1)², DC first; when set, it is the colour

    @property
    def sh_degree(self) -> int | None:
        return None if self.sh is None else degree_of(self.sh.shape[1])


def frame_gaussians(tracks: Tracks, t: int, colors: torch.Tensor, *, scale_px: float = 0.7,
                    opacity: float = 0.99, color_source: str = "first", occluded: str = "keep") -> Gaussians:
    """The field at frame ``t``. ``colors``: [N, 3] or [T, N, 3]; with "current", a point takes its colour
    in frame t where it is visible and its last visible colour otherwise."""
    if occluded not in OCCLUDED:
        raise BadInput(f"--occluded {occluded}: choose {', '.join(OCCLUDED)}")
    fx, fy = tracks.intrinsics[:2]
    keep = tracks.finite[t] & (tracks.xyz[t, :, 2] > 0)
    if occluded == "hide":
        keep &= tracks.visible[t]
    elif occluded == "seen":
        keep &= tracks.visible[: t + 1].any(0)
    if colors.dim() == 2:
        col = colors
    elif color_source == "first":
        col = colors[0]
    else:  # the colour of the last frame ≤ t in which the point was visible (frame 0's before that)
        seen = tracks.visible[: t + 1].clone()
        seen[0] = True
        last = (seen * torch.arange(t + 1)[:, None]).amax(0)
        col = colors[last, torch.arange(colors.shape[1])]
    means = tracks.xyz[t][keep]
    s = scale_px * means[:, 2] / (0.5 * (fx + fy))
    n = len(means)
    return Gaussians(means=means, quats=torch.tensor([1.0, 0, 0, 0], dtype=means.dtype).expand(n, 4).contiguous(),
                     scales=s[:, None].expand(n, 3).contiguous(),
                     opacities=torch.full((n,), float(opacity), dtype=means.dtype), colors=col[keep].clamp(0, 1))


# ---------------------------------------------------------------------------
# The standard 3DGS PLY

PLY_REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                "rot_0", "rot_1", "rot_2", "rot_3")
SH_REST = 3 * ((MAX_DEGREE + 1) ** 2 - 1)   # 45 f_rest_*: the degree-3 bands the original 3DGS loader expects
PLY_FORMATS = ("full", "compact")


def ply_properties(ply_format: str = "full", rest: int = SH_REST) -> tuple[str, ...]:
    """The vertex properties, in order, of a "full" PLY (normals, 45 f_rest_*) or a "compact" one (``rest``
    f_rest_*, no normals)."""
    if ply_format == "full":
        rest = SH_REST
    normals = ("nx", "ny", "nz") if ply_format == "full" else ()
    return ("x", "y", "z", *normals, "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(rest)),
            "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


PLY_ORDER = ply_properties("full")
PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
             "char": "i1", "int8": "i1", "ushort": "<u2", "uint16": "<u2", "short": "<i2", "int16": "<i2",
             "uint": "<u4", "uint32": "<u4", "int": "<i4", "int32": "<i4"}


def ply_bytes_per_gaussian(ply_format: str = "full", sh_degree: int = 0) -> int:
    """Bytes per vertex of a PLY that ``write_ply`` writes (float32 properties)."""
    return 4 * len(ply_properties(ply_format, 3 * ((sh_degree + 1) ** 2 - 1)))


def write_ply(path: Path, g: Gaussians, ply_format: str = "full") -> None:
    """Binary little-endian float32 PLY in the layout of the original 3DGS code (``GaussianModel.save_ply``).
    "full": normals (0) and the 45 f_rest_* of degree 3, the bands the field lacks written as 0; "compact": no
    normals, only the field's own f_rest_* (see the module's docstring)."""
    from dtk.io import atomic_write

    if ply_format not in PLY_FORMATS:
        raise BadInput(f"--ply-format {ply_format}: choose {', '.join(PLY_FORMATS)}")
    n = len(g.means)
    dtype = g.means.dtype
    if g.sh is not None:
        dc, rest = g.sh[:, 0].to(dtype), g.sh[:, 1:].to(dtype).transpose(1, 2)   # rest: [N, 3, K−1]
    else:
        dc, rest = (g.colors.to(dtype) - 0.5) / SH_C0, torch.zeros(n, 3, 0, dtype=dtype)
    if ply_format == "full":   # each channel's coefficients padded to degree 3, then channel-major
        rest = torch.cat([rest, torch.zeros(n, 3, SH_REST // 3 - rest.shape[2], dtype=dtype)], 2)
    opac = g.opacities.clamp(1e-6, 1 - 1e-6)
    columns = [g.means, *([torch.zeros(n, 3, dtype=dtype)] if ply_format == "full" else []), dc,
               rest.reshape(n, -1), torch.log(opac / (1 - opac))[:, None], torch.log(g.scales), g.quats]
    table = torch.cat([c.double() for c in columns], 1).numpy().astype("<f4")
    names = ply_properties(ply_format, rest.shape[1] * rest.shape[2])
    assert table.shape[1] == len(names)
    header = ("ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
              + "".join(f"property float {name}\n" for name in names) + "end_header\n")
    with atomic_write(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(table.tobytes())


def read_ply(path: str) -> Gaussians:
    """A static 3DGS PLY (binary little-endian, scalar properties; others than 3DGS's ignored). f_rest_* (0, 9, 24
    or 45 of them: SH degree 0–3, channel-major) become ``sh``; top bands that are all zero are dropped (a
    "full" PLY of a field from tracks renders as degree 0)."""
    raw = Path(path).read_bytes() if Path(path).is_file() else None
    if raw is None:
        raise BadInput(f"--ply {path}: no such file")
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise BadInput(f"--ply {path}: not a PLY file")
    lines = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise BadInput(f"--ply {path}: only binary little-endian PLY is read (as 3DGS writes it)")
    count, names, types, element, vertex_lines = 0, [], [], None, 0
    for line in lines:
        parts = line.split()
        if parts[:1] == ["element"]:
            element = parts[1] if len(parts) > 1 else None
            if element == "vertex":
                if vertex_lines:
                    raise BadInput(f"--ply {path}: two vertex elements; a 3DGS file has one")
                vertex_lines += 1
                if len(parts) != 3 or not parts[2].isdigit():
                    raise BadInput(f"--ply {path}: bad vertex count line {line!r}")
                count = int(parts[2])
            elif not names:
                raise BadInput(f"--ply {path}: element {element} before the vertices; 3DGS files have vertices first")
        elif parts[:1] == ["property"] and element == "vertex":
            if len(parts) != 3 or parts[1] not in PLY_TYPES:
                raise BadInput(f"--ply {path}: property {' '.join(parts[1:])!r} is not a scalar of a known type")
            if parts[2] in names:
                raise BadInput(f"--ply {path}: property {parts[2]} appears twice")
            types.append(PLY_TYPES[parts[1]])
            names.append(parts[2])
    missing = [p for p in PLY_REQUIRED if p not in names]
    if missing:
        raise BadInput(f"--ply {path}: missing properties {', '.join(missing)} (the 3DGS layout)")
    body = raw[end + len(b"end_header\n"):]
    dtype = np.dtype(list(zip(names, types)))
    if len(body) < count * dtype.itemsize:
        raise BadInput(f"--ply {path}: truncated ({len(body)} bytes for {count} vertices)")
    v = np.frombuffer(body, dtype=dtype, count=count)

    def cols(*keys):
        return torch.from_numpy(np.stack([v[k].astype(np.float64) for k in keys], 1))

    logit = cols("opacity")[:, 0]
    dc = cols("f_dc_0", "f_dc_1", "f_dc_2")
    rest = [name for name in names if name.startswith("f_rest_")]
    want = [f"f_rest_{i}" for i in range(len(rest))]
    if sorted(rest, key=lambda k: int(k[7:]) if k[7:].isdigit() else -1) != want or \
            len(rest) not in [3 * ((d + 1) ** 2 - 1) for d in range(MAX_DEGREE + 1)]:
        raise BadInput(f"--ply {path}: {len(rest)} f_rest_* properties; want f_rest_0..N-1 with N = 0, 9, 24 or 45 "
                       "(SH degree 0–3)")
    k = len(rest) // 3 + 1
    # [N, 3·(K−1)] channel-major → [N, 3, K−1] → [N, K−1, 3]
    higher = cols(*want).view(count, 3, k - 1).transpose(1, 2) if rest else torch.zeros(count, 0, 3,
                                                                                            dtype=torch.float64)
    sh = torch.cat([dc[:, None], higher], 1)
    while sh.shape[1] > 1 and not sh[:, math.isqrt(sh.shape[1] - 1) ** 2:].any():   # an all-zero top band
        sh = sh[:, :math.isqrt(sh.shape[1] - 1) ** 2]
    return Gaussians(means=cols("x", "y", "z"), quats=cols("rot_0", "rot_1", "rot_2", "rot_3"),
                     scales=torch.exp(cols("scale_0", "scale_1", "scale_2")), opacities=torch.sigmoid(logit),
                     colors=(0.5 + SH_C0 * dc).clamp(0, 1), sh=sh.contiguous())
