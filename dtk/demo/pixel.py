"""The bundled class-conditional pixel-space demo: ``python -m dtk.demo.build --pixel [--quick]``.

A ``DDPMPipeline`` (``UNet2DModel`` with ``num_class_embeds`` = 4, v-prediction,
DDPM linear β schedule: the layout of diffusers' DDPM checkpoints) trained on
32×32 single-shape images of ``dtk.demo.shapes``, the class being the shape
(circle, square, triangle, star); colour, size, position and background vary
within a class. It is the base model `dtk tune-sct` is measured on
(``--model demo-pixel``). v rather than ε: seen as an EDM denoiser, an ε-net's
x̂₀ = x − σ·ε̂ multiplies its error by σ (up to 80 at a consistency model's first
step), while a v-net's x̂₀ ≈ −v̂ there stays bounded; the first build, with ε,
left one-step outputs under a noise texture that 600 tuning steps did not
remove. Training: plain v-MSE with mirrored images, no class
dropout (pixel models sample without CFG), an EMA of the weights (decay 0.998:
a window of ~500 steps, so the early, far-off weights of a short run do not
linger in it); then the shape accuracy of DDIM-50 samples under the demo
classifier is measured for both the EMA and the final weights, the better
ones are shipped, and both accuracies are written to its dtk.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from . import shapes as S
from .common import dir_size_mb, log, lr_at, replace_dir, write_json_atomic

SIZE = 32
CLASSES = list(S.SHAPES)
FULL = dict(images=20000, steps=3600, batch=32, lr=1e-3, warmup=200, eval_per_class=100)
QUICK = dict(images=32, steps=2, batch=8, lr=1e-3, warmup=1, eval_per_class=2)
# no x0 clipping when sampling: the demo and every pixel benchmark were measured without it (dtk's DDIM
# ignored the setting then; it honours it now, as diffusers does)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 clip_sample=False, prediction_type="v_prediction")
SAMPLER = {"scheduler": "ddim", "steps": 50, "guidance": 1.0}
EMA_DECAY = 0.998


def render_classes(labels, seed: int, size: int = SIZE) -> np.ndarray:
    """One training-split single-shape image per class index in ``labels`` [n, size, size, 3] uint8."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        while True:
            attrs = S.sample_attributes(rng)
            if (len(attrs["shapes"]) == 1 and attrs["shapes"][0]["shape"] == CLASSES[label]
                    and not S.is_heldout(attrs)):
                break
        images[i] = np.asarray(S.render(attrs, size=size, rng=rng))
    return images


