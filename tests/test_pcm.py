"""dtk distill-pcm: PCM's discretisation and objective against closed forms and diffusers, LCM, the
adversarial loss, exact resume on SD and SDXL, exports and sampling."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from dtk.diffusion.denoiser import Denoiser, VPSchedule
from dtk.diffusion.schedule import alphas_cumprod
from dtk.methods.lcm import boundary_scalings
from dtk.methods.pcm import (ddim_grid, edge_jump, edge_of, lcm_guided, phase_edges, phase_top_indices,
                             sampling_timesteps)
from dtk.methods.pcm_adversarial import DiscriminatorHeads, hinge_d_loss, hinge_g_loss

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def schedule_run(prediction_type="epsilon", schedule=SD_SCHEDULE, net=None):
    """A denoiser of the SD schedule over ``net``, for the schedule maths."""
    return Denoiser(net, VPSchedule(alphas_cumprod(schedule)), prediction_type)


class NoCond:
    """Conditioning for networks that read none."""

    @staticmethod
    def cat(parts):
        return NoCond()

    def unet_kwargs(self):
        return {}


def test_phase_edges_and_sampling_timesteps():
    assert ddim_grid(50)[:2] == [19, 39] and ddim_grid(50)[-1] == 999
    assert phase_edges(50, 4) == [0, 239, 499, 739]
    assert phase_edges(40, 4) == [0, 249, 499, 749]
    assert phase_edges(50, 1) == [0]
    grid = torch.tensor(ddim_grid(50))
    edges = edge_of(torch.arange(50), 50, 4)
    assert set(edges.tolist()) == {0, 239, 499, 739}
    assert (edges < grid).all() and (edges[grid > 739] == 739).all() and (edges[grid <= 239] == 0).all()
    assert sampling_timesteps(50, 4, 4) == [999, 739, 499, 239]
    assert sampling_timesteps(50, 4, 2) == [999, 499] and sampling_timesteps(50, 4, 1) == [999]
    eight = sampling_timesteps(50, 4, 8)
    assert len(eight) == 8 and set([999, 739, 499, 239]) <= set(eight) and eight == sorted(eight, reverse=True)
    # every sampling timestep of a phase jumps to that phase's edge: 4 steps end exactly on the edges
    tops = torch.tensor([(t + 1) // 20 - 1 for t in sampling_timesteps(50, 4, 4)])
    assert edge_of(tops, 50, 4).tolist() == [739, 499, 239, 0]


def test_phase_tops_are_the_sampling_timesteps():
    """--adv-at phase-tops judges the student where K-step sampling starts each phase."""
    grid = ddim_grid(50)
    for k in (1, 2, 4):
        rng = SimpleNamespace(randint=lambda lo, hi: torch.arange(lo, hi))
        tops = phase_top_indices(rng, 50, k)   # the fake rng draws every phase once, in order
        assert sorted((grid[i] for i in tops.tolist()), reverse=True) == sampling_timesteps(50, k, k)
        assert edge_of(tops, 50, k).tolist() == phase_edges(50, k)


def test_judging_timesteps_stay_within_the_span():
    from dtk.methods.pcm_adversarial import judging_timesteps

    rng = SimpleNamespace(rand=lambda: torch.tensor([0.0, 0.5, 0.9999, 0.9999]))
    s = torch.tensor([0, 0, 0, 739])
    assert judging_timesteps(rng, s, 250).tolist() == [0, 125, 249, 988]
    assert judging_timesteps(rng, s, 1000).tolist() == [0, 500, 999, 999]   # K = 1, the paper: the whole ODE


def test_sdxl_pairs_keep_their_size_conditioning():
    """Reflow pairs made at another size than --resolution carry their time ids: student, teacher and target
    are all conditioned on them (both CFG branches)."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.methods.pcm import draw_on_grid
    from dtk.train.state import PerExample

    from dtk.methods.common import with_pair_sizes

    def encode_prompts(captions):
        return Conditioning(torch.zeros(len(captions), 3, 8), torch.zeros(len(captions), 8),
                            torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * len(captions)))

    sizes = torch.tensor([[512.0, 768, 0, 0, 512, 768]] * 2)
    batch = {"latent": torch.randn(2, 4, 8, 8), "caption": ["a", "b"], "time_ids": sizes}
    d = draw_on_grid(schedule_run().schedule, batch["latent"], batch["caption"],
                     lambda c: with_pair_sizes(batch, encode_prompts(c)), PerExample([1, 2], "cpu"), 50, (1.0, 1.0),
                     True, 0.0)
    assert torch.equal(d.cond.time_ids, sizes) and torch.equal(d.uncond.time_ids, sizes)


