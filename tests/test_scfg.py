"""S-CFG (dtk.diffusion.scfg): the capture leaves the UNet alone, the rule reduces to CFG, the renormalisation
equalises the regions, and `dtk sample --guidance-rule scfg` runs (and refuses what it cannot guide)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dtk.diffusion import scfg as S


def unet_inputs(model, batch=2, size=None, seed=0):
    from dtk.diffusion.conditioning import Conditioning, encode_prompts

    side = size or model.default_size
    g = torch.Generator().manual_seed(seed)
    f = model.vae_scale_factor
    x = torch.randn(2 * batch, model.unet.config.in_channels, side // f, side // f, generator=g)
    prompts = ["a large red circle on a white background", "a small blue star at the top"][:batch]
    cond = Conditioning.cat([encode_prompts(model, [""] * batch, side, side), encode_prompts(model, prompts, side, side)])
    return x, torch.tensor(500), cond


def load(spec):
    from dtk.diffusion.loading import load_model, resolve_model

    return load_model(resolve_model(str(spec) if spec else None), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("which", ["tiny_sd", "demo"])
def test_capture_leaves_the_unet_output_unchanged(which, request):
    model = load(request.getfixturevalue("tiny_sd") if which == "tiny_sd" else None)
    x, t, cond = unet_inputs(model)
    with torch.no_grad():
        plain = model.unet(x, t, return_dict=False, **cond.unet_kwargs())[0]
        recorder = S.AttentionRecorder(model.unet)
        before = [(a1.processor, a2.processor) for _, a1, a2, _ in recorder.blocks]
        with recorder.recording(tuple(x.shape[-2:])) as maps:
            captured = model.unet(x, t, return_dict=False, **cond.unet_kwargs())[0]
        after = [(a1.processor, a2.processor) for _, a1, a2, _ in recorder.blocks]
    assert torch.equal(plain, captured)
    assert before == after   # the module's own processors are back
    assert maps.layers == len(recorder.blocks) > 0
    if which == "demo":   # 16×16 latents: the blocks at 1/4 (down 2, mid, up 0), as SD1.5's 16×16 at 512²
        assert {lv for *_, lv in recorder.blocks} == {2} and len(recorder.blocks) == 4
        assert maps.tokens.shape == (2, model.pipe.tokenizer.model_max_length, 4, 4)


def test_captured_probabilities_are_the_attention_the_module_computes():
    """head_mean_probs is softmax(q kᵀ·scale) of the module's own projections, as diffusers' classic
    AttnProcessor computes it head by head, averaged over heads; rows sum to 1."""
    model = load(None)
    x, t, cond = unet_inputs(model)
    _, attn1, attn2, _ = S.AttentionRecorder(model.unet).blocks[0]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, n=n: seen.setdefault(n, (args, kw)), with_kwargs=True)
             for n, m in (("self", attn1), ("cross", attn2))]
    with torch.no_grad():
        model.unet(x, t, return_dict=False, **cond.unet_kwargs())
        for h in hooks:
            h.remove()
        for kind, attn in (("self", attn1), ("cross", attn2)):
            args, kw = seen[kind]
            hidden = args[0] if args else kw["hidden_states"]
            enc = kw.get("encoder_hidden_states")
            ours = S.head_mean_probs(attn, hidden, enc)
            q = attn.head_to_batch_dim(attn.to_q(hidden))
            k = attn.head_to_batch_dim(attn.to_k(hidden if enc is None else enc))
            ref = attn.get_attention_scores(q, k).view(hidden.shape[0], attn.heads, q.shape[1], k.shape[1]).mean(1)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours[..., 0]))


def test_recorder_and_the_plain_function_agree():
    """The recorder folds each layer in as it comes; scfg_scales on the same raw maps gives the same M."""
    model = load(None)
    x, t, cond = unet_inputs(model)
    recorder = S.AttentionRecorder(model.unet)
    raw = {"cross": [], "self": [], "sizes": []}
    record = recorder.record

    def keep(block, kind, probs):
        if kind == "self":
            raw["self"].append(probs)
        else:
            raw["cross"].append(probs)
            raw["sizes"].append(S.grid_at(recorder.latent, recorder.levels[block]))
        record(block, kind, probs)
    recorder.record = keep
    with torch.no_grad(), recorder.recording(tuple(x.shape[-2:])) as maps:
        out_u, out_c = model.unet(x, t, return_dict=False, **cond.unet_kwargs())[0].chunk(2)
    delta = out_c - out_u
    m = maps.scales(delta, 3.0)
    assert m.shape == (2, 1, 16, 16)
    torch.testing.assert_close(m, S.scfg_scales(raw["cross"], raw["self"], delta, sizes=raw["sizes"], guidance=3.0))
    assert float(m.min()) >= 0.8 - 1e-6 and float(m.max()) <= 3.0 + 1e-6 and float(m.std()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_uniform_map_is_plain_cfg_exactly(dtype):
    from dtk.diffusion.denoiser import cfg

    g = torch.Generator().manual_seed(0)
    u, c = (torch.randn(3, 4, 8, 8, generator=g).to(dtype) for _ in range(2))
    for scale in (7.5, 2.3, 3.0):
        assert torch.equal(S.scfg(u, c, scale, torch.ones(3, 1, 8, 8)), cfg(u, c, scale))


def test_renormalisation_makes_every_regions_guidance_the_foregrounds():
    """Closed form: regions with ‖δ‖ = 1, 3 and 0.5·(1 + column) and a foreground of mean ‖δ‖ r:
    γ_k = r / mean_k ‖δ‖, and every region's mean ‖M δ‖ is r."""
    H = W = 8
    regions = torch.zeros(1, 3, H, W)
    regions[0, 0, :, :3] = 1
    regions[0, 1, :, 3:6] = 1
    regions[0, 2, :, 6:] = 1
    col = torch.arange(W, dtype=torch.float32).expand(H, W)
    norm = torch.where(col < 3, torch.tensor(1.0), torch.where(col < 6, torch.tensor(3.0), 0.5 * (1 + col)))
    direction = torch.nn.functional.normalize(torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(1)), dim=1)
    delta = direction * norm
    fore = torch.zeros(1, 1, H, W)
    fore[0, 0, :4, 2:4] = 1   # one column of region 0 (‖δ‖ 1), one of region 1 (‖δ‖ 3): r = 2
    m = S.renormalised_scales(regions, fore, delta, 7.5, clamp=None, max_guided=None, smoothing=False)
    r = 2.0
    expected = [r / 1.0, r / 3.0, r / (0.5 * (7 + 8) / 2)]
    for k in range(3):
        inside = regions[0, k].bool()
        torch.testing.assert_close(m[0, 0][inside], torch.full((int(inside.sum()),), expected[k]))
        guided = (m * delta).norm(dim=1)[0][inside].mean()
        torch.testing.assert_close(guided, torch.tensor(r))
    # an empty foreground: the whole latent is the reference
    m0 = S.renormalised_scales(regions, torch.zeros(1, 1, H, W), delta, 7.5, clamp=None, max_guided=None,
                               smoothing=False)
    whole = norm.mean()
    for k in range(3):
        inside = regions[0, k].bool()
        torch.testing.assert_close((m0 * delta).norm(dim=1)[0][inside].mean(), whole)
    # the official bounds: M in [0.8, 3] and s·M ≤ 15
    bounded = S.renormalised_scales(regions, fore, delta, 7.5)
    assert float(bounded.min()) >= 0.8 - 1e-6 and float(bounded.max()) <= 2.0 + 1e-6