def class_split(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` single-shape training-split images [n, size, size, 3] uint8 and their class (shape) indices."""
    labels = np.random.default_rng(seed).integers(len(CLASSES), size=n)
    return render_classes(labels, seed + 1, size), labels


def make_unet():
    """~1M parameters, no attention: on CPU, diffusers' attention blocks at 16×16 cost 6× a step's convolutions."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, norm_num_groups=16, num_class_embeds=len(CLASSES))


def train(cfg: dict, seed: int):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler


    torch.manual_seed(seed)
    images, labels = class_split(cfg["images"], seed + 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels)
    unet = make_unet().train()
    abar = DDPMScheduler(**SCHEDULER).alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    ema = [p.detach().clone() for p in unet.parameters()]
    g = torch.Generator().manual_seed(seed)
    t0, smooth = time.time(), None
    for step in range(cfg["steps"]):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        idx = torch.randint(0, len(x), (cfg["batch"],), generator=g)
        x0 = x[idx]
        x0 = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x0, x0.flip(3))  # mirror: same class
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, class_labels=y[idx]).sample, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 200 == 0 or step == cfg["steps"] - 1:
            el = time.time() - t0
            log(f"  pixel unet step {step:5d} loss {smooth:.4f} ({el:.0f}s, {el / (step + 1):.2f}s/step)")
    return unet.eval(), ema, time.time() - t0


def shape_accuracy(images01, labels, clf) -> float:
    """The demo classifier's shape1 accuracy on [N,3,32,32] images in [0,1] (upsampled to its 64×64)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = clf(F.interpolate(images01, size=64, mode="bilinear", align_corners=False))
    pred = logits["shape1"].argmax(1)
    return float((pred == torch.as_tensor(labels)).float().mean())


def build(out: Path, quick: bool, seed: int) -> dict:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    from .classifier import load_classifier

    torch.set_num_threads(2)
    cfg = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    log("[pixel] class-conditional UNet2DModel on 32×32 shapes")
    unet, ema, seconds = train(cfg, seed + 700)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER))
    tmp = Path(tempfile.mkdtemp(prefix=".pixel-model.", dir=out))

    # judge DDIM-50 samples of every class with the demo classifier's shape head, for the final weights and
    # for their EMA, each rounded to the float16 they are shipped in
    from dtk.diffusion.loading import LoadedModel, ModelRef
    from dtk.diffusion.sampling import Request, generate, settings_for

    model = LoadedModel(ref=ModelRef(spec="demo-pixel", path=tmp, family="pixel", sampler=dict(SAMPLER)),
                        pipe=pipe, device=torch.device("cpu"), dtype=torch.float32)
    settings = settings_for(model, steps=2 if quick else None)
    n = cfg["eval_per_class"]
    labels = [c for c in range(len(CLASSES)) for _ in range(n)]
    clf = load_classifier()

    def judge() -> float:
        pipe.to(torch.float16).to(torch.float32)
        samples = torch.cat([generate(model, settings, [Request(str(c), 10_000 + i) for i, c in
                                                        enumerate(labels[s:s + 100], start=s)])
                             for s in range(0, len(labels), 100)])
        return shape_accuracy(samples, labels, clf)

    def load(weights) -> None:
        with torch.no_grad():
            for w, p in zip(weights, unet.parameters()):
                p.copy_(w)

    final_weights = [p.detach().clone() for p in unet.parameters()]
    accuracy_final = judge()
    load(ema)
    accuracy_ema = judge()
    shipped = "ema" if accuracy_ema >= accuracy_final else "final"
    if shipped == "final":
        load(final_weights)
    accuracy = max(accuracy_ema, accuracy_final)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    pipe.to(torch.float32)
    meta = {"kind": "model", "name": "dtk-demo-pixel-shapes",
            "description": "Tiny class-conditional pixel-space DDPM (UNet2DModel) on 32×32 dtk.demo.shapes; "
                           "class = the shape", "classes": CLASSES, "sampler": SAMPLER,
            "metrics": {"shape_accuracy_ddim50": round(accuracy, 4), "weights": shipped,
                        "shape_accuracy_ddim50_ema": round(accuracy_ema, 4),
                        "shape_accuracy_ddim50_final": round(accuracy_final, 4),
                        "ema_decay": EMA_DECAY, "eval_images": len(labels),
                        "train_images": cfg["images"], "train_steps": cfg["steps"], "batch": cfg["batch"],
                        "train_seconds": round(seconds, 1), "size_mb": round(dir_size_mb(tmp), 2)},
            "quick": quick}
    write_json_atomic(tmp / "dtk.json", meta)
    replace_dir(tmp, out / "pixel-model")
    log(json.dumps(meta["metrics"]))
    return meta


def write_class_folder(out, n: int, seed: int) -> None:
    """A training folder for the pixel demo: ``NNNNNN.png`` (32×32) + ``NNNNNN.txt`` holding the class name."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = class_split(n, seed)
    for i, (im, label) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(CLASSES[label] + "\n")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dtk.demo.pixel",
                                 description="Write a folder of class-labelled 32×32 shapes (data for the pixel demo).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_class_folder(args.out, args.num, args.seed)
    print(f"{args.num} images in {args.out}")


if __name__ == "__main__":
    main()
