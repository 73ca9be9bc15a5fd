"""Rewards: functions of (image, prompt) → scores, one dict per image.

* ``shapes``    — the demo classifier: fraction of the caption's attributes it
                  reads back from the image (``shapes``), and 0/1 per attribute
                  (``shapes/color1`` …), and ``shapes/confidence``: the mean
                  probability it gives the stated values (continuous; ranks
                  images that are both read correctly). Built in, offline.
* ``clip``      — CLIP score, 100·max(cos(image, text), 0) (the torchmetrics
                  convention). Default weights: openai/clip-vit-large-patch14.
* ``pickscore`` — PickScore (Kirstain et al. 2023): logit_scale·cos with the
                  PickScore_v1 CLIP-H. Default: yuvalkirstain/PickScore_v1.
* ``hpsv2``     — HPS v2/v2.1: 100·cos with an HPS checkpoint in the
                  transformers ``CLIPModel`` layout (give its path).
* ``aesthetic`` — LAION aesthetic predictor v2: an MLP on the normalised CLIP
                  ViT-L/14 image embedding (give the MLP weights' path; its
                  CLIP comes from ``--clip-model``).

Weights come from a local path or the local hub cache; when they are missing
the error names the reward, what is missing and how to get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dtk.errors import BadInput
from dtk.hub import local_path

REWARDS = ("shapes", "clip", "pickscore", "hpsv2", "aesthetic")
# The score that ranks a reward's images into preference pairs. The shapes accuracy counts attributes read
# back, so images that are all read correctly tie (a whole demo pipeline of ties); its confidence is continuous.
RANK_BY = {"shapes": "shapes/confidence"}


def default_rank_key(scores) -> str | None:
    """The key that ranks images scored with ``scores`` (names in the order `dtk score` wrote them, the first
    reward first): that reward's continuous score."""
    first = next(iter(scores), None)
    key = RANK_BY.get(first)
    return key if key in scores else first
