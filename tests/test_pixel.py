"""Pixel-space UNet2DModel pipelines (diffusers' DDPM layout): loading and dtk sample, unconditional and by class."""

import json

import numpy as np
import torch
from PIL import Image


def test_unconditional_pixel_model_samples_like_diffusers(run_dtk, tiny_pixel, tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler

    r = run_dtk("sample", "--model", tiny_pixel, "--scheduler", "ddim-trailing", "--steps", 5, "--num-per-prompt", 2,
                "--out", tmp_path / "s", "--seed", 3)
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["guidance"] == 1.0 and recs[0]["width"] == 16
    ours = np.stack([np.asarray(Image.open(x["path"])) for x in recs])
    pipe = DDIMPipeline.from_pretrained(str(tiny_pixel))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ref = pipe(batch_size=2, num_inference_steps=5, eta=0.0, output_type="np",
               generator=[torch.Generator().manual_seed(x["seed"]) for x in recs]).images
    assert np.abs(ours.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_class_conditional_pixel_model(run_dtk, tiny_pixel_classes, tmp_path):
    r = run_dtk("sample", "--model", tiny_pixel_classes, "--class", 0, "--class", 3, "--steps", 3, "--out",
                tmp_path / "s", "--seed", 1)
    assert r.exit_code == 0, r.stderr
    a, b = [np.asarray(Image.open(json.loads(x)["path"])) for x in r.stdout.splitlines()]
    assert a.shape == (16, 16, 3) and not np.array_equal(a, b)
    for bad, msg in ((("--class", 7), "class '7' unknown (classes: 0..3)"), ((), "no prompts"),
                     (("--class", 1, "--guidance", 3), "no unconditional branch")):
        r = run_dtk("sample", "--model", tiny_pixel_classes, *bad, "--out", tmp_path / "x")
        assert r.exit_code == 2 and msg in r.stderr, r.stderr


def test_unconditional_pixel_model_takes_no_class(run_dtk, tiny_pixel, tmp_path):
    r = run_dtk("sample", "--model", tiny_pixel, "--class", 1, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "takes no prompt or class" in r.stderr
