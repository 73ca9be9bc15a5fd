"""New cameras for a pseudo-4D field: per frame, a 4×4 view matrix (from the input camera's coordinates of
that frame) and intrinsics.

The field of frame t lives in the input camera's coordinates of frame t, so the
identity camera reproduces the input. A spec moves the camera gradually over
the clip (amount × t/(T−1)) unless it says otherwise:

    identity
    translate:X,Y,Z          metres, camera axes (x right, y down, z forward)
    rotate:YAW,PITCH,ROLL    degrees, about the camera's own centre
    orbit:DEGREES[,DEPTH]    around the point DEPTH metres ahead (default: the median depth), about the y axis
    dolly:DELTA[,DEPTH]      back by DELTA metres while the focal length grows by (DEPTH + DELTA)/DEPTH,
                             so the subject at DEPTH keeps its size (DEPTH default: the median depth)
    focal:FACTOR             focal length × FACTOR
    json:FILE                {"viewmats": [T][4][4], "intrinsics": [T][3][3] or [fx, fy, cx, cy] per frame}

Conventions: OpenCV camera axes (x right, y down, z forward); a view matrix maps
the input camera's coordinates of the frame to the new camera's (world-to-camera,
as gsplat's ``viewmats``). Positive yaw turns the camera to its right, positive
pitch up; orbit swings it around the pivot by yaw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dtk.errors import BadInput

GRAMMAR = ("identity | translate:X,Y,Z | rotate:YAW,PITCH,ROLL | orbit:DEG[,DEPTH] | dolly:DELTA[,DEPTH] | "
           "focal:FACTOR | json:FILE")


def K_matrix(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rotation(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """R = R_z(roll) R_x(pitch) R_y(yaw), angles in radians (y is the camera's down axis)."""
    cy_, sy_ = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = torch.tensor([[cy_, 0, sy_], [0, 1, 0], [-sy_, 0, cy_]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=torch.float64)
    rz = torch.tensor([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ rx @ ry


def pose(R: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The view matrix of a camera at ``centre`` (input-camera coordinates) with orientation R (camera→input):
    x_new = Rᵀ(x − centre)."""
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3] = R.T
    view[:3, 3] = -R.T @ centre
    return view


def _numbers(text: str, spec: str, least: int, most: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")] if text else []
    except ValueError:
        values = []
    if not least <= len(values) <= most or not all(math.isfinite(v) for v in values):
        raise BadInput(f"--camera {spec}: expected {least}{'' if least == most else f'–{most}'} number(s); "
                       f"grammar: {GRAMMAR}")
    return values


def camera_path(spec: str, frames: int, intrinsics: list[float], median_depth: float) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Per-frame view matrices [T, 4, 4] and intrinsics [T, 3, 3] for one camera spec."""
    kind, _, args = spec.partition(":")
    fx, fy, cx, cy = intrinsics
    # 0 at the first frame, 1 at the last; a single frame is the last (a still of the full move)
    ramp = [t / (frames - 1) for t in range(frames)] if frames > 1 else [1.0]
    views, Ks = [], []
    if kind == "json":
        return _from_json(spec, args, frames)
    for s in ramp:
        R, centre, scale = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1.0
        if kind == "identity":
            _numbers(args, spec, 0, 0)
        elif kind == "translate":
            centre = torch.tensor(_numbers(args, spec, 3, 3), dtype=torch.float64) * s
        elif kind == "rotate":
            R = rotation(*[math.radians(v) * s for v in _numbers(args, spec, 3, 3)])
        elif kind == "orbit":
            values = _numbers(args, spec, 1, 2)
            depth = values[1] if len(values) > 1 else median_depth
            if depth <= 0:
                raise BadInput(f"--camera {spec}: the orbit's pivot depth ({depth:g}) must be positive")
            R = rotation(math.radians(values[0]) * s, 0.0, 0.0)
            pivot = torch.tensor([0.0, 0.0, depth], dtype=torch.float64)
            centre = pivot - R @ pivot   # the camera swings around the pivot, still looking at it
        elif kind == "dolly":
            values = _numbers(args, spec, 1, 2)
            depth = values[1] if len(values) > 1 else median_depth
            if depth <= 0 or depth + values[0] <= 0:
                raise BadInput(f"--camera {spec}: the subject depth ({depth:g}) and depth + DELTA must be positive")
            centre = torch.tensor([0.0, 0.0, -values[0] * s], dtype=torch.float64)
            scale = (depth + values[0] * s) / depth
        elif kind == "focal":
            (factor,) = _numbers(args, spec, 1, 1)
            if factor <= 0:
                raise BadInput(f"--camera {spec}: the focal factor must be positive")
            scale = 1 + (factor - 1) * s
        else:
            raise BadInput(f"--camera {spec}: unknown camera '{kind}'; grammar: {GRAMMAR}")
        views.append(pose(R, centre))
        Ks.append(K_matrix(fx * scale, fy * scale, cx, cy))
    return torch.stack(views), torch.stack(Ks)


def _from_json(spec: str, path: str, frames: int):
    from dtk.io import decode_utf8

    try:
        data = json.loads(decode_utf8(Path(path).read_bytes(), f"--camera {spec}"))
        views = torch.tensor(data["viewmats"], dtype=torch.float64)
        intr = torch.tensor(data["intrinsics"], dtype=torch.float64)
    except FileNotFoundError:
        raise BadInput(f"--camera {spec}: no such file") from None
    except OSError as e:
        raise BadInput(f"--camera {spec}: cannot read it ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:   # RecursionError: JSON nested too deep
        raise BadInput(f"--camera {spec}: needs viewmats [T][4][4] and intrinsics [T][3][3] or [T][4] "
                       f"({type(e).__name__}: {e})") from None
    if intr.dim() == 2 and intr.shape[1] == 4:
        intr = torch.stack([K_matrix(*row.tolist()) for row in intr])
    if views.shape != (frames, 4, 4) or intr.shape != (frames, 3, 3):
        raise BadInput(f"--camera {spec}: {tuple(views.shape)} view matrices and {tuple(intr.shape)} intrinsics "
                       f"for a clip of {frames} frames (want ({frames}, 4, 4) and ({frames}, 3, 3))")
    if not (torch.isfinite(views).all() and torch.isfinite(intr).all()):
        raise BadInput(f"--camera {spec}: NaN or infinite values")
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    if not torch.allclose(views[:, 3], bottom.expand(frames, 4)):
        raise BadInput(f"--camera {spec}: a view matrix's last row is not [0, 0, 0, 1]")
    if (intr[:, 0, 0] <= 0).any() or (intr[:, 1, 1] <= 0).any():
        raise BadInput(f"--camera {spec}: focal lengths must be positive")
    return views, intr
