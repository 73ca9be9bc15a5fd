"""Rebuild the bundled demo: ``python -m dtk.demo.build [--out dtk/demo] [--quick]``.

Steps (all on CPU, fixed seeds, ``torch.set_num_threads(2)``):

1. procedural data (``dtk.demo.shapes``): training-split images for the
   diffusion model, all-split images for the classifier;
2. the attribute classifier -> ``<out>/classifier/``;
3. a tiny ``AutoencoderKL`` (64x64 -> 16x16x4), reconstruction (shape pixels
   weighted 10x) + small KL; its ``scaling_factor`` is set to 1/std of the latents;
4. a word-level ``CLIPTokenizer``, a tiny ``CLIPTextModel`` and a tiny
   ``UNet2DConditionModel`` trained jointly (epsilon prediction, SD 1.5 noise
   schedule, 10% caption dropout for classifier-free guidance, Min-SNR-5,
   EMA) in the stages of ``UNET_STAGES``: 4,500 steps from scratch, then
   1,800 and 3,000 steps with offset noise 0.1 (``--from-stage K`` runs
   stages K.. on the existing model, so a build can be extended without
   starting over);
5. the ``StableDiffusionPipeline`` is saved (fp16 safetensors) to
   ``<out>/model/`` and evaluated: guidance is picked on training captions,
   then attribute accuracy is measured on held-out and training captions, and
   the time of one guided 25-step image; everything goes into
   ``<out>/model/dtk.json`` and is printed.

``--pixel`` builds the class-conditional pixel-space demo instead
(``dtk.demo.pixel``: ``<out>/pixel-model``, the base model of ``dtk tune-sct``).

``--quick`` is a smoke run of a few steps (used by the tests); its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import DEMO_DIR
from . import shapes as S
from .common import dir_size_mb, log, lr_at, replace_dir, to_tensor, write_json_atomic

FULL = dict(
    clf_images=20000, clf_steps=800, clf_batch=128,
    vae_images=8000, vae_steps=900, vae_batch=32,
    unet_images=20000, unet_batch=32, unet_steps=None,
    eval_heldout=200, eval_train=200, eval_select=100, eval_clf=600,
    guidances=(2.0, 4.0, 7.5), steps=25, timing_repeats=5, timing_warmup=2,
)
QUICK = dict(
    clf_images=64, clf_steps=2, clf_batch=16,
    vae_images=32, vae_steps=2, vae_batch=8,
    unet_images=64, unet_batch=8, unet_steps=2,
    eval_heldout=2, eval_train=2, eval_select=2, eval_clf=16,
    guidances=(3.0,), steps=2, timing_repeats=1, timing_warmup=0,
)
STEPS = 25

# Training stages of the text encoder + UNet, run in order; a stage starts from
# the previous stage's weights as saved (fp16), so a build resumed with
# --from-stage and a from-scratch build are the same computation. Offset noise
# (Guttenberg 2023): SD's schedule leaks the latent mean at t = 999, and
# without it the model cannot choose a flat background colour from the prompt.
UNET_STAGES = (
    dict(steps=4500, lr=1e-3, warmup=200, noise_offset=0.0, seed=300),
    dict(steps=1800, lr=3e-4, warmup=50, noise_offset=0.1, seed=500),
    dict(steps=3000, lr=2e-4, warmup=50, noise_offset=0.1, seed=600, batch=64),
)
SCHEDULER = "dpm++2m"
MAX_LENGTH = 24

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


# ------------------------------------------------------------------ tokenizer
def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(dirpath: Path):
    """Word-level CLIP BPE: byte alphabet + merges that spell each caption word
    as one token (merges learned greedily on the vocabulary)."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet]
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in S.vocabulary()]
    merges = []
    while True:
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(tuple(out))
        words = new_words
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dirpath / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}, indent=2))
    tok = CLIPTokenizer.from_pretrained(str(dirpath))
    for w in S.vocabulary():
        assert len(tok.tokenize(w)) == 1, (w, tok.tokenize(w))
    return tok


