"""dtk dpo: the loss against a hand computation, preference data formats, runs on SD and SDXL, bad input."""

import json
import math

import pytest
import torch
from PIL import Image

from dtk.errors import BadInput
from helpers import solid_png


def write_pairs(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), str(path))
    return path


@pytest.fixture
def preference_pairs(tmp_path):
    rows = [{"caption": f"a red circle {i}", "jpg_0": solid_png((200, 10 * i, 0)), "jpg_1": solid_png((0, 0, 200)),
             "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0][i]} for i in range(6)]
    return write_pairs(tmp_path / "pairs.parquet", rows)


def test_dpo_loss_by_hand():
    from dtk.methods.dpo import dpo_inside, dpo_loss, implicit_accuracy

    mw, ml = torch.tensor([0.30, 0.20]), torch.tensor([0.25, 0.40])
    rw, rl = torch.tensor([0.28, 0.22]), torch.tensor([0.26, 0.35])
    beta = 1000.0
    inside = dpo_inside(mw, ml, rw, rl, beta)
    by_hand = [-0.5 * beta * ((0.30 - 0.25) - (0.28 - 0.26)), -0.5 * beta * ((0.20 - 0.40) - (0.22 - 0.35))]
    assert inside.tolist() == pytest.approx(by_hand)
    loss = dpo_loss(inside)
    assert float(loss) == pytest.approx(sum(math.log1p(math.exp(-x)) for x in by_hand) / 2)
    # the winner's error falling (relative to the reference) makes the inside term positive
    assert by_hand[1] > 0 > by_hand[0] and implicit_accuracy(inside) == 0.5
    # swapping winner and loser negates it; policy = reference gives log 2 and accuracy ½
    assert torch.allclose(dpo_inside(ml, mw, rl, rw, beta), -inside)
    zero = dpo_inside(mw, ml, mw, ml, beta)
    assert float(dpo_loss(zero)) == pytest.approx(math.log(2)) and implicit_accuracy(zero) == 0.5


def test_preference_formats(preference_pairs, tmp_path):
    from dtk.data.preferences import open_preferences

    data = open_preferences(str(preference_pairs), resolution=16)
    assert len(data) == 5 and data.counts == {"ties_dropped": 1}
    first, second = data[0], data[1]
    assert first["image_w"].shape == (3, 16, 16) and first["caption"] == "a red circle 0"
    assert first["image_w"][0].mean() > 0.5 and first["image_l"][2].mean() > 0.5  # label_0 = 1: jpg_0 wins
    assert second["image_w"][2].mean() > 0.5                                     # label_0 = 0: jpg_1 wins
    # a datasets directory (save_to_disk layout: state.json + Arrow stream files)
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = tmp_path / "ds"
    ds.mkdir()
    table = pq.read_table(str(preference_pairs))
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert len(open_preferences(str(ds), resolution=16)) == 5
    # a scored manifest: best vs worst per prompt, ties by --min-margin
    lines = []
    for prompt, scores in (("p1", [0.1, 0.9, 0.5]), ("p2", [0.5, 0.52])):
        for k, s in enumerate(scores):
            f = tmp_path / f"{prompt}-{k}.png"
            Image.new("RGB", (16, 16), (int(255 * s), 0, 0)).save(f)
            lines.append(json.dumps({"path": str(f), "prompt": prompt, "scores": {"shapes": s}}))
    (tmp_path / "scored.jsonl").write_text("\n".join(lines) + "\n")
    scored = open_preferences(str(tmp_path / "scored.jsonl"), resolution=16, min_margin=0.05)
    assert len(scored) == 1 and scored.counts["ties_dropped"] == 1
    assert scored[0]["image_w"][0].mean() > scored[0]["image_l"][0].mean()
    # `dtk score --reward shapes` writes several scores: its continuous confidence ranks by default (the
    # accuracy ties whenever both images are read correctly: a whole demo pipeline of ties)
    both = [json.dumps({**json.loads(x), "scores": {"shapes": 1.0, "shapes/confidence": json.loads(x)["scores"]["shapes"],
                                                    "shapes/color1": 1.0}}) for x in lines]
    (tmp_path / "shapes.jsonl").write_text("\n".join(both) + "\n")
    ranked = open_preferences(str(tmp_path / "shapes.jsonl"), resolution=16)
    assert len(ranked) == 2 and ranked.counts["ties_dropped"] == 0
    with pytest.raises(BadInput, match=r"\(2 tied\); every pair is a tie: rank by a continuous score"):
        open_preferences(str(tmp_path / "shapes.jsonl"), resolution=16, pair_by="shapes")
    (tmp_path / "nan.jsonl").write_text(lines[0] + "\n" + lines[1].replace("0.9", "NaN") + "\n")
    with pytest.raises(BadInput, match="score 'shapes' is nan"):   # NaN would win or lose its prompt at random
        open_preferences(str(tmp_path / "nan.jsonl"), resolution=16)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_dpo_runs_and_resumes(run_dtk, tiny_sd, tiny_sdxl, preference_pairs, tmp_path, family):
    from safetensors.torch import load_file

    model = tiny_sd if family == "sd" else tiny_sdxl
    common = ("--model", model, "--data", preference_pairs, "--batch-size", 2, "--log-every", 1, "--checkpoint-every", 2,
              "--device", "cpu", "--beta", 500)
    r = run_dtk("dpo", *common, "--max-steps", 4, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    metrics = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the LoRA starts at zero: policy = reference
    assert metrics[0]["implicit_acc"] == 0.5
    assert metrics[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    meta = json.loads((tmp_path / "a/dtk.json").read_text())
    assert meta["command"] == "dpo" and meta["data"]["ties_dropped"] == 1
    r = run_dtk("sample", "--model", tmp_path / "a", "--steps", 2, "--out", tmp_path / "s", "a red circle")
    assert r.exit_code == 0, r.stderr
    if family == "sdxl":
        # (resume is checked on SD: the tiny SDXL UNet's first forward pass in a fresh process differs from a
        # warm one by ~1e-7, which β·Adam amplify to ~lr in the weights — float noise, not a resume error)
        return
    run_dtk("dpo", *common, "--max-steps", 2, "--out", tmp_path / "b")
    r = run_dtk("dpo", *common, "--max-steps", 4, "--out", tmp_path / "b", "--resume", "auto", "--overwrite")
    assert r.exit_code == 0, r.stderr
    a = load_file(str(tmp_path / "a/checkpoints/step-00000004/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-00000004/trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dpo_full_and_sft(run_dtk, tiny_sd, preference_pairs, tmp_path):
    common = ("--model", tiny_sd, "--data", preference_pairs, "--batch-size", 2, "--log-every", 1, "--device", "cpu",
              "--max-steps", 2)
    r = run_dtk("dpo", *common, "--full", "--out", tmp_path / "full")
    assert r.exit_code == 0, r.stderr
    first = json.loads((tmp_path / "full/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the frozen copy is the reference
    r = run_dtk("dpo", *common, "--sft", "--out", tmp_path / "sft")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "sft/dtk.json").read_text())["method"]["sft"] is True


@pytest.mark.slow
def test_dpo_bad_input(run_dtk, tiny_sd, tiny_pixel, preference_pairs, tmp_path):
    def bad(data, *extra, model=tiny_sd):
        r = run_dtk("dpo", "--model", model, "--data", data, "--out", tmp_path / "x", "--max-steps", 1,
                    "--device", "cpu", *extra)
        assert r.exit_code == 2, r.stderr
        assert not (tmp_path / "x" / "dtk.json").exists()
        return r.stderr

    rows = [{"caption": "c", "jpg_0": solid_png((255, 0, 0)), "jpg_1": solid_png((0, 0, 255)), "label_0": 0.5}] * 3
    tied = bad(write_pairs(tmp_path / "tied.parquet", rows))
    assert "no usable preference pair (3 tied)" in tied and "--pair-by" in tied   # and what to do about it
    rows = [{"caption": "c", "jpg_0": solid_png((255, 0, 0)), "jpg_1": solid_png((0, 0, 255))}]
    assert "no label_0 column" in bad(write_pairs(tmp_path / "nolabel.parquet", rows))
    rows = [{"caption": "c", "jpg_0": b"not an image", "jpg_1": solid_png((0, 0, 255)), "label_0": 1.0},
            {"caption": "d", "jpg_0": solid_png((255, 0, 0)), "jpg_1": solid_png((0, 0, 255)), "label_0": 1.0}]
    corrupt = write_pairs(tmp_path / "corrupt.parquet", rows)
    err = bad(corrupt, "--strict", "--batch-size", 2)
    assert "corrupt.parquet row 0 (preferred image): not a readable image" in err and "(--strict)" in err
    from dtk.data.preferences import open_preferences

    lazy = open_preferences(str(corrupt), resolution=16)  # without --strict: masked out of the loss, counted
    assert len(lazy) == 2 and lazy[0]["valid"] is False and lazy[1]["valid"] is True
    r = run_dtk("dpo", "--model", tiny_sd, "--data", corrupt, "--out", tmp_path / "y", "--max-steps", 1,
                "--batch-size", 2, "--log-every", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    logged = json.loads((tmp_path / "y/metrics.jsonl").read_text().splitlines()[0])
    assert logged["unreadable"] == 1 and logged["implicit_acc"] == 0.5   # over the one readable pair
    assert {"model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"} <= set(logged)   # the names of every step
    # the unreadable pair counts as 0 over a fixed denominator: the same gradient however the batch is split
    # (over micro-batches here; over processes alike)
    r = run_dtk("dpo", "--model", tiny_sd, "--data", corrupt, "--out", tmp_path / "y2", "--max-steps", 1,
                "--batch-size", 1, "--grad-accum", 2, "--log-every", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    split = json.loads((tmp_path / "y2/metrics.jsonl").read_text().splitlines()[0])
    assert split["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-4)
    assert split["loss"] == pytest.approx(logged["loss"], rel=1e-4)
    assert "trains text-to-image (SD/SDXL) models" in bad(preference_pairs, model=tiny_pixel)
    assert "--beta -1: must be above 0" in bad(preference_pairs, "--beta", -1)
    assert "--beta nan: must be a finite number" in bad(preference_pairs, "--beta", "nan")
    rows = [{"caption": "c", "jpg_0": b"not an image", "jpg_1": solid_png((0, 0, 255)), "label_0": 1.0}] * 2
    assert "none of the first 2 pairs decodes" in bad(write_pairs(tmp_path / "broken.parquet", rows))
    rows = [{"caption": "c", "jpg_0": solid_png((255, 0, 0)), "jpg_1": solid_png((0, 0, 255)), "label_0": float("nan")}]
    assert "is not a preference in [0, 1]" in bad(write_pairs(tmp_path / "nan.parquet", rows))
    r = run_dtk("train-npo", "--self", "--model", tiny_sd, "--data", preference_pairs, "--beta", 2000, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--beta: --from-pairs's, not --self's" in r.stderr
    assert "--min-margin -0.1: must be 0 or more" in bad(preference_pairs, "--min-margin", -0.1)
    assert "no such file" in bad(tmp_path / "missing.parquet")


@pytest.mark.slow
def test_train_npo_and_npo_sampling(run_dtk, tiny_sd, tiny_sdxl, preference_pairs, tmp_path):
    import numpy as np

    common = ("--from-pairs", "--data", preference_pairs, "--batch-size", 2, "--log-every", 1, "--device", "cpu")
    r = run_dtk("train-npo", "--model", tiny_sd, *common, "--max-steps", 1, "--out", tmp_path / "zero")
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "zero" / json.loads((tmp_path / "zero/dtk.json").read_text())["loras"][0]["path"]
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(lora)).items()}, str(lora))  # δ_NPO = 0
    r = run_dtk("train-npo", "--model", tiny_sd, *common, "--max-steps", 3, "--lr", 1e-2, "--out", tmp_path / "npo")
    assert r.exit_code == 0, r.stderr
    meta = json.loads((tmp_path / "npo/dtk.json").read_text())
    assert meta["command"] == "train-npo" and meta["method"]["reversed_preferences"] is True

    def sample(name, *extra):
        r = run_dtk("sample", "--steps", 3, "--guidance", 3, "--num-per-prompt", 2, "--out", tmp_path / f"s-{name}",
                    "--negative-prompt", "a blue square", *extra, "a red circle")
        assert r.exit_code == 0, r.stderr
        return [np.asarray(Image.open(json.loads(x)["path"])) for x in r.stdout.splitlines()]

    plain = sample("plain", "--model", tiny_sd)
    zero = sample("zero", "--model", tiny_sd, "--npo", tmp_path / "zero")
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero))       # δ = 0: plain CFG, bit for bit
    alone = sample("alone", "--npo", tmp_path / "npo")                   # the NPO dir names its base model
    assert not all(np.array_equal(a, b) for a, b in zip(plain, alone))
    scaled = sample("scaled", "--model", tiny_sd, "--npo", tmp_path / "npo", "--npo-scale", 0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, scaled))
    # with a positive LoRA model (a DPO run) on the same base
    r = run_dtk("dpo", "--model", tiny_sd, "--data", preference_pairs, "--batch-size", 2, "--max-steps", 1, "--lr", 1e-2,
                "--device", "cpu", "--out", tmp_path / "dpo")
    assert r.exit_code == 0, r.stderr
    dpo = sample("dpo", "--model", tmp_path / "dpo")
    dpo_npo = sample("dpo-npo", "--model", tmp_path / "dpo", "--npo", tmp_path / "npo")
    assert not all(np.array_equal(a, b) for a, b in zip(dpo, dpo_npo))
    # bad input: another base model, no CFG, --full, not an NPO dir
    r = run_dtk("sample", "--model", tiny_sdxl, "--npo", tmp_path / "npo", "--out", tmp_path / "x", "a")
    assert r.exit_code == 2 and "made for the base model" in r.stderr and str(tiny_sdxl) in r.stderr
    r = run_dtk("sample", "--npo", tmp_path / "npo", "--guidance", 1, "--out", tmp_path / "x", "a")
    assert r.exit_code == 2 and "needs --guidance > 1" in r.stderr
    r = run_dtk("sample", "--npo", tmp_path / "dpo", "--out", tmp_path / "x", "a")
    assert r.exit_code == 2 and "not `dtk train-npo`" in r.stderr
    r = run_dtk("sample", "--npo", tmp_path / "npo", "--scheduler", "consistency", "--steps", 2, "--guidance", 2,
                "--guide-with", tiny_sd, "--out", tmp_path / "x", "a")
    assert r.exit_code == 2 and "no CFG branch for NPO" in r.stderr
    r = run_dtk("train-npo", "--model", tiny_sd, *common, "--full", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "an NPO model is a LoRA" in r.stderr
    shown = run_dtk("train-npo", "--help").stdout   # refused, so not offered; --self's own defaults are shown
    assert "--full" not in shown and "--self: 1e-6" in shown and "--self: 0.999" in shown


@pytest.mark.slow
def test_npo_weights_go_to_the_negative_branch_only(run_dtk, tiny_sd, preference_pairs, tmp_path):
    """Each UNet call of NPO sampling: the negative prompt's with the NPO adapter at --npo-scale, the prompt's
    at 0. And an NPO trained on a LoRA model dir (a DPO run) brings its own LoRA, not that model's."""
    import numpy as np

    from dtk.diffusion.conditioning import encode_prompts
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.npo import ADAPTER, attach_npo
    from dtk.diffusion.sampling import Request, denoise, settings_for

    common = ("--data", preference_pairs, "--batch-size", 2, "--max-steps", 1, "--lr", 1e-2, "--device", "cpu")
    assert run_dtk("dpo", "--model", tiny_sd, *common, "--out", tmp_path / "dpo").exit_code == 0
    r = run_dtk("train-npo", "--from-pairs", "--model", tmp_path / "dpo", *common, "--out", tmp_path / "npo")
    assert r.exit_code == 0, r.stderr

    model = load_model(resolve_model(str(tmp_path / "dpo")), torch.device("cpu"), torch.float32)
    attach_npo(model, str(tmp_path / "npo"), 0.7)
    lora_layer = next(m for m in model.unet.modules() if ADAPTER in getattr(m, "scaling", {}))
    calls = []
    model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs["encoder_hidden_states"].clone(),
                                              lora_layer.scaling[ADAPTER])), with_kwargs=True)
    settings = settings_for(model, scheduler="ddim", steps=2, guidance=3.0, height=32, width=32)
    denoise(model, settings, [Request("a red circle", 1, negative_prompt="a blue square")])
    neg = encode_prompts(model, ["a blue square"], 32, 32).unet_kwargs()["encoder_hidden_states"]
    pos = encode_prompts(model, ["a red circle"], 32, 32).unet_kwargs()["encoder_hidden_states"]
    alpha_over_rank = lora_layer.lora_alpha[ADAPTER] / lora_layer.r[ADAPTER]
    assert len(calls) == 4
    for i, (embedding, scale) in enumerate(calls):
        want = (neg, 0.7 * alpha_over_rank) if i % 2 == 0 else (pos, 0.0)
        assert torch.equal(embedding, want[0]) and scale == pytest.approx(want[1])

    from safetensors.torch import load_file, save_file

    lora = tmp_path / "npo" / json.loads((tmp_path / "npo/dtk.json").read_text())["loras"][0]["path"]
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(lora)).items()}, str(lora))  # δ_NPO = 0

    def sample(name, *extra):
        r = run_dtk("sample", "--model", tmp_path / "dpo", "--steps", 3, "--guidance", 3, "--out",
                    tmp_path / f"s-{name}", *extra, "a red circle")
        assert r.exit_code == 0, r.stderr
        return [np.asarray(Image.open(json.loads(x)["path"])) for x in r.stdout.splitlines()]

    # δ_NPO = 0 on top of the DPO model: plain CFG of that model (loading DPO's LoRA again would not be)
    assert all(np.array_equal(a, b) for a, b in zip(sample("dpo"), sample("zero", "--npo", tmp_path / "npo")))


