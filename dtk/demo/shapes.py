"""Procedural, deterministic captioned images of coloured shapes ("shapes").

Pure numpy/PIL; no torch.

An image shows ONE shape (80% of samples) or TWO shapes side by side (20%) on a
plain background, 64x64 RGB by default.

Attributes (``attrs``) are a dict::

    {"background": "gray",
     "shapes": [{"shape": "circle", "color": "red", "size": "large", "position": "center"},
                ...]}                                   # one or two entries

A shape's colour always differs from the background. With two shapes the first
is on the left and the second on the right (their positions are implied, not
stated).

Caption grammar (``caption`` / ``parse_caption`` are exact inverses)::

    one shape : "a {size} {color} {shape}{where} on a {background} background"
                where = "" (center) | " on the left" | " on the right"
                        | " at the top" | " at the bottom"
    two shapes: "a {size} {color} {shape} and a {size} {color} {shape} on a {background} background"

e.g. "a large red circle on a white background",
"a small blue star at the top on a black background",
"a small red circle and a large yellow square on a gray background".

Held-out split: a caption (i.e. a full attribute combination) is *held out*
iff ``int(sha256(caption).hexdigest()[:8], 16) % 10 == 0`` -- a fixed,
pseudo-random ~10% of all combinations, single- and two-shape alike. Every
individual attribute value (and practically every pair of values) still
occurs in the training split, so the held-out captions measure compositional
generalisation. ``make_split(..., split="train")`` never yields a held-out
combination, ``split="heldout"`` only yields held-out ones, ``"all"`` both.

``flat_attributes`` turns attrs into the flat label dict the classifier
predicts; ``stated_attributes`` is the subset a caption actually states
(used for attribute accuracy).
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
BACKGROUNDS = ("white", "black", "gray")
COUNTS = (1, 2)

TWO_SHAPE_PROB = 0.2
HELDOUT_MODULUS = 10

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

# centres in a 64x64 frame; radii (circumscribed) in pixels of a 64x64 frame
CENTERS = {"center": (32, 32), "left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47)}
RADIUS_ONE = {"small": 7.0, "large": 14.0}
RADIUS_TWO = {"small": 7.0, "large": 12.5}

WHERE = {"center": "", "left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom"}

# flat label names predicted by the classifier, with their classes
LABELS = {
    "count": COUNTS,
    "background": BACKGROUNDS,
    "shape1": SHAPES,
    "color1": COLORS,
    "size1": SIZES,
    "position1": POSITIONS,
    "shape2": ("none",) + SHAPES,
    "color2": ("none",) + COLORS,
    "size2": ("none",) + SIZES,
}


# --------------------------------------------------------------------- sampling
def _sample_shape(rng, background, position):
    colors = [c for c in COLORS if c != background]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": colors[rng.integers(len(colors))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": position,
    }


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw a random attribute combination (one shape with p=0.8, else two)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if rng.random() < TWO_SHAPE_PROB:
        shapes = [_sample_shape(rng, background, "left"), _sample_shape(rng, background, "right")]
    else:
        shapes = [_sample_shape(rng, background, POSITIONS[rng.integers(len(POSITIONS))])]
    return {"background": background, "shapes": shapes}


# --------------------------------------------------------------------- captions
def caption(attrs: dict) -> str:
    bg = attrs["background"]
    s = attrs["shapes"]
    if len(s) == 1:
        a = s[0]
        return f"a {a['size']} {a['color']} {a['shape']}{WHERE[a['position']]} on a {bg} background"
    a, b = s
    return (f"a {a['size']} {a['color']} {a['shape']} and a {b['size']} {b['color']} {b['shape']}"
            f" on a {bg} background")


def _alt(words):
    return "(" + "|".join(words) + ")"


_OBJ = f"a {_alt(SIZES)} {_alt(COLORS)} {_alt(SHAPES)}"
_WHERE_RE = "(" + "|".join(re.escape(w) for w in WHERE.values() if w) + ")?"
_ONE_RE = re.compile(f"^{_OBJ}{_WHERE_RE} on a {_alt(BACKGROUNDS)} background$")
_TWO_RE = re.compile(f"^{_OBJ} and {_OBJ} on a {_alt(BACKGROUNDS)} background$")
_WHERE_INV = {v: k for k, v in WHERE.items()}


def parse_caption(text: str) -> dict | None:
    """Inverse of :func:`caption`; None if ``text`` is not in the grammar
    (or states a shape with the background's colour)."""
    text = " ".join(str(text).strip().lower().split())
    m = _ONE_RE.match(text)
    if m:
        size, color, shape, where, bg = m.groups()
        attrs = {"background": bg, "shapes": [
            {"shape": shape, "color": color, "size": size, "position": _WHERE_INV[where or ""]}]}
    else:
        m = _TWO_RE.match(text)
        if not m:
            return None
        s1, c1, h1, s2, c2, h2, bg = m.groups()
        attrs = {"background": bg, "shapes": [
            {"shape": h1, "color": c1, "size": s1, "position": "left"},
            {"shape": h2, "color": c2, "size": s2, "position": "right"}]}
    if any(s["color"] == attrs["background"] for s in attrs["shapes"]):
        return None
    return attrs


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce."""
    words = set("a and on the at background".split())
    words.update(SHAPES, COLORS, SIZES, BACKGROUNDS)
    for w in WHERE.values():
        words.update(w.split())
    return sorted(words)


def is_heldout(attrs_or_caption) -> bool:
    text = attrs_or_caption if isinstance(attrs_or_caption, str) else caption(attrs_or_caption)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def flat_attributes(attrs: dict) -> dict:
    """Flat labels (keys of ``LABELS``) of an attribute dict."""
    s = attrs["shapes"]
    out = {"count": len(s), "background": attrs["background"],
           "shape1": s[0]["shape"], "color1": s[0]["color"], "size1": s[0]["size"],
           "position1": s[0]["position"],
           "shape2": "none", "color2": "none", "size2": "none"}
    if len(s) == 2:
        out.update(shape2=s[1]["shape"], color2=s[1]["color"], size2=s[1]["size"])
    return out


def stated_attributes(attrs: dict) -> dict:
    """The flat labels a caption states: count, background, shape1, color1,
    size1 and position1 for one shape (position "center" is stated by
    omission); count, background, shape/color/size of both shapes for two."""
    f = flat_attributes(attrs)
    if f["count"] == 1:
        keys = ("count", "background", "shape1", "color1", "size1", "position1")
    else:
        keys = ("count", "background", "shape1", "color1", "size1", "shape2", "color2", "size2")
    return {k: f[k] for k in keys}


# --------------------------------------------------------------------- rendering
def _polygon(shape, cx, cy, r, angle):
    if shape == "square":
        pts = [(r * 0.85 * math.sqrt(2), math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        cy = cy + 0.2 * r  # centre the triangle's bounding box
        pts = [(r * 1.15, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [((r * 1.1) if k % 2 == 0 else r * 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + rr * math.cos(t + angle), cy + rr * math.sin(t + angle)) for rr, t in pts]


def render(attrs: dict, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``attrs`` as a ``size``x``size`` RGB image (4x supersampled).

    With ``rng`` the exact centre (+-2 px), radius (+-8%) and rotation
    (+-20 degrees) are jittered; without it the canonical layout is drawn."""
    ss = 4
    scale = size * ss / 64.0
    img = Image.new("RGB", (size * ss, size * ss), RGB[attrs["background"]])
    draw = ImageDraw.Draw(img)
    radii = RADIUS_ONE if len(attrs["shapes"]) == 1 else RADIUS_TWO
    for s in attrs["shapes"]:
        cx, cy = CENTERS[s["position"]]
        r = radii[s["size"]]
        angle = 0.0
        if rng is not None:
            cx += rng.uniform(-2, 2)
            cy += rng.uniform(-2, 2)
            r *= rng.uniform(0.92, 1.08)
            angle = math.radians(rng.uniform(-20, 20))
        cx, cy, r = cx * scale, cy * scale, r * scale
        fill = RGB[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(s["shape"], cx, cy, r, angle), fill=fill)
    return img.resize((size, size), Image.BOX)


def make_split(n: int, seed: int, split: str = "train", size: int = 64):
    """``n`` random images of the given split ("train", "heldout" or "all").

    Returns ``(images, captions, attrs)``: a uint8 array [n, size, size, 3],
    a list of caption strings, a list of attribute dicts. Deterministic in
    ``seed``."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    caps, attrs_list = [], []
    for i in range(n):
        while True:
            attrs = sample_attributes(rng)
            if split == "all" or is_heldout(attrs) == (split == "heldout"):
                break
        images[i] = np.asarray(render(attrs, size=size, rng=rng))
        caps.append(caption(attrs))
        attrs_list.append(attrs)
    return images, caps, attrs_list


def grid(images, cols: int = 8) -> Image.Image:
    """Tile uint8 [N,H,W,3] images (or PIL images) into one PIL image."""
    arrs = [np.asarray(im) for im in images]
    h, w = arrs[0].shape[:2]
    rows = (len(arrs) + cols - 1) // cols
    out = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrs):
        out[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = a
    return Image.fromarray(out)


def write_folder(out, n: int, seed: int, split: str = "train", size: int = 64) -> list[str]:
    """An image+caption training folder (``000000.png`` + ``000000.txt`` …) with ``captions.txt``.

    ``captions.txt`` (one caption per line) doubles as a prompt list for
    ``dtk sample`` / ``dtk reflow-pairs``."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, caps, _ = make_split(n, seed=seed, split=split, size=size)
    for i, (im, cap) in enumerate(zip(images, caps)):
        Image.fromarray(im).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(cap + "\n")
    (out / "captions.txt").write_text("".join(c + "\n" for c in caps))
    return caps


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dtk.demo.shapes",
                                 description="Write a folder of captioned shapes images (training data for the demo).")
    ap.add_argument("--out", required=True, help="folder to write NNNNNN.png + NNNNNN.txt into")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("train", "heldout", "all"), default="train")
    args = ap.parse_args(argv)
    write_folder(args.out, args.num, args.seed, args.split)
    print(f"{args.num} images in {args.out}; their captions also in {args.out}/captions.txt")


if __name__ == "__main__":
    main()
