#!/usr/bin/env python3
"""Benchmark: CPU render time per frame of dtk's rasteriser against a straightforward reference, side by side.

    python benchmarks/render_gs.py [--sizes 320x240,640x480] [--save]

A field of one Gaussian per pixel (scale 0.7 px at its depth, opacity 0.99,
depths 3–3.5 m) seen by the identity camera, as `dtk render-gs` builds it
from dense tracks. The reference is the same EWA maths (dtk.gs.render.project)
composited Gaussian by Gaussian, front to back, each over its radius box —
the loop a first implementation would write. Each size runs in a fresh
process; the table gives the median time per frame, the peak resident
memory of the process and the largest difference between the two images. --save writes benchmarks/results/render_gs.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402


def field(width: int, height: int, f: float = 300.0):
    import torch

    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    z = 3.0 + 0.5 * torch.rand(height * width, generator=g)
    means = torch.stack([((xs.flatten() + 0.5) - width / 2) / f * z, ((ys.flatten() + 0.5) - height / 2) / f * z,
                         z], 1)
    n = len(means)
    K = torch.tensor([[[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]]])
    return (means, torch.tensor([1.0, 0, 0, 0]).expand(n, 4).contiguous(), (0.7 * z / f)[:, None].expand(n, 3)
            .contiguous(), torch.full((n,), 0.99), torch.rand(n, 3, generator=g), torch.eye(4)[None], K)


def reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height):
    """Gaussian by Gaussian, front to back, over each one's radius box (early stop per pixel as gsplat)."""
    import torch

    from dtk.gs.render import covariances, project

    p = project(means, covariances(quats, scales), viewmats, Ks, width, height)
    image = torch.zeros(height, width, 3)
    T = torch.ones(height, width)
    done = torch.zeros(height, width, dtype=torch.bool)   # gsplat's early stop: nothing more once it triggers
    for i in torch.argsort(p.depths[0]).tolist():
        rx, ry = p.radii[0, i].tolist()
        if rx == 0 or ry == 0:
            continue
        mx, my = p.means2d[0, i].tolist()
        x0, x1 = max(0, int(mx - rx)), min(width, int(mx + rx) + 1)
        y0, y1 = max(0, int(my - ry)), min(height, int(my + ry) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = mx - (torch.arange(x0, x1) + 0.5)[None, :]
        dy = my - (torch.arange(y0, y1) + 0.5)[:, None]
        a, b, c = p.conics[0, i].tolist()
        alpha = (opacities[i] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))).clamp(max=0.99)
        alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
        t, stop = T[y0:y1, x0:x1], done[y0:y1, x0:x1]
        stop |= (alpha > 0) & (t * (1 - alpha) <= 1e-4)
        alpha = torch.where(stop, torch.zeros_like(alpha), alpha)
        image[y0:y1, x0:x1] += (alpha * t)[..., None] * colors[i]
        T[y0:y1, x0:x1] = t * (1 - alpha)
    return image


def worker(which: str, width: int, height: int, repeats: int, image_out: str) -> None:
    import resource
    import statistics
    import time

    import torch

    from dtk.gs.render import render

    torch.set_num_threads(2)
    args = field(width, height)
    fn = (lambda: render(*args, width, height)[0][0]) if which == "dtk" else (lambda: reference(*args, width, height))
    torch.save(fn(), image_out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": statistics.median(times),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="320x240,640x480")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-repeats", type=int, default=1)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--worker", nargs=5, metavar=("WHICH", "W", "H", "REPEATS", "IMAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        which, w, h, n, image_out = args.worker
        worker(which, int(w), int(h), int(n), image_out)
        return
    import tempfile

    import torch

    rows, at_target = [], None
    tmp = tempfile.mkdtemp()
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        result = {}
        for which, n in (("dtk", args.repeats), ("reference", args.reference_repeats)):
            out = subprocess.run([sys.executable, __file__, "--worker", which, str(w), str(h), str(n),
                                  f"{tmp}/{which}.pt"], capture_output=True, text=True, check=True)
            result[which] = json.loads(out.stdout.strip().splitlines()[-1])
        d, r = result["dtk"], result["reference"]
        diff = (torch.load(f"{tmp}/dtk.pt") - torch.load(f"{tmp}/reference.pt")).abs().max().item()
        if (w, h) == (320, 240):
            at_target = d["seconds"]
        rows.append(f"| {w}×{h} | {w * h / 1000:.1f}k | {d['seconds']:.3f} | {d['peak_mb']:.0f} | "
                    f"{r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['seconds'] / d['seconds']:.1f}× | {diff:.1e} |")
    lines = [f"one Gaussian per pixel, identity camera, fp32; machine: {machine()}", "",
             "| frame | Gaussians | dtk s/frame | dtk peak MB | reference s/frame | reference peak MB | speed-up | "
             "max abs difference |", "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
             "target: ≤ 0.1 s per 320×240 frame on 2 cores — " + ("not measured" if at_target is None else
                                                                  f"{'met' if at_target <= 0.1 else 'NOT met'} "
                                                                  f"({at_target:.3f} s)")]
    report("render_gs", "render-gs CPU rasteriser", args, lines)


if __name__ == "__main__":
    main()