def sd_denoiser(net, prediction_type="epsilon", **schedule):
    from dtk.diffusion.denoiser import Denoiser, VPSchedule
    from dtk.diffusion.schedule import alphas_cumprod

    abar = alphas_cumprod({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                           "beta_end": 0.012, **schedule})
    return Denoiser(net, VPSchedule(abar), prediction_type)


class FakeUNet:
    """ε̂ = 0.3·x + mean of the prompt embedding (so the two branches differ), per example."""

    def __call__(self, x, t, return_dict=False, encoder_hidden_states=None):
        return (0.3 * x + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1),)


def test_self_npo_teacher_target():
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Guided
    from dtk.diffusion.schedule import timestep_grid
    from dtk.methods.self_npo import teacher_target

    unet = FakeUNet()
    run = sd_denoiser(unet)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    cond = Conditioning(torch.full((2, 3, 5), 0.5))
    uncond = Conditioning(torch.full((2, 3, 5), -0.2))
    t_index = torch.tensor([3, 10])
    grid = torch.tensor(timestep_grid(25))
    assert grid[:3].tolist() == [999, 959, 919] and len(grid) == 25
    # zero steps, w = 0: the teacher's plain conditional denoising of x_t
    x, t_p, x0 = teacher_target(Guided(run, 0.0, "lcm"), x_t, t_index, cond, uncond, 0)
    a, s = run.alpha_sigma(grid[t_index])
    assert torch.equal(x, x_t) and torch.equal(t_p, grid[t_index])
    assert torch.allclose(x0, (x_t - s * unet(x_t, None, encoder_hidden_states=cond.embeds)[0]) / a, atol=1e-6)
    # w = −1: the unconditional prediction alone; two steps = two guided DDIM jumps down the grid
    x, t_p, x0 = teacher_target(Guided(run, -1.0, "lcm"), x_t, t_index, cond, uncond, 2)
    ref = x_t
    for k in range(2):
        eps = unet(ref, None, encoder_hidden_states=uncond.embeds)[0]
        (a0, s0), (a1, s1) = run.alpha_sigma(grid[t_index + k]), run.alpha_sigma(grid[t_index + k + 1])
        ref = a1 * (ref / a0 + (s1 / a1 - s0 / a0) * eps)   # DDIM in its (x/α, λ = σ/α) form
    assert torch.allclose(x, ref, atol=1e-5) and torch.equal(t_p, grid[t_index + 2])

    # a zero-terminal-SNR v-prediction teacher from t = 999 (ᾱ = 0): finite, nothing divides by α_999
    run = sd_denoiser(unet, "v_prediction", rescale_betas_zero_snr=True)
    assert float(run.schedule.abar[999]) == 0.0
    x, _, x0 = teacher_target(Guided(run, -1.0, "lcm"), x_t, torch.tensor([0, 0]), cond, uncond, 2)
    assert torch.isfinite(x).all() and torch.isfinite(x0).all()


