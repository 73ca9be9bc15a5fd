#!/usr/bin/env python3
"""Benchmark: the FD noise floor of the shapes benchmark as a function of the number of images.

    python benchmarks/fd_noise_floor.py [--sizes 100,250,500,1000,2000] [--save]

For each N: FD (classifier features) between two independent renderings of the
same N held-out captions (what a perfect generator would score as FD-real),
and between two renderings of *different* captions. `dtk eval`'s default
--num-images is chosen where the first is small against the gaps we measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,250,500,1000,2000")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    from dtk.logs import quiet_libraries

    quiet_libraries()
    import numpy as np

    from dtk.demo import shapes
    from dtk.demo.classifier import features, load_classifier
    from dtk.eval.metrics import fd
    from dtk.eval.rewards import images_to_tensor
    from dtk.evaluate import BENCHMARK_SEED

    model = load_classifier("cpu")

    def feats(attrs, seed):
        rng = np.random.default_rng(seed)
        return features(model, images_to_tensor([shapes.render(a, rng=rng) for a in attrs]))

    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        _, _, attrs = shapes.make_split(n, seed=BENCHMARK_SEED, split="heldout")
        _, _, other = shapes.make_split(n, seed=BENCHMARK_SEED + 7, split="heldout")
        a, b = feats(attrs, BENCHMARK_SEED + 1), feats(attrs, BENCHMARK_SEED + 2)
        rows.append((n, fd(a, b), fd(a, feats(other, BENCHMARK_SEED + 3))))
    report("fd_noise_floor", "FD noise floor of shapes-v1", args,
           ["| images | FD same captions (noise floor) | FD other captions |", "|---:|---:|---:|",
            *[f"| {n} | {same:.2f} | {diff:.2f} |" for n, same, diff in rows]])


if __name__ == "__main__":
    main()
