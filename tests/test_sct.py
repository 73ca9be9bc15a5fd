"""The EDM view of VP models (dtk.diffusion.edm) and the ECT/SCT objectives (dtk.methods.sct)."""

import json
import shutil

import pytest
import torch
from PIL import Image

from dtk.diffusion.edm import VPDenoiser, consistency_output, sigma_to_t, vp_sigmas
from dtk.diffusion.schedule import alphas_cumprod
from dtk.methods.sct import ect_loss, ect_r, ect_stage, ect_t, ect_weight, stable_point

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def test_sigma_to_t_matches_diffusers():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**SD)
    abar = alphas_cumprod(SD)
    sigmas = torch.tensor([0.001, 0.0292, 0.1, 0.5, 1.0, 3.7, 14.6, 80.0])
    log_sigmas = vp_sigmas(abar).log().numpy()
    ref = torch.from_numpy(sched._sigma_to_t(sigmas.double().numpy(), log_sigmas))
    assert torch.allclose(sigma_to_t(sigmas, abar), ref.float(), atol=1e-3)
    # the table's own σ_t come back as the integer t
    assert torch.allclose(sigma_to_t(vp_sigmas(abar)[[0, 250, 999]], abar), torch.tensor([0.0, 250.0, 999.0]),
                          atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_wrapped_model_reproduces_its_ddim_sample(tiny_sd, tmp_path, prediction_type):
    """Euler steps of D(x, σ) through the DDIM timesteps' σ are DDIM (docs/methods.md): the same final sample."""
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.sampling import Request, SamplerSettings, denoise
    from dtk.diffusion.conditioning import encode_prompts

    path = tmp_path / "m"
    shutil.copytree(tiny_sd, path)
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": prediction_type}))
    model = load_model(resolve_model(str(path)), torch.device("cpu"), torch.float32)
    timesteps = [999, 749, 499, 249, 99]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = denoise(model, SamplerSettings("ddim", 5, 1.0, 16, 16, timesteps), [Request("a", 0), Request("b", 1)],
                   noise=noise)

    abar = alphas_cumprod(model.pipe.scheduler.config)
    sig = vp_sigmas(abar)
    denoiser = VPDenoiser(model.unet, abar, prediction_type)
    cond = encode_prompts(model, ["a", "b"], 16, 16).unet_kwargs()
    levels = [float(sig[t]) for t in timesteps] + [float(sig[0])]   # DDIM ends at ᾱ₀ (set_alpha_to_one false)
    x = noise * (1 + levels[0] ** 2) ** 0.5                          # x_edm = x_vp·√(1+σ²)
    with torch.no_grad():
        for s, s_next in zip(levels, levels[1:]):
            d = denoiser(x, torch.full((2,), s), **cond)
            x = x + (s_next - s) * (x - d) / s
    edm = x / (1 + levels[-1] ** 2) ** 0.5
    assert torch.allclose(edm, ddim, atol=1e-4)


def test_denoiser_boundary_and_consistency_function():
    unet = lambda x, t, return_dict=False: (torch.sin(x) + t.view(-1, 1, 1, 1) / 1000,)  # noqa: E731
    abar = alphas_cumprod(SD)
    x = torch.randn(3, 4, 4, 4)
    for kind in ("epsilon", "v_prediction"):
        d = VPDenoiser(unet, abar, kind)
        assert torch.allclose(d(x, torch.zeros(3)), x, atol=1e-6)  # D(x, 0) = x
    denoised = VPDenoiser(unet, abar, "epsilon")(x, torch.tensor([0.002, 1.0, 80.0]))
    sigma = torch.tensor([0.002, 1.0, 80.0])
    f = consistency_output(denoised, x, sigma, sigma_data=0.5, sigma_min=0.002)
    assert torch.allclose(f[0], x[0], atol=1e-6)                               # f(x, σ_min) = x exactly
    assert torch.allclose(f[2], denoised[2], rtol=1e-3, atol=1e-3)              # far from σ_min: ≈ D
    assert torch.equal(consistency_output(denoised, x, sigma, 0.5, 0.0), denoised)  # training: f = D
    from dtk.errors import BadInput

    with pytest.raises(BadInput, match="prediction_type 'flow' cannot be wrapped"):
        VPDenoiser(unet, abar, "flow")


def test_ect_schedule():
    t = ect_t(torch.linspace(-3, 3, 101))
    assert t.min() > 0
    for stage in range(4):
        r = ect_r(t, stage, q=4.0)
        assert (r >= 0).all() and (r < t).all()
        ratio = (t - r) / t
        keep = r > 0   # where r was not clamped, Δt/t = n(t)/q^(stage+1), n(t) = 1 + 8 sigmoid(−t)
        assert torch.allclose(ratio[keep], ((1 + 8 * torch.sigmoid(-t)) / 4 ** (stage + 1))[keep], atol=1e-6)
    assert [ect_stage(i, 25000) for i in (0, 24999, 25000, 80000)] == [0, 0, 1, 3]
    assert torch.allclose(ect_weight(torch.tensor([2.0]), torch.tensor([1.5]), "inv_dt"), torch.tensor([2.0]))
    assert torch.allclose(ect_weight(torch.tensor([2.0]), torch.tensor([1.5]), "edm"), torch.tensor([4.25]))
    a = torch.zeros(2, 3, 4, 4)
    assert ect_loss(a, a, torch.ones(2), 0.06) == 0
    assert ect_loss(a, a + 0.5, torch.ones(2), 0.0) == pytest.approx(0.5 * 48**0.5)  # c = 0: the L2 norm


def test_stable_target_with_one_reference_is_ects_point():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t, r = torch.full((5,), 2.0), torch.full((5,), 1.2)
    x_t = x0 + t.view(-1, 1, 1, 1) * eps
    for i in range(5):
        x_r, x0_hat = stable_point(x_t[i:i + 1], t[i:i + 1], r[i:i + 1], x0[i:i + 1])
        assert torch.allclose(x0_hat, x0[i:i + 1], atol=1e-6)
        assert torch.allclose(x_r, x0[i:i + 1] + 1.2 * eps[i:i + 1], atol=1e-5)


def test_stable_target_has_lower_variance():
    """Var of the target around E[x_r | x_t] (the posterior over the whole data set) over many noise draws:
    ECT's single-sample x_r vs SCT's with the batch (64) as reference set."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(512, 2, 2, 2, generator=g)          # the data distribution: 512 points
    n, t_val, r_val = 64, 1.0, 0.6
    var_ect, var_sct = [], []
    for _ in range(20):
        idx = torch.randint(0, len(data), (n,), generator=g)
        x0 = data[idx]
        x_t = x0 + t_val * torch.randn(x0.shape, generator=g)
        t, r = torch.full((n,), t_val), torch.full((n,), r_val)
        exact, _ = stable_point(x_t, t, r, data)
        ect = x_t - (t_val - r_val) * (x_t - x0) / t_val
        sct, _ = stable_point(x_t, t, r, x0)
        var_ect.append((ect - exact).pow(2).mean())
        var_sct.append((sct - exact).pow(2).mean())
    v_ect, v_sct = torch.stack(var_ect).mean(), torch.stack(var_sct).mean()
    assert v_sct < 0.7 * v_ect, (float(v_sct), float(v_ect))


def test_stable_target_keeps_to_the_class():
    refs = torch.stack([torch.full((1, 2, 2), -3.0), torch.full((1, 2, 2), 3.0)])
    x_t = torch.full((1, 1, 2, 2), 2.0)
    t, r = torch.tensor([1.0]), torch.tensor([0.0])
    _, free = stable_point(x_t, t, r, refs)
    _, only_first = stable_point(x_t, t, r, refs, same_class=torch.tensor([[True, False]]))
    assert free.mean() > 2.5 and torch.allclose(only_first, refs[:1])


# ------------------------------------------------------------------ dtk tune-sct end to end


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    from dtk.demo.shapes import make_split

    out = tmp_path_factory.mktemp("sct-data") / "images"
    out.mkdir()
    images, _, attrs = make_split(8, seed=4, size=16)
    from dtk.demo.shapes import SHAPES

    for i, (im, a) in enumerate(zip(images, attrs)):
        Image.fromarray(im).save(out / f"{i}.png")
        (out / f"{i}.txt").write_text(str(SHAPES.index(a["shapes"][0]["shape"])))
    return out


def tune(run_dtk, model, data, out, *extra):
    r = run_dtk("tune-sct", "--model", model, "--data", data, "--out", out, "--batch-size", 4, "--log-every", 1,
                "--device", "cpu", "--checkpoint-every", 2, *extra)
    assert r.exit_code == 0, r.stderr
    return r


def test_sct_with_a_bank_resumes_exactly(run_dtk, tiny_pixel_classes, labelled_images, tmp_path):
    from safetensors.torch import load_file

    common = ("--full", "--bank-size", 8, "--double", 2)
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "a", "--max-steps", 4, *common)
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "b", "--max-steps", 2, *common)
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "b", "--max-steps", 4, "--resume", "auto",
         "--overwrite", *common)
    a = load_file(str(tmp_path / "a/checkpoints/step-00000004/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-00000004/trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    bank = torch.load(tmp_path / "b/checkpoints/step-00000004/method.pt", weights_only=True)
    assert bank["bank"].shape == (8, 3, 16, 16) and bank["bank_labels"].shape == (8,)
    stages = [json.loads(x)["stage"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 0, 1, 1]  # --double 2: Δt/t shrinks every 2 iterations


def test_consistency_sampling(run_dtk, tiny_pixel_classes, labelled_images, tmp_path):
    from dtk.diffusion.edm import VPDenoiser, consistency_output
    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import resolve_model
    from dtk.diffusion.sampling import Request, denoise, settings_for

    out = tmp_path / "sct"
    tune(run_dtk, tiny_pixel_classes, labelled_images, out, "--max-steps", 1, "--full", "--target", "ect")
    meta = json.loads((out / "dtk.json").read_text())
    assert meta["sampler"]["scheduler"] == "consistency" and meta["method"]["target"] == "ect"
    model = open_model(resolve_model(str(out)), torch.device("cpu"), torch.float32)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one = denoise(model, settings_for(model), [Request("2", 0)], noise=noise)
    abar = alphas_cumprod(model.pipe.scheduler.config)
    sigma_max = min(80.0, float(vp_sigmas(abar)[-1]))
    s = torch.tensor([sigma_max])
    with torch.no_grad():
        d = VPDenoiser(model.unet, abar, "epsilon")(noise * sigma_max, s, class_labels=torch.tensor([2]))
    assert torch.allclose(one, consistency_output(d, noise * sigma_max, s, 0.5, 0.002), atol=1e-5)
    two = denoise(model, settings_for(model, steps=2), [Request("2", 0)], noise=noise)
    assert not torch.allclose(one, two)
    r = run_dtk("sample", "--model", out, "--class", 1, "--steps", 2, "--out", tmp_path / "s")
    assert r.exit_code == 0 and json.loads(r.stdout)["scheduler"] == "consistency"


def test_guidance_by_an_earlier_snapshot(run_dtk, tiny_pixel_classes, labelled_images, tmp_path):
    """SCT's guidance by a worse model: each denoiser output is D_guide + w(D − D_guide), recorded in dtk.json."""
    from dtk.diffusion.edm import VPDenoiser, consistency_output
    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import resolve_model
    from dtk.diffusion.sampling import Request, denoise, settings_for

    common = ("--full", "--target", "ect")
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "early", "--max-steps", 1, *common)
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "late", "--max-steps", 3, "--guide-with",
         tmp_path / "early", "--guidance", 1.5, *common)
    meta = json.loads((tmp_path / "late/dtk.json").read_text())
    assert meta["sampler"]["guidance"] == 1.5
    assert meta["sampler"]["consistency"]["guide"] == str((tmp_path / "early").resolve())
    model = open_model(resolve_model(str(tmp_path / "late")), torch.device("cpu"), torch.float32)
    assert model.guide is not None
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    guided = denoise(model, settings_for(model), [Request("2", 0)], noise=noise)
    abar = alphas_cumprod(model.pipe.scheduler.config)
    sigma_max = min(80.0, float(vp_sigmas(abar)[-1]))
    s, x, label = torch.tensor([sigma_max]), noise * sigma_max, torch.tensor([2])
    with torch.no_grad():
        good = VPDenoiser(model.unet, abar, "epsilon")(x, s, class_labels=label)
        bad = VPDenoiser(model.guide.unet, abar, "epsilon")(x, s, class_labels=label)
    assert not torch.allclose(good, bad)
    assert torch.allclose(guided, consistency_output(bad + 1.5 * (good - bad), x, s, 0.5, 0.002), atol=1e-5)
    plain = denoise(model, settings_for(model, guidance=1.0), [Request("2", 0)], noise=noise)
    assert torch.allclose(plain, consistency_output(good, x, s, 0.5, 0.002), atol=1e-5)
    r = run_dtk("sample", "--model", tmp_path / "early", "--class", 1, "--guide-with", tmp_path / "late",
                "--guidance", 2, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["guide"] == str(tmp_path / "late")
    r = run_dtk("sample", "--model", tmp_path / "early", "--class", 1, "--guidance", 2, "--out", tmp_path / "s2")
    assert r.exit_code == 2 and "guided by a worse version of itself; name one with --guide-with" in r.stderr
    # the guide the model records serves its consistency sampler; another --scheduler samples without it
    r = run_dtk("sample", "--model", tmp_path / "late", "--class", 1, "--scheduler", "ddim", "--steps", 2,
                "--guidance", 1, "--out", tmp_path / "s3")
    assert r.exit_code == 0 and "guide" not in json.loads(r.stdout), r.stderr


def test_phased_sct_and_text_conditioned_sd(run_dtk, tiny_pixel_classes, tiny_sd, labelled_images, tmp_path):
    tune(run_dtk, tiny_pixel_classes, labelled_images, tmp_path / "k2", "--max-steps", 1, "--phases", 2, "--full")
    meta = json.loads((tmp_path / "k2/dtk.json").read_text())
    assert meta["sampler"]["steps"] == 2 and len(meta["sampler"]["consistency"]["boundaries"]) == 3
    r = run_dtk("sample", "--model", tmp_path / "k2", "--class", 0, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("sample", "--model", tmp_path / "k2", "--class", 0, "--steps", 1, "--out", tmp_path / "s1")
    assert r.exit_code == 2 and "samples with 2 step(s) (one per phase)" in r.stderr
    from dtk.demo.shapes import write_folder

    write_folder(tmp_path / "captioned", 4, seed=0)
    tune(run_dtk, tiny_sd, tmp_path / "captioned", tmp_path / "sd", "--max-steps", 1, "--resolution", 16)
    r = run_dtk("sample", "--model", tmp_path / "sd", "--out", tmp_path / "s2", "a red circle")
    assert r.exit_code == 0, r.stderr


def test_tune_sct_bad_input(run_dtk, tiny_pixel_classes, tiny_pixel, labelled_images, tmp_path):
    def bad(*extra, model=tiny_pixel_classes, data=labelled_images):
        r = run_dtk("tune-sct", "--model", model, "--data", data, "--out", tmp_path / "x", "--max-steps", 1,
                    "--batch-size", 4, *extra)
        assert r.exit_code == 2, r.stderr
        return r.stderr

    assert "--bank-size 2: smaller than the batch (4)" in bad("--bank-size", 2)
    assert "takes no LoRA here: train it with --full" in bad()
    assert "--bank-size goes with --target stable" in bad("--bank-size", 8, "--target", "ect")
    assert "--guidance 2: needs --guide-with" in bad("--full", "--guidance", 2)
    from tiny_models import build_tiny_pixel_pipeline

    # an unconditional model takes a plain folder of images (no captions needed, none asked for)
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for png in sorted(labelled_images.glob("*.png")):
        shutil.copy(png, plain / png.name)
    tune(run_dtk, tiny_pixel, plain, tmp_path / "uncond", "--full", "--max-steps", 1)
    assert "pass --allow-missing-captions" in bad("--full", data=plain)   # a class-conditional one needs labels
    learned_variance = build_tiny_pixel_pipeline(tmp_path / "lv", out_channels=6)
    assert "predicts a learned variance too (6 output channels)" in bad("--full", model=learned_variance)
    assert "guide model " + str(tiny_pixel) + ": its UNet has num_class_embeds None" in bad(
        "--full", "--guide-with", tiny_pixel)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": str(p), "prompt": ""}) + "\n"
                                              for p in sorted(labelled_images.glob("*.png"))))
    assert "class-conditional and some examples have no class label" in bad(data=tmp_path / "m.jsonl")
    flow = tmp_path / "flow"
    shutil.copytree(tiny_pixel, flow)
    cfg_file = flow / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "flow"}))
    assert "prediction_type 'flow' cannot be wrapped" in bad(model=flow)
    gray = tmp_path / "gray"
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(gray))
    assert "examples of shape [3, 16, 16], the model takes [1, 16, 16]" in bad(model=gray)