def test_self_npo_prompt_list_is_read_like_sample_prompts(tmp_path):
    from dtk.methods.self_npo import PromptList

    f = tmp_path / "prompts.txt"
    f.write_text("# shapes, one per line\na red circle\n\n  # indented comment\na blue star\n")
    assert PromptList(str(f)).prompts == ["a red circle", "a blue star"]
    f.write_bytes(b"a red circle\n\xff\xfe\n")
    with pytest.raises(BadInput, match=r"--data .*prompts.txt: not UTF-8"):
        PromptList(str(f))


@pytest.mark.slow
def test_self_npo_runs(run_dtk, tiny_sd, tmp_path):
    from safetensors.torch import load_file

    from dtk.demo.shapes import write_folder

    write_folder(tmp_path / "images", 6, seed=0)
    common = ("--self", "--model", tiny_sd, "--batch-size", 2, "--log-every", 1, "--device", "cpu",
              "--checkpoint-every", 2, "--lr", 1e-3, "--resolution", 32)
    r = run_dtk("train-npo", *common, "--data", tmp_path / "images", "--max-steps", 4, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    meta = json.loads((tmp_path / "a/dtk.json").read_text())
    assert meta["method"]["teacher_guidance"] == -1.0 and meta["args"]["ema_decay"] == 0.999
    assert meta["method"]["negative"] == "student"   # what the public Self-NPO code saves
    assert meta["method"]["empty_prompt_prob"] == 0.0  # --self's own default (from pairs: 0.2)
    # every caption empty: the teacher's guidance has nothing to act on, so w = −1 and w = −5 train alike
    for w in (-1, -5):
        r = run_dtk("train-npo", *common, "--data", tmp_path / "images", "--max-steps", 2, "--empty-prompt-prob", 1,
                    "--teacher-guidance", w, "--out", tmp_path / f"empty{w}")
        assert r.exit_code == 0, r.stderr
    e1, e5 = (load_file(str(tmp_path / f"empty{w}/pytorch_lora_weights.safetensors")) for w in (-1, -5))
    assert all(torch.equal(e1[k], e5[k]) for k in e1)
    run_dtk("train-npo", *common, "--data", tmp_path / "images", "--max-steps", 2, "--out", tmp_path / "b")
    r = run_dtk("train-npo", *common, "--data", tmp_path / "images", "--max-steps", 4, "--out", tmp_path / "b",
                "--resume", "auto", "--overwrite")
    assert r.exit_code == 0, r.stderr
    a = load_file(str(tmp_path / "a/checkpoints/step-00000004/ema.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-00000004/ema.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the exported LoRA is the student's weights, not its EMA's
    exported = load_file(str(tmp_path / "a/pytorch_lora_weights.safetensors"))
    student = load_file(str(tmp_path / "a/checkpoints/step-00000004/trainable.safetensors"))
    key = next(k for k in student if "lora_B" in k)
    out_key = "unet." + key.replace(".default.", ".")
    assert torch.equal(exported[out_key], student[key]) and not torch.allclose(exported[out_key], a[key])
    r = run_dtk("sample", "--npo", tmp_path / "a", "--steps", 2, "--out", tmp_path / "s", "a red circle")
    assert r.exit_code == 0, r.stderr
    # a prompt list: the model's own samples are the images; the EMA teacher as the negative model
    (tmp_path / "prompts.txt").write_text("a red circle\na blue star\n")
    r = run_dtk("train-npo", *common, "--data", tmp_path / "prompts.txt", "--max-steps", 1, "--negative", "ema",
                "--out", tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "p/dtk.json").read_text())["data"]["examples"] == 2
    assert (tmp_path / "p/prompt-samples.safetensors").is_file()  # made once, read back on resume
    r = run_dtk("train-npo", *common, "--data", tmp_path / "images", "--ema-decay", 0, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "the EMA of the student" in r.stderr
    r = run_dtk("train-npo", *common, "--data", tmp_path / "images", "--empty-prompt-prob", 2, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--empty-prompt-prob 2.0: must be in [0, 1]" in r.stderr
    r = run_dtk("train-npo", "--model", tiny_sd, "--data", tmp_path / "images", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "choose one of --from-pairs" in r.stderr


@pytest.mark.slow
def test_npo_on_sdxl(run_dtk, tiny_sdxl, preference_pairs, tmp_path):
    from dtk.demo.shapes import write_folder

    write_folder(tmp_path / "images", 4, seed=0)
    common = ("--model", tiny_sdxl, "--batch-size", 2, "--max-steps", 1, "--device", "cpu", "--lr", 1e-2)
    r = run_dtk("train-npo", "--from-pairs", "--data", preference_pairs, *common, "--out", tmp_path / "npo")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("train-npo", "--self", "--data", tmp_path / "images", "--resolution", 32, *common,
                "--out", tmp_path / "self")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "self/dtk.json").read_text())["method"]["teacher_guidance"] == -5.0
    for npo in ("npo", "self"):
        r = run_dtk("sample", "--npo", tmp_path / npo, "--steps", 2, "--guidance", 3, "--out", tmp_path / f"s-{npo}",
                    "a red circle")
        assert r.exit_code == 0, r.stderr


@pytest.mark.slow
def test_the_readme_dpo_pipeline_runs_as_written(tmp_path, monkeypatch):
    """`dtk sample ... --num-per-prompt 4 | dtk score --pairs-out pairs.parquet`, then `dtk dpo`: the default
    reward ranked every pair a tie, and dpo found no usable pair."""
    import pyarrow.parquet as pq

    from conftest import dtk_subprocess

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("# two demo captions\na large red circle on a white background\n"
                                          "a small blue star at the top on a black background\n")
    s = dtk_subprocess("sample", "--prompts", "prompts.txt", "--num-per-prompt", "4", "--steps", "8", "--out", "s")
    assert s.returncode == 0, s.stderr
    p = dtk_subprocess("score", "--pairs-out", "pairs.parquet", input=s.stdout)
    assert p.returncode == 0, p.stderr
    labels = pq.read_table(tmp_path / "pairs.parquet").column("label_0").to_pylist()
    assert len(labels) == 12 and labels.count(0.5) < len(labels)
    d = dtk_subprocess("dpo", "--data", "pairs.parquet", "--out", "runs/dpo", "--max-steps", "1", "--beta", "2500",
                       "--device", "cpu")
    assert d.returncode == 0, d.stderr
