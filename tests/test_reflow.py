"""dtk reflow-pairs and dtk train-reflow: pair shards, the objectives' closed forms, end to end on SD and SDXL."""

import json
import time

import pytest
import torch

from dtk.diffusion.schedule import ddim_step
from dtk.methods.reflow import line_through, paired_noising, phase_bounds, pseudo_huber


def make_pairs(run_dtk, model, out, *extra, prompts=("a red circle", "a blue square", "a green star")):
    r = run_dtk("reflow-pairs", "--model", model, "--out", out, "--steps", 3, *extra, *prompts)
    assert r.exit_code == 0, r.stderr
    return r, [json.loads(x) for x in r.stdout.splitlines()]


def test_sharded_pairs_equal_unsharded_byte_for_byte(run_dtk, tiny_sd, tmp_path):
    _, whole = make_pairs(run_dtk, tiny_sd, tmp_path / "one", "--num", 8, "--pairs-per-shard", 3)
    assert [w["pairs"] for w in whole] == [3, 3, 2]
    for i in range(2):
        make_pairs(run_dtk, tiny_sd, tmp_path / "two", "--num", 8, "--pairs-per-shard", 3, "--shard", f"{i}/2")
    names = sorted(p.name for p in (tmp_path / "one").glob("pairs-*"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("pairs-*"))
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()
    assert (tmp_path / "two" / "dtk.shard-00001-of-00002.json").exists()


def test_stored_latent_is_the_teachers_ode_from_the_stored_noise(run_dtk, tiny_sd, tmp_path):
    """Checked against diffusers' own pipeline with DPM-Solver (order 2), the same noise and guidance."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    make_pairs(run_dtk, tiny_sd, tmp_path / "p", "--num", 2, "--guidance", 5, prompts=("a red circle",))
    with safe_open(str(tmp_path / "p" / "pairs-000000.safetensors"), "pt") as f:
        noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
        info = json.loads(f.metadata()["dtk.pairs"])
    assert info["prompts"] == ["a red circle"] * 2
    # the tiny model's config says "leading" spacing (as SD1.5's does); pairs start at the top anyway
    assert info["settings"]["timesteps"] == [999, 666, 332]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min",
        timestep_spacing="trailing")
    ref = pipe(["a red circle"] * 2, latents=noise, num_inference_steps=3, guidance_scale=5.0,
               output_type="latent").images
    assert torch.allclose(latent, ref, atol=1e-5)
    assert not torch.allclose(noise[0], noise[1])  # each pair has its own noise


def test_rerun_skips_finished_shards_and_rejects_other_settings(run_dtk, tiny_sd, tmp_path):
    out = tmp_path / "p"
    make_pairs(run_dtk, tiny_sd, out, "--num", 6, "--pairs-per-shard", 3)
    first = out / "pairs-000000.safetensors"
    stamp = first.stat().st_mtime_ns
    (out / "pairs-000001.safetensors").unlink()  # as if that shard's job was preempted
    time.sleep(0.01)
    r, lines = make_pairs(run_dtk, tiny_sd, out, "--num", 6, "--pairs-per-shard", 3)
    assert "1 of 2 shard(s) already finished, skipped" in r.stderr
    assert first.stat().st_mtime_ns == stamp and (out / "pairs-000001.safetensors").exists()
    assert len(lines) == 2
    r = run_dtk("reflow-pairs", "--model", tiny_sd, "--out", out, "--steps", 4, "--num", 6, "--pairs-per-shard", 3,
                "a red circle", "a blue square", "a green star")
    assert r.exit_code == 2 and "other settings (steps, timesteps)" in r.stderr and "--overwrite" in r.stderr
    r = run_dtk("reflow-pairs", "--model", tiny_sd, "--out", out, "--steps", 4, "--num", 6, "--pairs-per-shard", 3,
                "--overwrite", "a red circle", "a blue square", "a green star")
    assert r.exit_code == 0 and first.stat().st_mtime_ns != stamp
    # a smaller run over it leaves no shard of the old one behind: the folder is one run's pairs
    r = run_dtk("reflow-pairs", "--model", tiny_sd, "--out", out, "--steps", 4, "--num", 3, "--pairs-per-shard", 3,
                "--overwrite", "a red circle", "a blue square", "a green star")
    assert r.exit_code == 0 and sorted(p.name for p in out.iterdir()) == ["dtk.json", "pairs-000000.safetensors"]
    from dtk.data.pairs import PairDataset

    assert len(PairDataset(out)) == 3


def test_bad_pair_data(run_dtk, tiny_sd, tiny_sdxl, tmp_path):
    out = tmp_path / "p"
    make_pairs(run_dtk, tiny_sd, out, "--num", 6, "--pairs-per-shard", 2)
    train = ("train-reflow", "--model", tiny_sd, "--out", tmp_path / "run", "--max-steps", 1, "--device", "cpu")
    # pairs from another model: the family and latent size differ, or the same family with other weights
    r = run_dtk("train-reflow", "--model", tiny_sdxl, "--data", out, "--out", tmp_path / "x", "--max-steps", 1)
    assert r.exit_code == 2 and "pairs from an sd model, --model is sdxl" in r.stderr
    r = run_dtk(*train, "--data", out, "--resolution", 32)
    assert r.exit_code == 2 and "pairs of latent shape [4, 8, 8] (16x16 px)" in r.stderr and "needs [4, 16, 16]" in r.stderr
    from tiny_models import build_tiny_pipeline

    other = build_tiny_pipeline("tiny-sd", tmp_path / "other-sd", seed=1)
    r = run_dtk("train-reflow", "--model", other, "--data", out, "--out", tmp_path / "y", "--max-steps", 1)
    assert r.exit_code == 2 and "made by another model" in r.stderr and "--allow-other-teacher" in r.stderr
    # a truncated shard, then a missing one
    shard = out / "pairs-000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = run_dtk(*train, "--data", out)
    assert r.exit_code == 2 and "pairs-000001.safetensors: not a readable pair shard" in r.stderr
    shard.unlink()
    r = run_dtk(*train, "--data", out)
    assert r.exit_code == 2 and "1 of 3 pair shards missing" in r.stderr and "rerun dtk reflow-pairs" in r.stderr
    # images where pairs are needed, and options out of range
    img = tmp_path / "img"
    from dtk.demo.shapes import write_folder

    write_folder(img, 2, seed=0)
    r = run_dtk(*train, "--data", img)
    assert r.exit_code == 2 and "needs pairs" in r.stderr
    for bad, msg in ((("--phased", 3), "--phased 3: must divide"), (("--empty-prompt-prob", 2), "must be in [0, 1]"),
                     (("--lora-rank", 0), "--lora-rank 0")):
        r = run_dtk(*train, "--data", img, *bad)
        assert r.exit_code == 2 and msg in r.stderr, r.stderr
    assert not (tmp_path / "run" / "dtk.json").exists()


# ------------------------------------------------------------------ the objectives


def test_phase_bounds_and_ddim_lines_closed_forms():
    assert phase_bounds(4) == ([249, 499, 749, 999], [0, 249, 499, 749])
    assert phase_bounds(1) == ([999], [0])
    assert phase_bounds(2) == ([499, 999], [0, 499])
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    a = lambda v: torch.tensor(v).view(1, 1, 1, 1)  # noqa: E731
    (a_s, s_s), (a_e, s_e), (a_t, s_t) = (a(0.3), a(0.954)), (a(0.8), a(0.6)), (a(0.5), a(0.866))
    x_s, x_e = paired_noising(x0, z, a_s, s_s), paired_noising(x0, z, a_e, s_e)
    # two points of one DDIM path give back that path's x₀ and noise
    x0_line, z_line = line_through(x_s, a_s, s_s, x_e, a_e, s_e)
    assert torch.allclose(x0_line, x0, atol=1e-5) and torch.allclose(z_line, z, atol=1e-5)
    # a curved teacher path: the straight (x/α, λ) line through x_s and the teacher's x_e, whose noise is
    # ε* = (x_e/α_e − x_s/α_s)/(λ_e − λ_s), λ = σ/α, passes through both ends and through x_τ
    x_e_teacher = x_e + 0.1 * torch.randn(x_e.shape, generator=g)
    x0_star, eps_star = line_through(x_s, a_s, s_s, x_e_teacher, a_e, s_e)
    assert torch.allclose(eps_star, (x_e_teacher / a_e - x_s / a_s) / (s_e / a_e - s_s / a_s), atol=1e-5)
    assert torch.allclose(ddim_step(x0_star, eps_star, a_s, s_s), x_s, atol=1e-5)
    assert torch.allclose(ddim_step(x0_star, eps_star, a_e, s_e), x_e_teacher, atol=1e-5)
    x_tau = ddim_step(x0_star, eps_star, a_t, s_t)
    assert torch.allclose(x_tau / a_t, x_s / a_s + (s_t / a_t - s_s / a_s) * eps_star, atol=1e-4)
    # from pure noise (α_s = 0, zero terminal SNR): still finite, and still through both ends
    x0_star, eps_star = line_through(z, a(0.0), a(1.0), x_e_teacher, a_e, s_e)
    assert torch.allclose(eps_star, z, atol=1e-5) and torch.allclose(ddim_step(x0_star, eps_star, a_e, s_e),
                                                                    x_e_teacher, atol=1e-5)
    assert pseudo_huber(x_e, x_e, 0.001) == 0
    assert pseudo_huber(torch.zeros(3), torch.full((3,), 2.0), 0.001) == pytest.approx(2.0, abs=1e-3)


class Oracle(torch.nn.Module):
    """A UNet that knows the data: every pair's latent is ``c``, so ε = (x_t − α_t c)/σ_t exactly."""

    def __init__(self, c, abar, config, bias=0.0):
        super().__init__()
        self.c, self.abar, self.config, self.bias = c, abar, config, bias
        self.dtype = torch.float32

    def forward(self, x, t, return_dict=False, **kwargs):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        return ((x - a.sqrt() * self.c) / (1 - a).sqrt() + self.bias,)


def test_pair_loss_is_zero_when_the_model_fits_the_pairs(tiny_sd, tmp_path):

    from dtk.diffusion.conditioning import encode_prompts
    from dtk.diffusion.denoiser import Denoiser, VPSchedule
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.schedule import alphas_cumprod
    from dtk.methods.reflow import pair_loss
    from dtk.train.state import PerExample

    model = load_model(resolve_model(str(tiny_sd)), torch.device("cpu"), torch.float32)
    abar = alphas_cumprod(model.pipe.scheduler.config)
    c = torch.randn(4, 2, 2)
    batch = {"latent": c.expand(6, 4, 2, 2), "noise": torch.randn(6, 4, 2, 2), "caption": ["a"] * 6}
    losses = []
    for bias in (0.0, 0.01):
        student = Denoiser(Oracle(c, abar, model.unet.config, bias), VPSchedule(abar), "epsilon")
        losses.append(float(pair_loss(student, batch["latent"], batch["noise"], batch["caption"],
                                      lambda captions: encode_prompts(model, captions, 16, 16),
                                      PerExample(range(6), "cpu"), huber_c=0.001, empty_prompt_prob=0.1)))
    assert losses[0] < 1e-5 < 1e-3 < losses[1]


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pairs_then_training_then_sampling(run_dtk, family, tiny_sd, tiny_sdxl, tmp_path):
    model = tiny_sd if family == "sd" else tiny_sdxl
    make_pairs(run_dtk, model, tmp_path / "p", "--num", 4, "--solver", "ddim")
    r = run_dtk("train-reflow", "--model", model, "--data", tmp_path / "p", "--out", tmp_path / "run",
                "--max-steps", 2, "--batch-size", 2, "--lora-rank", 4, "--beta-schedule", "linear", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert line["steps"] == 2 and line["examples_seen"] == 4 and line["out"] == str(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "dtk.json").read_text())
    assert meta["sampler"]["schedule"] == {"beta_schedule": "linear"}
    assert meta["data"]["format"] == "reflow-pairs" and meta["method"]["variant"] == "pairs"
    r = run_dtk("sample", "--model", tmp_path / "run", "--out", tmp_path / "s", "a red circle")
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["scheduler"] == "ddim-trailing" and rec["steps"] == 2 and rec["guidance"] == 1.5

    from dtk.diffusion.loading import load_model, resolve_model

    loaded = load_model(resolve_model(str(tmp_path / "run")), torch.device("cpu"), torch.float32)
    assert loaded.pipe.scheduler.config["beta_schedule"] == "linear"


@pytest.mark.slow
@pytest.mark.parametrize("family,full", [("sd", False), ("sd", True), ("sdxl", False)])
def test_phased_variant_on_images(run_dtk, family, full, tiny_sd, tiny_sdxl, tmp_path):
    from dtk.demo.shapes import write_folder

    write_folder(tmp_path / "img", 4, seed=0)
    model = tiny_sd if family == "sd" else tiny_sdxl
    r = run_dtk("train-reflow", "--model", model, "--data", tmp_path / "img", "--phased", 4, "--out", tmp_path / "run",
                "--max-steps", 2, "--batch-size", 2, "--lora-rank", 4, "--resolution", 16, *(["--full"] if full else []),
                "--validate-every", 2)
    assert r.exit_code == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "dtk.json").read_text())
    assert meta["sampler"] == {"scheduler": "ddim-trailing", "steps": 4, "guidance": 1.5}
    assert meta["method"]["variant"] == "phased, K=4" and meta["method"]["teacher_guidance"] == (7.5 if family == "sdxl" else 3.0)
    assert (tmp_path / "run" / "validation" / "step-00000002.png").exists()
    r = run_dtk("sample", "--model", tmp_path / "run", "--out", tmp_path / "s", "a red circle")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 4


def test_phased_teacher_is_the_frozen_base_model(tiny_sd, tmp_path):
    """With LoRA the teacher is the UNet with its adapter off: after training it still equals the base model."""

    from dtk.diffusion.denoiser import AdapterOff
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.train.config import TrainConfig
    from dtk.train.setup import add_trainable

    cfg = TrainConfig(out=str(tmp_path), lora_rank=4)
    model = load_model(resolve_model(str(tiny_sd)), torch.device("cpu"), torch.float32)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = torch.randn(1, 77, 32)
    base = model.unet(x, t, cond).sample
    named = add_trainable(model.unet, cfg)
    with torch.no_grad():
        for _, p in named:
            p.add_(0.1)
    assert not torch.allclose(model.unet(x, t, cond).sample, base, atol=1e-4)
    assert torch.allclose(AdapterOff(model.unet)(x, t, cond).sample, base, atol=1e-6)
    assert not torch.allclose(model.unet(x, t, cond).sample, base, atol=1e-4)  # the adapter is back on
