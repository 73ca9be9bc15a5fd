"""Procedural 3D tracking scenes with exact ground truth (the track3d benchmark's data).

    python -m dtk.demo.tracks --out DIR [--scenes 5] [--frames 24] [--size 256] [--seed 0]

Each scene is a moving pinhole camera looking at textured planar cards in
front of a textured back wall: every card translates and turns in 3D, passes
in front of the others (occlusions) and may leave the view. Everything is ray
cast analytically, so for every pixel of frame 0 the surface point it sees is
known exactly, and so are that point's position in every later frame's
camera coordinates, its projection, and whether it is visible there (in view,
and the first surface its ray meets). Pure numpy; deterministic in the seed.

Writes per scene (``DIR/scene-NNN/``): ``frames/NNN.png`` (2×2 supersampled
colour), ``depth.npy`` [T, H, W] camera z in metres at the pixel centres,
``gt.npz`` in the TAPVid-3D layout (``tracks_XYZ`` [T, N, 3] camera
coordinates, ``visibility`` [T, N], ``tracks_uv`` [T, N, 2], ``queries_xyt``
[N, 3] at frame-0 pixel centres, ``fx_fy_cx_cy``) for N query pixels, and
``scene.json`` (intrinsics and the command line that tracks it).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WALL_DEPTH = 8.0
FOV_DEG = 60.0


def rotation(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues: a rotation vector [3] → 3×3 matrix."""
    theta = float(np.linalg.norm(axis_angle))
    if theta < 1e-12:
        return np.eye(3)
    k = axis_angle / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * K + (1 - math.cos(theta)) * K @ K


@dataclass
class Card:
    """A textured rectangle: centre and orientation per frame, half-sizes (metres), a texture."""
    centres: np.ndarray      # [T, 3] world
    rotations: np.ndarray    # [T, 3, 3] columns: the card's s axis, r axis, normal
    half: tuple[float, float]
    waves: np.ndarray        # [3, K, 4]: per colour channel, K waves (frequency s, frequency r, phase, amplitude)
    base: np.ndarray         # [3] mean colour 0..1

    def colour(self, s: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Colour [..., 3] at card coordinates (s, r) in metres: a sum of plane waves per channel."""
        out = []
        for c in range(3):
            w = self.waves[c]
            phase = s[..., None] * w[:, 0] + r[..., None] * w[:, 1] + w[:, 2]
            out.append(self.base[c] + (np.sin(phase) * w[:, 3]).sum(-1))
        return np.clip(np.stack(out, -1), 0, 1)


@dataclass
class Scene:
    cards: list[Card]        # the back wall first
    cam_rot: np.ndarray      # [T, 3, 3] camera → world rotation
    cam_pos: np.ndarray      # [T, 3] camera centre, world
    intrinsics: tuple[float, float, float, float]
    size: tuple[int, int]    # (W, H)


def make_scene(seed: int, frames: int = 24, size: int = 256, cards: int = 4) -> Scene:
    """A random scene: a back wall at 8 m and ``cards`` cards at 2–5 m moving over ``frames`` frames."""
    rng = np.random.default_rng(seed)
    W = H = size
    f = 0.5 * W / math.tan(math.radians(FOV_DEG) / 2)
    t = np.arange(frames)[:, None]

    def texture(scale: float) -> tuple[np.ndarray, np.ndarray]:
        # wavelengths of 4–16 pixels at the card's typical depth: detail optical flow can lock onto
        wavelength = scale * rng.uniform(4, 16, (3, 6)) / f
        angle = rng.uniform(0, 2 * math.pi, (3, 6))
        k = 2 * math.pi / wavelength
        waves = np.stack([k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * math.pi, (3, 6)),
                          rng.uniform(0.04, 0.12, (3, 6))], -1)
        return waves, rng.uniform(0.3, 0.7, 3)

    waves, base = texture(WALL_DEPTH)
    wall = Card(np.repeat([[0.0, 0.0, WALL_DEPTH]], frames, 0), np.repeat(np.eye(3)[None], frames, 0),
                (60.0, 60.0), waves, base)
    scene_cards = [wall]
    for _ in range(cards):
        depth = rng.uniform(2.0, 5.0)
        start = np.array([rng.uniform(-0.5, 0.5) * depth * 0.8, rng.uniform(-0.5, 0.5) * depth * 0.8, depth])
        velocity = rng.normal(0, 1, 3) * np.array([0.03, 0.03, 0.02])
        tilt = rng.normal(0, 0.3, 3) * np.array([1, 1, 0.5])
        spin = rng.normal(0, 0.02, 3) * np.array([0.5, 0.5, 1.5])   # radians per frame
        rotations = np.stack([rotation(tilt + spin * i) for i in range(frames)])
        half = (rng.uniform(0.15, 0.35) * depth, rng.uniform(0.15, 0.35) * depth)
        waves, base = texture(depth)
        scene_cards.append(Card(start + velocity * t, rotations, half, waves, base))
    # the camera slides and turns a little (a handheld pan): 0.02 m and 0.3° per frame, roughly
    cam_pos = rng.normal(0, 1, 3) * np.array([0.02, 0.01, 0.01]) * t
    yaw, pitch = rng.normal(0, 0.005), rng.normal(0, 0.003)
    cam_rot = np.stack([rotation(np.array([pitch * i, yaw * i, 0.0])) for i in range(frames)])
    return Scene(scene_cards, cam_rot, cam_pos, (f, f, W / 2, H / 2), (W, H))


def cast(scene: Scene, frame: int, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays through image points ``uv`` [N, 2] of ``frame``: (index of the first card hit [N] (−1: none),
    camera z of the hit [N], card coordinates (s, r) [N, 2] of the hit)."""
    fx, fy, cx, cy = scene.intrinsics
    d_cam = np.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, np.ones(len(uv))], -1)
    d = d_cam @ scene.cam_rot[frame].T            # world direction with camera z component 1 → λ = camera z
    origin = scene.cam_pos[frame]
    best = np.full(len(uv), np.inf)
    which = np.full(len(uv), -1)
    coords = np.zeros((len(uv), 2))
    for k, card in enumerate(scene.cards):
        R, p = card.rotations[frame], card.centres[frame]
        n = R[:, 2]
        denom = d @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = ((p - origin) @ n) / denom
        local = (origin + lam[:, None] * d - p) @ R[:, :2]
        hit = (lam > 1e-6) & (np.abs(local[:, 0]) <= card.half[0]) & (np.abs(local[:, 1]) <= card.half[1]) & (lam < best)
        best = np.where(hit, lam, best)
        which = np.where(hit, k, which)
        coords = np.where(hit[:, None], local, coords)
    return which, best, coords