# ------------------------------------------------------------------ classifier
def degrade(x, g):
    """The flaws of generated images, at random strengths, so that the classifier
    reads attributes the way a person would and not only on clean renderings:
    blur, pixel noise, a global colour cast, and blotchy low-frequency colour
    noise (what an under-trained diffusion model leaves on flat backgrounds)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]

    def strength(scale):
        return torch.rand(b, 1, 1, 1, generator=g) * scale

    a = strength(0.6)
    x = (1 - a) * x + a * F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    x = x + torch.randn(x.shape, generator=g) * strength(0.06)
    x = x + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * strength(0.12)
    for cells in (4, 8):
        field = torch.randn(b, 3, cells, cells, generator=g)
        x = x + F.interpolate(field, size=x.shape[-2:], mode="bilinear", align_corners=False) * strength(0.08)
    return x.clamp(0, 1)


def train_classifier(cfg, seed, outdir: Path):
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from .classifier import ShapesClassifier

    torch.manual_seed(seed)
    images, _, attrs = S.make_split(cfg["clf_images"], seed=seed, split="all")
    x_all = to_tensor(images)
    flat = [S.flat_attributes(a) for a in attrs]
    y_all = {k: torch.tensor([list(v).index(f[k]) for f in flat]) for k, v in S.LABELS.items()}
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    t0 = time.time()
    for step in range(cfg["clf_steps"]):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, cfg["clf_steps"], 2e-3, 50)
        idx = torch.randint(0, n, (cfg["clf_batch"],), generator=g)
        x = x_all[idx]
        x = degrade(x, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = sum(F.cross_entropy(logits[k].float(), y_all[k][idx]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg["clf_steps"] - 1:
            log(f"  classifier step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".classifier.", dir=outdir))
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(
        {"width": 32, "feature_dim": 256, "labels": {k: list(v) for k, v in model.labels.items()}}, indent=2) + "\n")
    replace_dir(tmp, outdir / "classifier")
    from .classifier import load_classifier
    return load_classifier(path=outdir / "classifier")


# ------------------------------------------------------------------ VAE
def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)


def train_vae(cfg, seed):
    import torch
    torch.manual_seed(seed)
    images, _, _ = S.make_split(cfg["vae_images"], seed=seed + 1, split="all")
    x_all = to_tensor(images) * 2 - 1
    # shape pixels weigh 10x: they carry every attribute but the background
    weight_all = 1 + 9 * ((x_all - x_all[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(cfg["vae_steps"]):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, cfg["vae_steps"], 1e-3, 30)
        idx = torch.randint(0, x_all.shape[0], (cfg["vae_batch"],), generator=g)
        x = x_all[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
        err = rec.float() - x
        kl = post.kl().mean() / (16 * 16 * 4)
        loss = ((err.abs() + err.pow(2)) * weight_all[idx]).mean() + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg["vae_steps"] - 1:
            log(f"  vae step {step:5d} loss {loss.item():.4f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return vae


def encode_latents(vae, images_uint8, batch=256):
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(images_uint8), batch):
            x = to_tensor(images_uint8[i:i + batch]) * 2 - 1
            out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


# ------------------------------------------------------------------ UNet + text encoder
def make_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(cfg)


def make_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
        # an attention-pooled text embedding added to the time embedding: a global
        # conditioning path (FiLM-like) that learns colour/shape/background much
        # faster on a CPU budget than cross-attention alone
        addition_embed_type="text")


def tokenize(tok, captions):
    return tok(list(captions), padding="max_length", max_length=MAX_LENGTH, truncation=True,
               return_tensors="pt").input_ids


def train_unet(cfg, seed, vae, tok, scaling_factor, unet=None, te=None, steps=None, lr=1e-3, warmup=200,
               noise_offset=0.0, batch=None):
    """Train (or, given ``unet``/``te``, continue training) the text encoder + UNet.

    ``noise_offset`` adds a per-channel constant to the noise (offset noise)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    images, caps, _ = S.make_split(cfg["unet_images"], seed=seed + 2, split="train")
    t0 = time.time()
    latents = encode_latents(vae, images) * scaling_factor
    log(f"  encoded {len(images)} latents in {time.time() - t0:.0f}s, std {latents.std().item():.3f}")
    ids = tokenize(tok, caps)
    empty = tokenize(tok, [""])[0]
    te = make_text_encoder(tok) if te is None else te.train()
    unet = make_unet() if unet is None else unet.train()
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    acp = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_params = [p.detach().clone() for p in params]
    snr = acp / (1 - acp)
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    t0 = time.time()
    steps, bs = cfg["unet_steps"] or steps, batch or cfg["unet_batch"]
    ema = None
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, n, (bs,), generator=g)
        z0 = latents[idx]
        tid = ids[idx].clone()
        drop = torch.rand(bs, generator=g) < 0.1
        tid[drop] = empty
        t = torch.randint(0, 1000, (bs,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        if noise_offset:
            eps = eps + noise_offset * torch.randn(z0.shape[:2] + (1, 1), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = te(tid)[0]
        pred = unet(zt, t, cond).sample
        # Min-SNR-5 weighting (Hang et al. 2023) for ε-prediction: faster convergence
        w = (snr[t].clamp(max=5.0) / snr[t]).float()
        loss = (w * F.mse_loss(pred, eps, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p.detach(), 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"  unet step {step:5d} loss {ema:.4f} ({el:.0f}s, {el / (step + 1):.2f}s/step)")
    with torch.no_grad():  # ship the EMA weights
        for e, p in zip(ema_params, params):
            p.copy_(e)
    unet.eval()
    te.eval()
    return unet, te


# ------------------------------------------------------------------ pipeline
def save_pipeline(outdir: Path, vae, te, tok, unet, scaling_factor):
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=float(scaling_factor))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=outdir))
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    replace_dir(tmp, outdir / "model")


def load_pipeline(model_dir: Path, scheduler=SCHEDULER):
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, \
        StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    cls = {"dpm++2m": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, captions, guidance, seed, steps=STEPS, batch=100):
    import torch
    out = []
    for i in range(0, len(captions), batch):
        g = torch.Generator().manual_seed(seed + i)
        im = pipe(list(captions[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                  generator=g, output_type="np").images
        out.append(torch.from_numpy(im).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def time_one_image(pipe, guidance, steps=STEPS, repeats=5, warmup=2):
    import torch
    prompt = "a large red circle on a white background"
    for _ in range(warmup):  # warm-up (oneDNN primitive creation for these shapes)
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def captions_of(n, seed, split):
    rng = np.random.default_rng(seed)
    caps = []
    while len(caps) < n:
        a = S.sample_attributes(rng)
        if split == "all" or S.is_heldout(a) == (split == "heldout"):
            caps.append(S.caption(a))
    return caps


# ------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dtk.demo.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEMO_DIR), help="directory receiving model/ and classifier/")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (a few steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-stage", type=int, default=1, metavar="K",
                    help=f"run UNet stages K..{len(UNET_STAGES)} on the existing <out>/model (keeping its VAE), "
                    "then evaluate; 1 = build from scratch")
    ap.add_argument("--reuse-classifier", action="store_true",
                    help="keep <out>/classifier if present instead of retraining it (it is still evaluated)")
    ap.add_argument("--pixel", action="store_true",
                    help="build only the class-conditional pixel-space demo (<out>/pixel-model, for tune-sct); "
                    "it is judged by the existing classifier")
    args = ap.parse_args(argv)
    if args.pixel:
        from .pixel import build

        return build(Path(args.out), args.quick, args.seed)

    import torch
    from .classifier import attribute_accuracy

    torch.set_num_threads(2)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    T = {}
    t_all = time.time()

    log("[1/5] classifier")
    t0 = time.time()
    if args.reuse_classifier and (out / "classifier" / "model.safetensors").is_file():
        from .classifier import load_classifier
        clf = load_classifier(path=out / "classifier")
        log("  reusing the existing classifier")
    else:
        clf = train_classifier(cfg, seed + 100, out)
    imgs, caps, _ = S.make_split(cfg["eval_clf"], seed=seed + 10_000, split="heldout")
    clf_acc_heldout, clf_per = attribute_accuracy(clf, to_tensor(imgs), caps)
    imgs, caps, _ = S.make_split(cfg["eval_clf"], seed=seed + 10_001, split="all")
    clf_acc_all, _ = attribute_accuracy(clf, to_tensor(imgs), caps)
    T["classifier"] = time.time() - t0
    log(f"  classifier accuracy: held-out combos {clf_acc_heldout:.4f}, all {clf_acc_all:.4f} {clf_per}")

    extra = {"classifier_accuracy_heldout_procedural": clf_acc_heldout,
             "classifier_accuracy_all_procedural": clf_acc_all}
    model_dir = out / "model"
    tokdir = Path(tempfile.mkdtemp(prefix=".tok."))
    if not 1 <= args.from_stage <= len(UNET_STAGES):
        raise SystemExit(f"--from-stage must be in 1..{len(UNET_STAGES)}")
    if args.from_stage > 1:
        vae, tok, te, unet = load_parts(model_dir, tokdir)
        scaling_factor = vae.config.scaling_factor
    else:
        log("[2/5] VAE")
        t0 = time.time()
        vae = train_vae(cfg, seed + 200)
        imgs, _, _ = S.make_split(min(512, cfg["unet_images"]), seed=seed + 10_002, split="all")
        lat = encode_latents(vae, imgs)
        scaling_factor = float(1.0 / lat.std())
        T["vae"] = time.time() - t0
        log(f"  latent std {lat.std().item():.3f} -> scaling_factor {scaling_factor:.4f}")
        tok, te, unet = build_tokenizer(tokdir), None, None

    log("[3/5] text encoder + UNet")
    t0 = time.time()
    for k in range(args.from_stage, len(UNET_STAGES) + 1):
        stage = UNET_STAGES[k - 1]
        log(f"  stage {k}/{len(UNET_STAGES)}: {stage}")
        if unet is not None:  # continue from the weights as they are saved (fp16)
            unet, te, vae = (m.to(torch.float16).to(torch.float32) for m in (unet, te, vae))
        unet, te = train_unet(cfg, seed + stage["seed"], vae, tok, scaling_factor, unet=unet, te=te,
                              steps=stage["steps"], lr=stage["lr"], warmup=stage["warmup"],
                              noise_offset=stage["noise_offset"], batch=stage.get("batch"))
    T["unet"] = time.time() - t0

    log("[4/5] save pipeline")
    save_pipeline(out, vae, te, tok, unet, scaling_factor)
    shutil.rmtree(tokdir, ignore_errors=True)
    extra["vae_scaling_factor"] = scaling_factor
    return evaluate(cfg, args, out, clf, T, t_all, extra)


def load_parts(model_dir: Path, tokdir: Path):
    """The VAE, tokenizer, text encoder and UNet of an existing build (fp32).

    The tokenizer is copied to ``tokdir`` first: ``model_dir`` is replaced when
    the new pipeline is saved."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    shutil.copytree(model_dir / "tokenizer", tokdir, dirs_exist_ok=True)
    return (AutoencoderKL.from_pretrained(str(model_dir / "vae"), torch_dtype=torch.float32),
            CLIPTokenizer.from_pretrained(str(tokdir)),
            CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(str(model_dir / "unet"), torch_dtype=torch.float32))


def evaluate(cfg, args, out, clf, T, t_all, extra):
    import torch
    from .classifier import attribute_accuracy

    seed = args.seed
    model_dir = out / "model"
    # VAE reconstruction quality, judged by the classifier
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"), torch_dtype=torch.float32)
    imgs, caps, _ = S.make_split(min(256, cfg["unet_images"]), seed=seed + 10_003, split="all")
    with torch.no_grad():
        rec = (vae.decode(vae.encode(to_tensor(imgs) * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    extra["vae_reconstruction_mse"] = float((rec - to_tensor(imgs)).pow(2).mean())
    extra["vae_reconstruction_classifier_accuracy"], _ = attribute_accuracy(clf, rec, caps)
    log(f"  VAE reconstructions: mse {extra['vae_reconstruction_mse']:.5f}, "
        f"classifier accuracy {extra['vae_reconstruction_classifier_accuracy']:.4f}")
    log("[5/5] evaluate")
    t0 = time.time()
    pipe = load_pipeline(model_dir)
    select_caps = captions_of(cfg["eval_select"], seed + 20_000, "train")
    sel = {}
    for gs in cfg["guidances"]:
        acc, _ = attribute_accuracy(clf, generate(pipe, select_caps, gs, seed + 1, cfg["steps"]), select_caps)
        sel[str(gs)] = round(acc, 4)
        log(f"  guidance {gs}: accuracy {acc:.4f} on {len(select_caps)} training captions")
    guidance = float(max(cfg["guidances"], key=lambda g_: sel[str(g_)]))
    held_caps = captions_of(cfg["eval_heldout"], seed + 30_000, "heldout")
    train_caps = captions_of(cfg["eval_train"], seed + 40_000, "train")
    held_imgs = generate(pipe, held_caps, guidance, seed + 2, cfg["steps"])
    acc_held, per_held = attribute_accuracy(clf, held_imgs, held_caps)
    acc_train, per_train = attribute_accuracy(clf, generate(pipe, train_caps, guidance, seed + 3, cfg["steps"]), train_caps)
    if not args.quick:  # a look at the samples, outside the package
        grid_path = Path(tempfile.gettempdir()) / "dtk-demo-heldout-samples.png"
        S.grid((held_imgs[:64].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)).save(grid_path)
        log(f"  held-out samples: {grid_path}")
    sec, times = time_one_image(pipe, guidance, cfg["steps"], cfg["timing_repeats"], cfg["timing_warmup"])
    T["eval"] = time.time() - t0
    size_mb = dir_size_mb(model_dir)
    T["total"] = time.time() - t_all

    metrics = {
        "classifier_accuracy_heldout_procedural": round(extra["classifier_accuracy_heldout_procedural"], 4),
        "classifier_accuracy_all_procedural": round(extra["classifier_accuracy_all_procedural"], 4),
        "classifier_eval_images": cfg["eval_clf"],
        "demo_accuracy_heldout_captions": round(acc_held, 4),
        "demo_accuracy_train_captions": round(acc_train, 4),
        "demo_accuracy_heldout_per_attribute": {k: round(v, 4) for k, v in per_held.items()},
        "demo_accuracy_train_per_attribute": {k: round(v, 4) for k, v in per_train.items()},
        "demo_eval_images": {"heldout": len(held_caps), "train": len(train_caps)},
        "guidance_selection_train_captions": sel,
        "seconds_per_image": round(sec, 3),
        "seconds_per_image_runs": [round(t, 3) for t in times],
        "timing": "StableDiffusionPipeline fp32, batch 1, 25 steps dpm++2m with CFG, 2 CPU threads, after warm-up; median",
        "vae_scaling_factor": round(extra["vae_scaling_factor"], 5),
        "vae_reconstruction_mse": round(extra["vae_reconstruction_mse"], 6),
        "vae_reconstruction_classifier_accuracy": round(extra["vae_reconstruction_classifier_accuracy"], 4),
        "size_mb": round(size_mb, 2),
        "build_seconds": {k: round(v, 1) for k, v in T.items()},
        "quick": bool(args.quick),
    }
    meta = {"kind": "model", "name": "dtk-demo-shapes",
            "description": "Tiny Stable-Diffusion-style pipeline trained on dtk.demo.shapes (64x64)",
            "sampler": {"scheduler": SCHEDULER, "steps": STEPS, "guidance": guidance},
            "metrics": metrics}
    write_json_atomic(model_dir / "dtk.json", meta)

    log("")
    log(f"{'metric':45s} value")
    for k in ("classifier_accuracy_heldout_procedural", "demo_accuracy_heldout_captions",
              "demo_accuracy_train_captions", "seconds_per_image", "size_mb", "vae_scaling_factor"):
        log(f"{k:45s} {metrics[k]}")
    log(f"{'guidance':45s} {guidance}")
    log(f"{'build seconds':45s} {metrics['build_seconds']}")
    return meta




if __name__ == "__main__":
    main()