def test_judging_phase_tops_leaves_the_consistency_loss_alone():
    """The second (phase-top) draw rides in the same student forward: the consistency loss, its draw and its
    target are those of the plain step for the same random state; the judged half sits at the phase tops."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.methods.pcm import pcm_loss
    from dtk.train.state import PerExample

    def unet(x, t, return_dict=False):   # any per-example function of (x, t)
        return (0.3 * x + torch.sin(t.float() / 100).view(-1, 1, 1, 1),)

    def loss(**more):
        net = schedule_run(net=unet)
        x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        return pcm_loss(net, net, net, x0, ["a", "b", "c"], lambda captions: Conditioning(None),
                        PerExample([7, 8, 9], "cpu"), **kw, **more)

    kw = dict(n=50, k=4, w_range=(1.0, 1.0), cfg_solver=True, empty_prompt_prob=0.0, loss="huber", huber_c=0.001)
    plain, (student, target, s, _, _) = loss()
    both, (top_student, top_target, top_s, _, _) = loss(judge_phase_tops=True, judged_target=False)
    assert torch.allclose(plain, both, rtol=1e-6) and top_target is None
    assert set(top_s.tolist()) <= set(phase_edges(50, 4)) and top_student.shape == student.shape
    _, (_, with_target, _, _, _) = loss(judge_phase_tops=True)
    assert with_target is not None and with_target.shape == top_student.shape


def test_edge_jump_boundary_and_teacher_step_against_diffusers():
    from diffusers import DDIMScheduler

    run = schedule_run()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    s = torch.tensor([0, 239, 739])
    for kind in ("epsilon", "v_prediction", "sample"):   # F(x_s, s, s) = x_s, whatever the model predicts
        assert torch.allclose(edge_jump(*schedule_run(kind).to_x0_eps(eps, x, s), run.schedule, s), x, atol=1e-5), kind
    # a jump to the edge is the DDIM step there: α_s x̂₀ + σ_s ε̂ with x̂₀ = (x_t − σ_t ε̂)/α_t
    t = torch.tensor([999, 499, 759])
    (a_t, s_t), (a_s, s_s) = run.alpha_sigma(t), run.alpha_sigma(s)
    assert torch.allclose(edge_jump(*run.to_x0_eps(eps, x, t), run.schedule, s), a_s * (x - s_t * eps) / a_t + s_s * eps,
                          atol=1e-5)

    # the teacher's step t → t − 20 equals diffusers' DDIM step (η = 0) on the guided ε
    eps_c, eps_u = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)

    def teacher(x_in, t_in, return_dict=False):
        return (torch.cat([eps_u, eps_c]),)  # rows: unconditional, then conditional

    w = torch.tensor([4.0, 4.5, 0.0])
    t = torch.tensor([999, 999, 999])
    ours = lcm_guided(run.using(teacher), w).ddim_step(x, t, t - 20, NoCond(), NoCond())
    sched = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(50)
    for i in range(3):
        guided = eps_c[i:i + 1] + w[i] * (eps_c[i:i + 1] - eps_u[i:i + 1])
        ref = sched.step(guided, 999, x[i:i + 1], eta=0.0).prev_sample
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-5)


def test_zero_terminal_snr_v_prediction_stays_finite():
    """With rescaled zero-terminal-SNR betas ᾱ_999 = 0: x̂₀ = −v there, and nothing divides by α_999."""
    run = schedule_run("v_prediction", {**SD_SCHEDULE, "rescale_betas_zero_snr": True})
    assert float(run.schedule.abar[999]) == 0.0
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t, s = torch.tensor([999, 999]), torch.tensor([0, 499])
    x0, eps = run.to_x0_eps(v_c, x, t)
    assert torch.equal(x0, -v_c) and torch.allclose(edge_jump(x0, eps, run.schedule, s), x0 * run.alpha_sigma(s)[0] +
                                                    x * run.alpha_sigma(s)[1], atol=1e-6)

    def teacher(x_in, t_in, return_dict=False):
        return (torch.cat([v_u, v_c]),)

    stepped = lcm_guided(run.using(teacher), torch.tensor([1.0, 0.0])).ddim_step(x, t, t - 20, NoCond(), NoCond())
    assert torch.isfinite(stepped).all()


def test_lcm_recommends_four_steps_where_its_grid_has_them():

    from dtk.methods.lcm import LatentConsistency

    for n, steps, timesteps in ((50, 4, [999, 759, 499, 259]), (2, 2, [999, 499])):
        sampler = LatentConsistency(ddim_steps=n).sampler(None)
        assert (sampler["steps"], sampler["timesteps"]) == (steps, timesteps)


def test_lcm_boundary_scalings_match_diffusers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(**SD_SCHEDULE)
    for t in (0, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-6) and float(c_out) == pytest.approx(ref_out, rel=1e-6)
    assert boundary_scalings(torch.tensor([0])) == (1.0, 0.0)


def test_discriminator_hinge_loss_falls_on_separable_inputs():
    torch.manual_seed(0)
    heads = DiscriminatorHeads([8, 16])
    two_features = [torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 2, 2)]
    assert len(heads(two_features)) == 8 and len(DiscriminatorHeads([8, 16], 1)(two_features)) == 2
    real = [torch.randn(6, 8, 4, 4) + 2, torch.randn(6, 16, 2, 2) + 2]
    fake = [torch.randn(6, 8, 4, 4) - 2, torch.randn(6, 16, 2, 2) - 2]
    undecided = [torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 2, 2)]
    assert hinge_d_loss(undecided, undecided) == 2.0 and hinge_g_loss(undecided) == 1.0
    assert hinge_g_loss([torch.full((3, 1, 2, 2), 5.0)]) == 0.0  # no reward past the margin
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2, betas=(0.0, 0.999))
    losses = []
    for _ in range(60):
        loss = hinge_d_loss(heads(real), heads(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(r.mean() > 0 > f.mean() for r, f in zip(heads(real), heads(fake)))  # real up, fake down


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from dtk.demo.shapes import write_folder

    out = tmp_path_factory.mktemp("pcm-data") / "images"
    write_folder(out, 6, seed=2)
    return out


def distill(run_dtk, model, data, out, *extra):
    r = run_dtk("distill-pcm", "--teacher", model, "--data", data, "--out", out, "--resolution", 16, "--batch-size", 2,
                "--lora-rank", 4, "--ddim-steps", 20, "--log-every", 1, "--device", "cpu", *extra)
    assert r.exit_code in (0, 75), r.stderr
    return r


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_adversarial_pcm_resumes_exactly(run_dtk, family, tiny_sd, tiny_sdxl, images, tmp_path):
    """Student, EMA and the discriminator (state in the checkpoint) continue as if never stopped."""
    model = tiny_sd if family == "sd" else tiny_sdxl
    common = ("--adversarial", "--adv-lr", "1e-3", "--checkpoint-every", 2, "--ema-decay", 0.9)
    distill(run_dtk, model, images, tmp_path / "a", "--max-steps", 4, *common)
    distill(run_dtk, model, images, tmp_path / "b", "--max-steps", 2, *common)
    distill(run_dtk, model, images, tmp_path / "b", "--max-steps", 4, "--resume", "auto", "--overwrite", *common)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a/checkpoints/step-00000004/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-00000004/trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    r = run_dtk("distill-pcm", "--teacher", model, "--data", images, "--out", tmp_path / "b", "--resolution", 16,
                "--batch-size", 2, "--lora-rank", 4, "--ddim-steps", 20, "--max-steps", 6, "--resume", "auto",
                "--overwrite", "--checkpoint-every", 2, "--ema-decay", 0.9)   # now without --adversarial
    assert r.exit_code == 2 and ("other method than this run (adv_at=draw, adv_heads=4, adv_lr=0.001, "
                                 "adv_real=target, adv_span=250, adv_weight=0.1, adversarial=True)") in r.stderr
    la = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert {"consistency_loss", "g_loss", "d_loss"} <= set(la[0])
    assert [x["d_loss"] for x in la] == pytest.approx([x["d_loss"] for x in lb], rel=1e-5)
    if family == "sd":
        # bit for bit; with SDXL the pooled text embedding differs in the 7th digit with the batch
        # it was encoded in, and Adam with β1 = 0 turns that into lr-sized steps of near-zero gradients
        da = torch.load(tmp_path / "a/checkpoints/step-00000004/method.pt", weights_only=True)
        db = torch.load(tmp_path / "b/checkpoints/step-00000004/method.pt", weights_only=True)
        assert all(torch.allclose(da["heads"][k], db["heads"][k], atol=1e-6) for k in da["heads"])


@pytest.mark.slow
def test_resume_refuses_a_discriminator_of_another_shape(run_dtk, tiny_sd, images, tmp_path):
    from dtk.train.checkpoint import load_checkpoint

    common = ("--adversarial", "--checkpoint-every", 2)
    distill(run_dtk, tiny_sd, images, tmp_path / "a", "--max-steps", 2, *common)
    ckpt = tmp_path / "a/checkpoints/step-00000002"

    def resume():
        r = run_dtk("distill-pcm", "--teacher", tiny_sd, "--data", images, "--out", tmp_path / "a", "--resolution",
                    16, "--batch-size", 2, "--lora-rank", 4, "--ddim-steps", 20, "--device", "cpu", "--max-steps", 4,
                    "--resume", "auto", "--overwrite", *common)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    state = torch.load(ckpt / "method.pt", weights_only=True)
    state["heads"] = {k: v for k, v in state["heads"].items() if ".3." not in k}   # a layout with fewer heads
    torch.save(state, ckpt / "method.pt")
    assert "discriminator heads do not fit" in resume()
    # a checkpoint of the dtk before --adv-heads and --adv-span: those settings are not recorded
    state_file = next(p for p in ckpt.iterdir() if p.name.startswith("state"))
    saved = json.loads(state_file.read_text())
    for key in ("adv_heads", "adv_span"):
        del saved["config"]["method"][key]
    state_file.write_text(json.dumps(saved))
    assert load_checkpoint(ckpt)["state"]["config"]["method"].get("adv_heads") is None
    assert "made by an earlier dtk, which did not record adv_heads, adv_span" in resume()


@pytest.mark.slow
def test_discriminator_sees_every_micro_batch(run_dtk, tiny_sd, images, tmp_path):
    """Batch 2 in one micro-step and batch 1 over two (--grad-accum 2) train the same discriminator: its step
    takes every micro-batch the student saw, not only the last one."""
    common = ("--adversarial", "--adv-lr", "1e-3", "--max-steps", 3)
    distill(run_dtk, tiny_sd, images, tmp_path / "a", "--batch-size", 2, *common)
    distill(run_dtk, tiny_sd, images, tmp_path / "b", "--batch-size", 1, "--grad-accum", 2, *common)
    la, lb = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab")
    assert len(la) == len(lb) == 3
    assert [x["d_loss"] for x in la] == pytest.approx([x["d_loss"] for x in lb], rel=1e-4)
    assert [x["consistency_loss"] for x in la] == pytest.approx([x["consistency_loss"] for x in lb], rel=1e-4)


@pytest.mark.slow
def test_pcm_sampling_uses_the_phase_tops_and_kohya_export_matches_diffusers(run_dtk, tiny_sd, images, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import resolve_model
    from dtk.diffusion.sampling import Request, denoise, settings_for

    out = tmp_path / "pcm"
    distill(run_dtk, tiny_sd, images, out, "--max-steps", 2, "--lr", "3e-2", "--lora-alpha", 1,
            "--export-format", "kohya")
    meta = json.loads((out / "dtk.json").read_text())
    assert meta["sampler"]["timesteps"] == [999, 749, 499, 249] and meta["sampler"]["guidance"] == 1.0
    assert meta["method"]["edges"] == [0, 249, 499, 749]
    r = run_dtk("sample", "--model", out, "--out", tmp_path / "s", "x")
    assert json.loads(r.stdout)["timesteps"] == [999, 749, 499, 249]
    r = run_dtk("sample", "--model", out, "--steps", 2, "--out", tmp_path / "s2", "x")
    assert json.loads(r.stdout)["timesteps"] == [999, 499]

    # the kohya file in diffusers (alpha 1, rank 4: scale 1/4, not 1) gives dtk's latents
    model = open_model(resolve_model(str(out)), torch.device("cpu"), torch.float32)
    settings = settings_for(model)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = denoise(model, settings, [Request("a red circle", 0)], noise=noise)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(out / "lora-kohya.safetensors"))
    # diffusers' DDIM takes no explicit timesteps; for N=20, K=4 the phase tops are its trailing 4-step grid
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ref = pipe("a red circle", latents=noise, num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert torch.allclose(ours, ref, atol=1e-4)
    base = denoise(open_model(resolve_model(str(tiny_sd)), torch.device("cpu"), torch.float32), settings,
                   [Request("a red circle", 0)], noise=noise)
    assert (ours - base).abs().max() > 1e-3


def test_lcm_and_normal_cfg_variants(run_dtk, tiny_sd, images, tmp_path):
    distill(run_dtk, tiny_sd, images, tmp_path / "lcm", "--max-steps", 1, "--method", "lcm")
    meta = json.loads((tmp_path / "lcm/dtk.json").read_text())
    sampler = meta["sampler"]
    assert (sampler["scheduler"], sampler["timesteps"], sampler["guidance"]) == ("lcm", [999, 749, 499, 249], 1.0)
    assert meta["method"]["phases"] == 1
    r = run_dtk("sample", "--model", tmp_path / "lcm", "--out", tmp_path / "s", "x")
    assert r.exit_code == 0 and json.loads(r.stdout)["scheduler"] == "lcm"
    assert json.loads(r.stdout)["timesteps"] == [999, 749, 499, 249]  # LCM's multistep, on the trained grid
    distill(run_dtk, tiny_sd, images, tmp_path / "normal", "--max-steps", 1, "--no-cfg-solver")
    meta = json.loads((tmp_path / "normal/dtk.json").read_text())
    assert meta["method"]["cfg_solver"] is False and meta["method"]["empty_prompt_prob"] == 0.1
    assert meta["sampler"]["guidance"] == 7.5  # the teacher's: CFG still does its work


def test_sdxl_teacher_defaults_to_the_sdxl_grid(run_dtk, tiny_sdxl, images, tmp_path):
    r = run_dtk("distill-pcm", "--teacher", tiny_sdxl, "--data", images, "--out", tmp_path / "x", "--resolution", 16,
                "--batch-size", 1, "--lora-rank", 4, "--max-steps", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    meta = json.loads((tmp_path / "x/dtk.json").read_text())
    assert meta["method"]["ddim_steps"] == 40 and meta["method"]["edges"] == [0, 249, 499, 749]
    assert meta["method"]["cfg_range_lcm_w"] == [6.0, 7.0] and meta["sampler"]["timesteps"] == [999, 749, 499, 249]


@pytest.mark.slow
def test_distill_from_reflow_pairs(run_dtk, tiny_sd, tmp_path):
    r = run_dtk("reflow-pairs", "--model", tiny_sd, "--out", tmp_path / "p", "--steps", 2, "a", "b")
    assert r.exit_code == 0, r.stderr
    distill(run_dtk, tiny_sd, tmp_path / "p", tmp_path / "pcm", "--max-steps", 1)
    assert json.loads((tmp_path / "pcm/dtk.json").read_text())["data"]["format"] == "reflow-pairs"
    # the teacher's own samples as the discriminator's real side, judging the 1-step jump from t = 999
    distill(run_dtk, tiny_sd, tmp_path / "p", tmp_path / "adv", "--max-steps", 2, "--phases", 1, "--adversarial",
            "--adv-real", "data", "--adv-at", "phase-tops", "--adv-lr", "1e-2", "--adv-span", 250, "--adv-heads", 1)
    meta = json.loads((tmp_path / "adv/dtk.json").read_text())
    assert [meta["method"][k] for k in ("adversarial", "adv_real", "adv_at", "adv_span", "adv_heads")] == [
        True, "data", "phase-tops", 250, 1]
    logged = [json.loads(x) for x in (tmp_path / "adv/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["d_loss"]) for x in logged) and logged[-1]["d_loss"] != logged[0]["d_loss"]


def test_bad_input(run_dtk, tiny_sd, images, tmp_path):
    def bad(*extra, data=images, model=tiny_sd):
        r = run_dtk("distill-pcm", "--teacher", model, "--data", data, "--out", tmp_path / "x", "--max-steps", 1,
                    "--resolution", 16, *extra)
        assert r.exit_code == 2, r.stderr
        assert not (tmp_path / "x" / "dtk.json").exists()
        return r.stderr

    assert "--phases 30: must be between 1 and --ddim-steps/2 = 25" in bad("--phases", 30)
    assert "--phases 0: must be between 1" in bad("--phases", 0)
    assert "--empty-prompt-prob 2.0: must be in [0, 1]" in bad("--empty-prompt-prob", 2)
    assert "--ddim-steps 30: must divide 1000" in bad("--ddim-steps", 30)
    assert "--cfg-range 5,4: the minimum is above the maximum" in bad("--cfg-range", "5,4")
    assert "expected W_MIN,W_MAX" in bad("--cfg-range", "5")
    assert "--adversarial is PCM's" in bad("--method", "lcm", "--adversarial")
    assert "add --adversarial" in bad("--adv-at", "phase-tops")
    assert "add --adversarial" in bad("--adv-span", 100)
    assert "add --adversarial" in bad("--adv-heads", 1)
    assert "--adv-heads 0: must be 1 or more" in bad("--adversarial", "--adv-heads", 0)
    assert "--adv-span 300: must be between 1 and 1000/--phases = 250" in bad("--adversarial", "--adv-span", 300)
    flow = tmp_path / "flow-model"
    shutil.copytree(tiny_sd, flow)
    cfg = json.loads((flow / "scheduler/scheduler_config.json").read_text())
    (flow / "scheduler/scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    assert "prediction_type 'flow' is not supported" in bad(model=flow)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(images.glob("*.png"))[:2]:
        shutil.copy(f, bare / f.name)
    assert "--allow-missing-captions" in bad(data=bare)
    assert "no captions at all" in bad("--allow-missing-captions", data=bare)


def test_the_discriminators_update_runs_in_the_engine_with_a_nan_guard(tmp_path):
    """The second player's step: accumulated over the recorded micro-batches, stepped once; a NaN loss stops
    the run before its weights change."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from dtk.errors import RunFailure
    from dtk.train.config import TrainConfig
    from dtk.train.engine import _second_player_step

    class Player:
        max_grad_norm, log_name = float("inf"), "d_loss"

        def __init__(self, values):
            self.module = torch.nn.Linear(1, 1)
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
            self.items = values

        def take(self):
            items, self.items = self.items, []
            return items

        def loss(self, item):
            return self.module(torch.ones(1, 1)).sum() * item

    run = SimpleNamespace(accelerator=Accelerator(cpu=True), config=TrainConfig(out=str(tmp_path)))
    logged = []
    metrics = SimpleNamespace(add=logged.append)
    player = Player([1.0, 3.0])
    before = player.module.weight.detach().clone()
    out = float(player.module(torch.ones(1, 1)).detach())   # w + b
    _second_player_step(run, player, metrics, 0)
    # the losses (w + b)·1 and (w + b)·3, averaged: d/dw = 2, one SGD step of 0.1; logged: their mean
    assert torch.allclose(player.module.weight, before - 0.2) and logged[0]["d_loss"] == pytest.approx(2 * out)
    player.items = [float("nan")]
    before = player.module.weight.detach().clone()
    with pytest.raises(RunFailure, match="second player's d_loss is nan"):
        _second_player_step(run, player, metrics, 1)
    assert torch.equal(player.module.weight, before)