def test_regions_and_foreground_from_attention_maps():
    """Synthetic attention on a 4×4 grid: the left half attends to token 1, the right half to token 2 (the
    conditional rows); the unconditional rows attend to the start token in the top half. Identity
    self-attention. Regions: the halves; foreground: the bottom half; ‖δ‖ 1 left, 3 right → γ = 2, 2/3."""
    h = w = 4
    q = h * w
    left = (torch.arange(q) % w) < 2
    top = (torch.arange(q) // w) < 2
    cond = torch.zeros(1, q, 3)
    cond[0, left, 1] = 1
    cond[0, ~left, 2] = 1
    uncond = torch.zeros(1, q, 3)
    uncond[0, top, 0] = 1
    uncond[0, ~top, 1] = 0.5
    uncond[0, ~top, 2] = 0.5
    cross = torch.cat([uncond, cond])
    self_attn = torch.eye(q).expand(2, q, q)
    norm = torch.where(left.view(h, w), torch.tensor(1.0), torch.tensor(3.0))
    delta = torch.stack([norm, torch.zeros(h, w)])[None]     # [1, 2, 4, 4], ‖δ‖ = norm
    average = S.MapAverage((h, w))
    average.add(cross, self_attn, (h, w))
    regions = S.region_masks(average.tokens)
    assert torch.equal(regions[0, 1].bool(), left.view(h, w)) and torch.equal(regions[0, 2].bool(), ~left.view(h, w))
    assert torch.equal(S.foreground_mask(average.fore)[0, 0].bool(), ~top.view(h, w))
    m = S.scfg_scales([cross], [self_attn], delta, sizes=[(h, w)], guidance=3.0, clamp=None, max_guided=None,
                      smoothing=False)
    torch.testing.assert_close(m[0, 0], torch.where(left.view(h, w), torch.tensor(2.0), torch.tensor(2 / 3)))
    # a token left out by the mask owns no pixel
    masked = S.region_masks(average.tokens, torch.tensor([True, True, False]))
    assert masked[0, 2].sum() == 0


def test_self_attention_completion_is_the_official_quarter_s_plus_three_s_squared():
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(2, 9, 9, generator=g), -1)
    c = torch.softmax(torch.randn(2, 9, 5, generator=g), -1)
    torch.testing.assert_close(S.complete(c, s), (s + 3 * s @ s) @ c / 4)
    k = S.smoothing_kernel()
    assert k.shape == (1, 1, 3, 3) and abs(float(k.sum()) - 1) < 1e-6
    assert torch.allclose(k[0, 0, 1, 0] / k[0, 0, 1, 1], torch.exp(torch.tensor(-1.0)))