def test_a_tuned_model_keeps_its_class_names(run_dtk, tiny_pixel_classes, labelled_images, tmp_path):
    named = tmp_path / "named"
    shutil.copytree(tiny_pixel_classes, named)
    (named / "dtk.json").write_text(json.dumps({"kind": "model", "classes": ["circle", "square", "triangle", "star"]}))
    tune(run_dtk, named, labelled_images, tmp_path / "sct", "--max-steps", 1, "--full")
    r = run_dtk("sample", "--model", tmp_path / "sct", "--class", "star", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("sample", "--model", tmp_path / "sct", "--guide-with", named, "--scheduler", "ddim", "--class", 1,
                "--out", tmp_path / "s2")
    assert r.exit_code == 2 and "guides consistency sampling only" in r.stderr


@pytest.mark.slow
def test_two_processes_share_one_reference_set_and_bank(tiny_pixel, labelled_images, tmp_path):
    """SCT's stable target under DDP: the references are the global batch (gathered), so 2 processes × 2 equal
    1 × 4, and the bank is the same on every rank, so a resume is exact."""
    import os
    import subprocess
    import sys

    from conftest import dtk_subprocess

    common = ["tune-sct", "--model", str(tiny_pixel), "--data", str(labelled_images), "--full", "--bank-size", "8",
              "--double", "2", "--p-mean", "1.5", "--p-std", "0.5", "--log-every", "1", "--device", "cpu",
              "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two(out, *extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29533", "-m", "dtk", *common, "--batch-size", "2", "--out", str(out), *extra],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    one = dtk_subprocess(*common, "--batch-size", "4", "--max-steps", "4", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two(tmp_path / "a", "--max-steps", "4")
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    two(tmp_path / "b", "--max-steps", "2")
    two(tmp_path / "b", "--max-steps", "4", "--resume", "auto", "--overwrite")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
