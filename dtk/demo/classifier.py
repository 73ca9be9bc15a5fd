"""A small CNN that reads the attributes of a "shapes" image back.

Design: 64x64 RGB input -> five 3x3/5x5 conv layers (stride 2 each after the
first, ReLU) -> 4x4x128 map, flattened (so position is kept) -> linear 256
+ ReLU = the *feature* vector (``features``; used for a Frechet distance, like
Inception features for FID) -> one linear head per flat label of
``shapes.LABELS``:

* ``count`` (1 or 2), ``background``,
* ``shape1``/``color1``/``size1``/``position1``: the only shape, or the left
  one of two (whose position is then "left"),
* ``shape2``/``color2``/``size2``: the right shape of two, class "none" when
  there is a single shape.

``attribute_accuracy`` scores images against their captions: for each image
the fraction of the labels its caption states (``shapes.stated_attributes``)
that the classifier predicts, averaged over images.

Weights live in ``dtk/demo/classifier/model.safetensors`` (fp16) beside a
``config.json``; ``python -m dtk.demo.build`` retrains them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import CLASSIFIER_DIR
from .shapes import LABELS, parse_caption, stated_attributes


class ShapesClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 256, labels: dict | None = None):
        super().__init__()
        self.labels = {k: list(v) for k, v in (labels or LABELS).items()}
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 5, stride=2, padding=2), nn.ReLU(),          # 32x32
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),      # 16x16
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
        )
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.labels.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 0.5) * 2.0
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def _decode_class(name, value):
    return int(value) if name == "count" else value


def load_classifier(device="cpu", path: str | Path | None = None) -> ShapesClassifier:
    """Load the bundled classifier (eval mode, fp32)."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else CLASSIFIER_DIR
    cfg = json.loads((d / "config.json").read_text())
    model = ShapesClassifier(width=cfg["width"], feature_dim=cfg["feature_dim"], labels=cfg["labels"])
    state = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def _to_model(model, images):
    p = next(model.parameters())
    return images.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def predict(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> list[dict]:
    """images: float [B,3,H,W] in [0,1]. Returns one flat label dict per image
    (keys of ``shapes.LABELS``; ``count`` is an int)."""
    return read(model, images, batch_size=batch_size)[0]


@torch.no_grad()
def read(model: ShapesClassifier, images: torch.Tensor, stated: list[dict] | None = None,
         batch_size: int = 256) -> tuple[list[dict], list[float]]:
    """One pass of the classifier: the predicted labels per image (as ``predict``) and, given ``stated`` (one
    {label: value} dict per image, as ``shapes.stated_attributes`` gives), each image's confidence: the mean
    probability it gives the stated value of each stated attribute — a continuous companion of attribute
    accuracy, with no ties between images that are both read correctly."""
    values = {k: [_decode_class(k, c) for c in classes] for k, classes in model.labels.items()}
    preds: list[dict] = []
    confidence: list[float] = []
    for i in range(0, images.shape[0], batch_size):
        logits = model(_to_model(model, images[i:i + batch_size]))
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        for j in range(len(next(iter(idx.values())))):
            preds.append({k: values[k][idx[k][j]] for k in idx})
        if stated is not None:
            probs = {k: v.float().softmax(-1).cpu() for k, v in logits.items()}
            for j, want in enumerate(stated[i:i + batch_size]):
                p = [probs[k][j, values[k].index(v)].item() for k, v in want.items()]
                confidence.append(sum(p) / len(p))
    return preds, confidence


@torch.no_grad()
def features(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features [B, D] (float32, on CPU) of float [B,3,H,W] images in [0,1]."""
    chunks = [model.features(_to_model(model, images[i:i + batch_size])).float().cpu()
              for i in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks)


def attribute_accuracy(model: ShapesClassifier, images: torch.Tensor, captions) -> tuple[float, dict]:
    """Mean over images of the fraction of caption-stated attributes the
    classifier agrees with; plus per-attribute accuracy ({label: acc})."""
    captions = list(captions)
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    preds = predict(model, images)
    per_image, hits, totals = [], {}, {}
    for cap, pred in zip(captions, preds):
        attrs = parse_caption(cap)
        if attrs is None:
            raise ValueError(f"caption not in the shapes grammar: {cap!r}")
        stated = stated_attributes(attrs)
        ok = [pred[k] == v for k, v in stated.items()]
        per_image.append(sum(ok) / len(ok))
        for (k, _), o in zip(stated.items(), ok):
            hits[k] = hits.get(k, 0) + int(o)
            totals[k] = totals.get(k, 0) + 1
    mean = float(sum(per_image) / max(1, len(per_image)))
    return mean, {k: hits[k] / totals[k] for k in totals}


def images_to_tensor(images) -> torch.Tensor:
    """uint8 numpy [B,H,W,3] (or a list of PIL images) -> float [B,3,H,W] in [0,1]."""
    import numpy as np

    arr = np.stack([np.asarray(im) for im in images]) if not hasattr(images, "shape") else images
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
