import pytest
"""Tests of the bundled demo (dtk.demo): shapes data, classifier, tiny pipeline, build script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dtk.demo import CLASSIFIER_DIR, DEMO_DIR, DEMO_MODEL_DIR
from dtk.demo import shapes as S

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ shapes
def test_demo_package_does_not_import_torch():
    code = "import sys, dtk.demo, dtk.demo.shapes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_shapes_deterministic():
    a_img, a_cap, a_attr = S.make_split(16, seed=123, split="all")
    b_img, b_cap, b_attr = S.make_split(16, seed=123, split="all")
    assert a_img.shape == (16, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_attr == b_attr
    c_img, _, _ = S.make_split(16, seed=124, split="all")
    assert not np.array_equal(a_img, c_img)


def test_render_size_and_jitter():
    attrs = S.parse_caption("a large red circle on a white background")
    assert S.render(attrs).size == (64, 64)
    assert S.render(attrs, size=32).size == (32, 32)
    img = np.asarray(S.render(attrs))
    assert tuple(img[0, 0]) == S.RGB["white"] and tuple(img[32, 32]) == S.RGB["red"]
    j1 = np.asarray(S.render(attrs, rng=np.random.default_rng(1)))
    j2 = np.asarray(S.render(attrs, rng=np.random.default_rng(2)))
    assert not np.array_equal(j1, j2)


def test_caption_parse_round_trip():
    rng = np.random.default_rng(0)
    n_two = 0
    for _ in range(3000):
        attrs = S.sample_attributes(rng)
        n_two += len(attrs["shapes"]) == 2
        assert all(s["color"] != attrs["background"] for s in attrs["shapes"])
        assert S.parse_caption(S.caption(attrs)) == attrs
    assert 0.1 < n_two / 3000 < 0.3


def test_caption_grammar_examples():
    one = S.parse_caption("a large red circle on a white background")
    assert one == {"background": "white", "shapes": [
        {"shape": "circle", "color": "red", "size": "large", "position": "center"}]}
    top = S.parse_caption("a small blue star at the top on a black background")
    assert top["shapes"][0]["position"] == "top"
    two = S.parse_caption("a small red circle and a large yellow square on a gray background")
    assert [s["position"] for s in two["shapes"]] == ["left", "right"]
    for bad in ["", "a red circle", "a large red circle on a red background",
                "a huge red circle on a white background", "a large red circle on a white background!"]:
        assert S.parse_caption(bad) is None


def test_heldout_split_disjoint():
    _, train_caps, _ = S.make_split(300, seed=5, split="train")
    _, held_caps, _ = S.make_split(100, seed=6, split="heldout")
    assert not any(S.is_heldout(c) for c in train_caps)
    assert all(S.is_heldout(c) for c in held_caps)
    assert not set(train_caps) & set(held_caps)
    # ~10% of all single-shape combinations are held out
    combos = [{"background": bg, "shapes": [{"shape": sh, "color": c, "size": sz, "position": p}]}
              for bg in S.BACKGROUNDS for sh in S.SHAPES for c in S.COLORS for sz in S.SIZES
              for p in S.POSITIONS if c != bg]
    frac = sum(S.is_heldout(a) for a in combos) / len(combos)
    assert 0.06 < frac < 0.14


# ------------------------------------------------------------------ classifier
def test_classifier_accuracy_on_fresh_heldout_images():
    import torch
    from dtk.demo.classifier import attribute_accuracy, features, images_to_tensor, load_classifier, predict

    torch.set_num_threads(2)
    assert (CLASSIFIER_DIR / "model.safetensors").is_file() and (CLASSIFIER_DIR / "config.json").is_file()
    model = load_classifier()
    images, caps, attrs = S.make_split(300, seed=987_654, split="heldout")
    x = images_to_tensor(images)
    acc, per = attribute_accuracy(model, x, caps)
    assert acc >= 0.98, per
    preds = predict(model, x[:4])
    assert preds[0] == S.flat_attributes(attrs[0]) or acc < 1.0
    assert set(preds[0]) == set(S.LABELS)
    f = features(model, x[:5])
    assert f.ndim == 2 and f.shape[0] == 5
    # any square size is accepted (resized to 64 internally)
    big = torch.nn.functional.interpolate(x[:8], size=(128, 128), mode="nearest")
    acc_big, _ = attribute_accuracy(model, big, caps[:8])
    assert acc_big >= 0.9


# ------------------------------------------------------------------ pipeline
def test_model_size_under_30mb():
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 30e6


def test_model_layout_and_dtk_json():
    index = json.loads((DEMO_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEMO_MODEL_DIR / sub).is_dir()
    sched = json.loads((DEMO_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000 and sched["beta_schedule"] == "scaled_linear"
    assert sched["beta_start"] == 0.00085 and sched["beta_end"] == 0.012
    meta = json.loads((DEMO_MODEL_DIR / "dtk.json").read_text())
    assert meta["kind"] == "model" and meta["name"] == "dtk-demo-shapes"
    assert meta["sampler"]["steps"] == 25 and meta["sampler"]["guidance"] > 1
    assert meta["metrics"]["quick"] is False


def test_tokenizer_round_trip():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(DEMO_MODEL_DIR / "tokenizer"))
    for w in S.vocabulary():
        assert len(tok.tokenize(w)) == 1, w
    rng = np.random.default_rng(3)
    for _ in range(50):
        cap = S.caption(S.sample_attributes(rng))
        ids = tok(cap).input_ids
        assert len(ids) <= tok.model_max_length
        assert tok.decode(ids, skip_special_tokens=True) == cap


def test_pipeline_loads_offline_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL_DIR), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    out = pipe("a large red circle on a white background", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)


# ------------------------------------------------------------------ build
@pytest.mark.slow
def test_build_quick(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "dtk.demo.build", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "model" / "dtk.json").read_text())
    assert meta["metrics"]["quick"] is True
    assert (tmp_path / "classifier" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "unet").is_dir()
    assert DEMO_DIR.is_dir()


@pytest.mark.slow
def test_build_pixel_quick(tmp_path):
    """The pixel demo build writes a loadable class-conditional DDPM pipeline whose dtk.json names its classes."""
    from dtk.demo.pixel import CLASSES, class_split

    images, labels = class_split(8, seed=0)
    assert images.shape == (8, 32, 32, 3) and set(labels.tolist()) <= set(range(len(CLASSES)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "dtk.demo.build", "--pixel", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "pixel-model" / "dtk.json").read_text())
    assert meta["quick"] is True and meta["classes"] == CLASSES
    m = meta["metrics"]
    assert 0.0 <= m["shape_accuracy_ddim50"] <= 1.0
    # the better of the EMA and the final weights is shipped (the EMA on a tie)
    assert m["shape_accuracy_ddim50"] == max(m["shape_accuracy_ddim50_ema"], m["shape_accuracy_ddim50_final"])
    assert m["weights"] == ("ema" if m["shape_accuracy_ddim50_ema"] >= m["shape_accuracy_ddim50_final"] else "final")
    r = subprocess.run([sys.executable, "-m", "dtk", "sample", "--model", str(tmp_path / "pixel-model"), "--class",
                        "star", "--steps", "2", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["prompt"] == "star"


def test_shipped_pixel_demo_loads_and_samples(run_dtk, tmp_path):
    from dtk.demo.pixel import CLASSES
    from dtk.diffusion.loading import resolve_model

    ref = resolve_model("demo-pixel")
    assert ref.family == "pixel" and ref.manifest["classes"] == CLASSES
    r = run_dtk("sample", "--model", "demo-pixel", "--class", "star", "--steps", 2, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["width"] == 32