def render(scene: Scene, frame: int, supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 colour [H, W, 3] averaged over supersample² rays per pixel, camera z [H, W] at pixel centres)."""
    W, H = scene.size
    ys, xs = np.mgrid[0:H, 0:W]
    colour = np.zeros((H * W, 3))
    offsets = (np.arange(supersample) + 0.5) / supersample
    for oy in offsets:
        for ox in offsets:
            uv = np.stack([xs.ravel() + ox, ys.ravel() + oy], -1)
            which, _, coords = cast(scene, frame, uv)
            for k, card in enumerate(scene.cards):
                m = which == k
                colour[m] += card.colour(coords[m, 0], coords[m, 1])
    colour /= supersample ** 2
    _, z, _ = cast(scene, frame, np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], -1))
    return (colour.reshape(H, W, 3) * 255 + 0.5).astype(np.uint8), z.reshape(H, W)


def ground_truth(scene: Scene, queries: np.ndarray, frames: int) -> dict:
    """Exact tracks of the surface points seen at ``queries`` [N, 2] in frame 0."""
    which, _, coords = cast(scene, 0, queries)
    fx, fy, cx, cy = scene.intrinsics
    W, H = scene.size
    xyz = np.zeros((frames, len(queries), 3))
    uv = np.zeros((frames, len(queries), 2))
    vis = np.zeros((frames, len(queries)), bool)
    for t in range(frames):
        world = np.zeros((len(queries), 3))
        for k, card in enumerate(scene.cards):
            m = which == k
            R, p = card.rotations[t], card.centres[t]
            world[m] = p + coords[m] @ R[:, :2].T
        cam = (world - scene.cam_pos[t]) @ scene.cam_rot[t]     # world → camera: Rᵀ(X − C)
        xyz[t] = cam
        z = np.maximum(cam[:, 2], 1e-9)
        uv[t] = np.stack([fx * cam[:, 0] / z + cx, fy * cam[:, 1] / z + cy], -1)
        inside = (cam[:, 2] > 0) & (uv[t, :, 0] >= 0) & (uv[t, :, 0] < W) & (uv[t, :, 1] >= 0) & (uv[t, :, 1] < H)
        first, hit_z, _ = cast(scene, t, uv[t])
        # visible: in view and the first surface on its ray (the same card, at the same depth)
        vis[t] = inside & (first == which) & (np.abs(hit_z - cam[:, 2]) <= 1e-6 * cam[:, 2] + 1e-9)
    return {"tracks_XYZ": xyz.astype(np.float32), "visibility": vis, "tracks_uv": uv.astype(np.float32),
            "queries_xyt": np.concatenate([queries, np.zeros((len(queries), 1))], 1).astype(np.float32),
            "fx_fy_cx_cy": np.asarray(scene.intrinsics, np.float32)}


def write_scene(out: Path, seed: int, frames: int = 24, size: int = 256, queries: int = 4096) -> dict:
    """One scene on disk (see the module docstring); returns its scene.json record."""
    from PIL import Image

    scene = make_scene(seed, frames, size)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    depth = np.zeros((frames, size, size), np.float32)
    for t in range(frames):
        image, depth[t] = render(scene, t)
        Image.fromarray(image).save(out / "frames" / f"{t:03d}.png")
    np.save(out / "depth.npy", depth)
    rng = np.random.default_rng(seed + 10_000)
    pixels = rng.choice(size * size, size=min(queries, size * size), replace=False)
    centres = np.stack([pixels % size, pixels // size], -1) + 0.5
    gt = ground_truth(scene, centres, frames)
    np.savez_compressed(out / "gt.npz", **gt)
    fx, fy, cx, cy = scene.intrinsics
    record = {"seed": seed, "frames": frames, "size": [size, size], "intrinsics": [fx, fy, cx, cy],
              "queries": len(centres), "visible_fraction": float(gt["visibility"].mean()),
              "track": f"dtk track3d {out / 'frames'} --depth {out / 'depth.npy'} "
                       f"--intrinsics {fx:.6f},{fy:.6f},{cx},{cy} --eval {out / 'gt.npz'} --out tracks.npz"}
    (out / "scene.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dtk.demo.tracks", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for scene-NNN/ subfolders")
    ap.add_argument("--scenes", type=int, default=5)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--queries", type=int, default=4096, help="ground-truth tracks per scene (frame-0 pixels)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for i in range(args.scenes):
        record = write_scene(Path(args.out) / f"scene-{i:03d}", args.seed + i, args.frames, args.size, args.queries)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