def png_pixels(directory: Path) -> dict:
    from PIL import Image

    return {p.name: Image.open(p).tobytes() for p in sorted(directory.glob("0*.png"))}


@pytest.mark.parametrize("which", ["demo", "tiny_sdxl"])
def test_sample_with_scfg_runs_and_differs_from_cfg(run_dtk, which, request, tmp_path):
    model = "demo" if which == "demo" else request.getfixturevalue("tiny_sdxl")
    args = ("--model", model, "--steps", "5", "--guidance", "3", "--seed", "3",
            "a large red circle on a white background", "two small green squares on a black background")
    r = run_dtk("sample", *args, "--out", tmp_path / "cfg")
    assert r.exit_code == 0, r.stderr
    r = run_dtk("sample", *args, "--guidance-rule", "scfg", "--out", tmp_path / "scfg")
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 2 and all(rec["guidance_rule"] == "scfg" for rec in records)
    manifest = json.loads((tmp_path / "scfg" / "dtk.json").read_text())
    assert manifest["sampler"]["guidance_rule"] == "scfg" and manifest["args"]["guidance_rule"] == "scfg"
    cfg, s = png_pixels(tmp_path / "cfg"), png_pixels(tmp_path / "scfg")
    assert cfg.keys() == s.keys() and all(cfg[k] != s[k] for k in cfg)
    # plain CFG records no rule: its outputs are what they were before S-CFG existed
    plain = json.loads((tmp_path / "cfg" / "samples.jsonl").read_text().splitlines()[0])
    meta = json.loads((tmp_path / "cfg" / "dtk.json").read_text())
    assert "guidance_rule" not in plain and "guidance_rule" not in meta["sampler"]
    assert "guidance_rule" not in meta["args"]


def npo_dir(tmp_path, base, lora):
    import shutil

    d = tmp_path / "npo"
    d.mkdir()
    shutil.copy(lora, d / "lora.safetensors")
    (d / "dtk.json").write_text(json.dumps({"kind": "model", "command": "train-npo", "base_model": str(base),
                                            "loras": [{"path": "lora.safetensors", "scale": 1.0}]}))
    return d


@pytest.mark.parametrize("case", ["pixel", "guidance 1", "consistency", "npo"])
def test_what_scfg_cannot_guide_is_one_line_exit_2(run_dtk, tiny_sd, tiny_sd_lora, tmp_path, case):
    args, expected = {
        "pixel": (["--model", "demo-pixel", "--guidance", "3", "circle"], "is a pixel-space model"),
        "guidance 1": (["--model", tiny_sd, "--guidance", "1", "x"], "needs --guidance > 1 (this run: 1)"),
        "consistency": (["--model", tiny_sd, "--scheduler", "consistency", "--steps", "1", "x"],
                        "the consistency sampler has no CFG branch"),
        "npo": (["--model", tiny_sd, "--npo", npo_dir(tmp_path, tiny_sd, tiny_sd_lora), "x"], "not with --npo"),
    }[case]
    out = tmp_path / "out"
    r = run_dtk("sample", *args, "--guidance-rule", "scfg", "--out", out)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("dtk sample: error: --guidance-rule scfg: ") and expected in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == "" and not any(out.glob("*.png"))


def test_a_unet_without_cross_attention_is_refused():
    from dtk.errors import BadInput

    model = SimpleNamespace(family="sd", unet=torch.nn.Conv2d(4, 4, 3), ref=SimpleNamespace(spec="conv"), npo=None)
    settings = SimpleNamespace(scheduler="dpm++2m", guidance=3.0)
    with pytest.raises(BadInput, match="--guidance-rule scfg: .*conv is a UNet without cross-attention"):
        S.check_scfg(model, settings)