DEFAULT_WEIGHTS = {
    "clip": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hpsv2": None,
    "aesthetic": None,
}
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def parse_reward_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[=WEIGHTS]`` → (name, weights path or hub id)."""
    name, _, weights = spec.partition("=")
    if name not in REWARDS:
        raise BadInput(f"--reward {spec}: unknown reward (choose from {', '.join(REWARDS)})")
    return name, weights or DEFAULT_WEIGHTS.get(name)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images → float [B, 3, H, W] in [0, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


class ShapesReward:
    name = "shapes"

    def __init__(self, device):
        from dtk.demo.classifier import load_classifier

        self.model = load_classifier(device)

    def __call__(self, images, prompts: list[str]) -> list[dict]:
        from dtk.demo.classifier import read
        from dtk.demo.shapes import parse_caption, stated_attributes

        stated = []
        for prompt in prompts:
            attrs = parse_caption(prompt)
            if attrs is None:
                raise BadInput(f"--reward shapes: prompt {prompt!r} is not a caption of the shapes grammar "
                               "(e.g. 'a large red circle on a white background')")
            stated.append(stated_attributes(attrs))
        out = []
        for want, pred, conf in zip(stated, *read(self.model, images_to_tensor(images), stated)):
            hits = {f"shapes/{k}": float(pred[k] == v) for k, v in want.items()}
            out.append({"shapes": sum(hits.values()) / len(hits), "shapes/confidence": conf, **hits})
        return out


@dataclass
class _Clip:
    model: object
    processor: object
    device: object

    @torch.no_grad()
    def embed(self, images, prompts=None):
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        img = self.model.get_image_features(**inputs)
        img = getattr(img, "pooler_output", img)
        img = img / img.norm(dim=-1, keepdim=True)
        if prompts is None:
            return img, None
        # CLIP reads at most its position embeddings' length (77); longer prompts are cut, as PickScore's card does
        limit = self.model.config.text_config.max_position_embeddings
        tok = self.processor(text=list(prompts), padding=True, truncation=True, max_length=limit,
                             return_tensors="pt").to(self.device)
        txt = self.model.get_text_features(**tok)
        txt = getattr(txt, "pooler_output", txt)
        return img, txt / txt.norm(dim=-1, keepdim=True)


def _load_clip(option: str, weights: str | None, device, processor_fallback: str | None = None) -> _Clip:
    """A CLIP model (transformers layout) and its processor, in fp32 whatever the checkpoint's dtype (fp16
    scores make false ties); ``option`` names the flag in errors (``--reward pickscore``, ``--clip-model``)."""
    from transformers import CLIPModel, CLIPProcessor

    if weights is None:
        raise BadInput(f"{option}: needs weights: {option}=PATH")
    path = local_path(weights, option)
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{option}={weights}: not a CLIP model in the transformers layout ({type(e).__name__})") from None
    # transformers fills missing weights with random ones (and dtk keeps its warnings quiet): refuse instead
    incomplete = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k
                                                        for k in info.get("mismatched_keys", [])]
    if incomplete:
        raise BadInput(f"{option}={weights}: an incomplete CLIP checkpoint ({len(incomplete)} weights missing or of "
                       f"another shape, e.g. {sorted(incomplete)[0]})")
    model = model.float().to(device).eval()   # fp16 checkpoints upcast exactly; fp16 scores make false ties
    try:
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - PickScore ships without a processor; it uses CLIP-H's
        if processor_fallback is None:
            raise BadInput(f"{option}={weights}: no CLIP processor (tokenizer/preprocessor) in it") from None
        try:
            processor = CLIPProcessor.from_pretrained(str(local_path(processor_fallback, f"{option} processor")),
                                                      local_files_only=True)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - a cache holding only the open_clip weights of that repo
            raise BadInput(f"{option}={weights}: needs the processor of {processor_fallback}, not found in the local "
                           f"cache ({type(e).__name__}); fetch it with `hf download {processor_fallback} --include "
                           "'*.json' '*.txt'`") from None
    return _Clip(model, processor, device)


class ClipReward:
    """CLIP score, PickScore and HPSv2: cosine of image and text embeddings, each with its scale."""

    def __init__(self, name: str, weights: str | None, device, option: str | None = None):
        self.name = name
        self.clip = _load_clip(option or f"--reward {name}", weights, device,
                               PICKSCORE_PROCESSOR if name == "pickscore" else None)

    @torch.no_grad()
    def __call__(self, images, prompts):
        img, txt = self.clip.embed(images, prompts)
        cos = (img * txt).sum(-1)
        if self.name == "clip":
            values = 100 * cos.clamp(min=0)
        elif self.name == "pickscore":
            values = self.clip.model.logit_scale.exp() * cos
        else:
            values = 100 * cos
        return [{self.name: float(v)} for v in values]


class AestheticReward:
    """LAION aesthetic predictor v2 (an MLP; layer sizes read from its weights)."""

    name = "aesthetic"

    def __init__(self, weights: str | None, clip_model: str, device):
        if weights is None:
            raise BadInput("--reward aesthetic: needs the LAION aesthetic MLP weights: --reward aesthetic=PATH "
                           "(.safetensors, or the original .pth state dict)")
        path = local_path(weights, "--reward aesthetic=")
        state = _load_state_dict(path)   # a few KB: a broken file is refused before CLIP loads
        self.clip = _load_clip("--clip-model", clip_model, device)
        self.mlp = _aesthetic_mlp(state, path, self.clip.model.config.projection_dim).to(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        img, _ = self.clip.embed(images)
        return [{"aesthetic": float(v)} for v in self.mlp(img.float()).squeeze(-1)]


def _aesthetic_mlp(state: dict, path: Path, width: int) -> torch.nn.Sequential:
    """LAION's predictor: linear layers named ``layers.N`` (v2, the MLP) or a single ``weight``/``bias`` (v1, linear),
    applied without activations (as LAION's); the first takes the CLIP embedding, the last gives one number."""
    import re

    if isinstance(state.get("state_dict"), dict):   # a Lightning-style checkpoint
        state = state["state_dict"]
    numbered = re.compile(r"(.+\.)?\d+")   # "layers.0", "0": a layer's place in the MLP
    names = sorted({k.rsplit(".", 1)[0] if "." in k else "" for k in state if k.endswith("weight")},
                   key=lambda k: int(k.rsplit(".", 1)[-1]) if numbered.fullmatch(k) else -1)
    if not names or any(not (n == "" or numbered.fullmatch(n)) for n in names):
        raise BadInput(f"--reward aesthetic={path}: not LAION's aesthetic predictor (its weights are "
                       f"{', '.join(sorted(state)[:4])}...)")
    layers = []
    for name in names:
        prefix = f"{name}." if name else ""
        w, b = state[f"{prefix}weight"], state.get(f"{prefix}bias")
        if not (torch.is_tensor(w) and w.dim() == 2 and torch.is_tensor(b) and b.shape == w.shape[:1]):
            raise BadInput(f"--reward aesthetic={path}: {prefix}weight/bias are not a linear layer")
        layer = torch.nn.Linear(w.shape[1], w.shape[0])
        layer.load_state_dict({"weight": w.float(), "bias": b.float()})
        layers.append(layer)
    if layers[0].in_features != width or layers[-1].out_features != 1:
        raise BadInput(f"--reward aesthetic={path}: an MLP from {layers[0].in_features} to {layers[-1].out_features}; "
                       f"this --clip-model gives {width}-wide embeddings and the predictor one score")
    return torch.nn.Sequential(*layers).eval()


def _load_state_dict(path: Path) -> dict:
    if path.is_dir():
        raise BadInput(f"--reward aesthetic={path}: a directory; name the weights file (.safetensors or .pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - truncated, or not safetensors at all: the user's file
            raise BadInput(f"--reward aesthetic={path}: not a readable safetensors file "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    try:  # weights_only: tensors and plain containers, never arbitrary pickled code
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"--reward aesthetic={path}: not a state dict of tensors ({type(e).__name__}); convert it "
                       "to .safetensors") from None
    if not isinstance(state, dict):
        raise BadInput(f"--reward aesthetic={path}: not a state dict of tensors ({type(state).__name__})")
    return state


def load_reward(spec: str, device, clip_model: str = DEFAULT_WEIGHTS["clip"]):
    name, weights = parse_reward_spec(spec)
    if name == "shapes":
        return ShapesReward(device)
    if name == "aesthetic":
        return AestheticReward(weights, clip_model, device)
    return ClipReward(name, weights, device)
