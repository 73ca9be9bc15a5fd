"""Video latents through the denoiser layer (the groundwork of video models): an AnimateDiff-class UNet over
flattened latents, driven by dtk's own pieces, gives diffusers' pipeline's video for the same seeds."""

import pytest
import torch

from dtk.diffusion.backbones import MotionUNet, flatten_video, unflatten_video

FRAMES, SIZE = 9, 32


def load_pipeline(cls_name: str, path):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flattening_is_the_same_noise_stream():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(torch.randn((4, FRAMES, 8, 8), generator=a).reshape(4 * FRAMES, 8, 8),
                       torch.randn((4 * FRAMES, 8, 8), generator=b))
    x = torch.randn(2, 4, FRAMES, 8, 8)
    assert torch.equal(unflatten_video(flatten_video(x), 4), x)


@pytest.mark.slow   # an AnimateDiff pipeline end to end: 0.5 s per call on 2 cores
def test_the_denoiser_over_a_motion_unet_samples_the_pipelines_video(tiny_animatediff):
    """Per-seed noise of shape (C·F, h, w), CFG on the denoiser's raw output, diffusers' scheduler step: the
    pipeline's latents (same seeds, prompts, negative prompts, steps)."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Denoiser, VPSchedule, cfg
    from dtk.diffusion.schedule import alphas_cumprod

    pipe, seeds, prompts, guidance = load_pipeline("AnimateDiffPipeline", tiny_animatediff), [0, 1], \
        ["a red circle moving right", "a blue star"], 7.5
    ref = pipe(prompt=prompts, negative_prompt=["", ""], num_frames=FRAMES, height=SIZE, width=SIZE,
               num_inference_steps=3, guidance_scale=guidance, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).frames      # [B, C, F, h, w]

    channels = pipe.unet.config.in_channels
    net = MotionUNet(pipe.unet, channels)
    denoiser = Denoiser(net, VPSchedule(alphas_cumprod(pipe.scheduler.config)), "epsilon")
    cond, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    uncond, _ = pipe.encode_prompt(["", ""], "cpu", 1, False)
    both = Conditioning(torch.cat([uncond, cond]))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    h = SIZE // 2   # the tiny VAE halves the size
    x = torch.stack([torch.randn((channels * FRAMES, h, h), generator=torch.Generator().manual_seed(s))
                     for s in seeds]) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out_u, out_c = denoiser.raw(torch.cat([x_in, x_in]), t, both).chunk(2)
            x = scheduler.step(cfg(out_u, out_c, guidance), t, x, return_dict=False)[0]
    assert float((unflatten_video(x, channels) - ref).abs().max()) < 1e-5


@pytest.mark.slow   # an AnimateDiff pipeline end to end: 0.5 s per call on 2 cores
def test_the_motion_unet_mixes_frames_and_gives_x0_eps(tiny_animatediff):
    """The adapter is a video model, not F image models: a change in frame 0 reaches the others; (x̂₀, ε̂) come out
    flattened like the input."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Denoiser, VPSchedule
    from dtk.diffusion.schedule import alphas_cumprod

    pipe = load_pipeline("AnimateDiffPipeline", tiny_animatediff)
    channels = pipe.unet.config.in_channels
    denoiser = Denoiser(MotionUNet(pipe.unet, channels), VPSchedule(alphas_cumprod(pipe.scheduler.config)),
                        "epsilon")
    cond = Conditioning(pipe.encode_prompt(["a red circle"], "cpu", 1, False)[0])
    x = torch.randn(1, channels, FRAMES, 16, 16, generator=torch.Generator().manual_seed(0))
    moved = x.clone()
    moved[:, :, 0] += 1.0
    t = torch.tensor([500])
    with torch.no_grad():
        x0, eps = denoiser(flatten_video(x), t, cond)
        x0_moved, _ = denoiser(flatten_video(moved), t, cond)
    assert x0.shape == eps.shape == (1, channels * FRAMES, 16, 16)
    later = unflatten_video(x0, channels)[:, :, 5] - unflatten_video(x0_moved, channels)[:, :, 5]
    assert float(later.abs().max()) > 1e-3
    with pytest.raises(ValueError, match="not frames of"):
        MotionUNet(pipe.unet, channels)(torch.randn(1, channels * FRAMES + 1, 16, 16), t)


@pytest.mark.parametrize("rotary", [True, False])
def test_the_denoiser_over_a_video_transformer_samples_the_pipelines_video(tiny_cogvideox, tmp_path, rotary):
    """A CogVideoX-class transformer behind the same Denoiser (v-prediction on the SNR-shifted schedule): CFG on
    its raw output stepped by CogVideoX's DDIM gives the pipeline's latents; and its (x̂₀, ε̂) stepped by dtk's own
    DDIM step is CogVideoX's DDIM step."""
    from dtk.diffusion.backbones import VideoTransformer
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Denoiser, VPSchedule, cfg
    from dtk.diffusion.schedule import alphas_cumprod, ddim_step

    from tiny_models import build_tiny_cogvideox

    # saved and loaded again: the offline T5 tokenizer round-trips; the sin-cos variant is built alike
    path = tiny_cogvideox if rotary else build_tiny_cogvideox(tmp_path / "sincos", use_rotary_positional_embeddings=False)
    pipe, seeds, prompts, guidance = load_pipeline("CogVideoXPipeline", path), [0, 1], \
        ["a red circle moving right", "a blue star"], 6.0
    ref = pipe(prompt=prompts, negative_prompt="", num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=3,
               guidance_scale=guidance, max_sequence_length=16, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).frames      # [B, F', C, h, w]

    channels, frames, h = 4, (FRAMES - 1) // 4 + 1, SIZE // 4
    denoiser = Denoiser(VideoTransformer(pipe.transformer, channels), VPSchedule(alphas_cumprod(pipe.scheduler.config)),
                        "v_prediction")
    encode = lambda p: pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=16,  # noqa: E731
                                          device="cpu")[0]
    cond, uncond = encode(prompts), encode(["", ""])
    both = Conditioning(torch.cat([uncond, cond]))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    x = torch.stack([torch.randn((frames * channels, h, h), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_u, out_c = denoiser.raw(torch.cat([x, x]), t, both).chunk(2)
            x = scheduler.step(cfg(out_u, out_c, guidance), t, x, return_dict=False)[0]
        assert float((x.view_as(ref) - ref).abs().max()) < 1e-5   # 3e-6 here: the order of float sums

        # one step from the noise, conditional only: dtk's DDIM on the denoiser's (x̂₀, ε̂) = CogVideoX's DDIM
        x = torch.randn(2, frames * channels, h, h, generator=torch.Generator().manual_seed(5))
        t, t_prev = torch.tensor([999, 999]), torch.tensor([666, 666])
        ours = ddim_step(*denoiser(x, t, Conditioning(cond)), *denoiser.alpha_sigma(t_prev))
        scheduler.set_timesteps(3)
        theirs = scheduler.step(denoiser.raw(x, t, Conditioning(cond)), 999, x, return_dict=False)[0]
        assert float((ours - theirs).abs().max()) < 1e-6
