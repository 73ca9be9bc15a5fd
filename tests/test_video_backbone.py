"""Video latents through the denoiser layer (the groundwork of video models): an AnimateDiff-class UNet over
flattened latents, driven by dtk's own pieces, gives diffusers' pipeline's video for the same seeds."""

import pytest
import torch

from dtk.diffusion.backbones import MotionUNet, flatten_video, unflatten_video

FRAMES, SIZE = 9, 32


@pytest.fixture(scope="module")
def tiny_animatediff(tiny_sd):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=[32, 64], motion_layers_per_block=1,
                            motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
                            motion_transformer_layers_per_mid_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    pipe = AnimateDiffPipeline.from_pretrained(str(tiny_sd), motion_adapter=adapter, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="linear", clip_sample=False,
                                               timestep_spacing="linspace", steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flattening_is_the_same_noise_stream():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(torch.randn((4, FRAMES, 8, 8), generator=a).reshape(4 * FRAMES, 8, 8),
                       torch.randn((4 * FRAMES, 8, 8), generator=b))
    x = torch.randn(2, 4, FRAMES, 8, 8)
    assert torch.equal(unflatten_video(flatten_video(x), 4), x)


def test_the_denoiser_over_a_motion_unet_samples_the_pipelines_video(tiny_animatediff):
    """Per-seed noise of shape (C·F, h, w), CFG on the denoiser's raw output, diffusers' scheduler step: the
    pipeline's latents (same seeds, prompts, negative prompts, steps)."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Denoiser, VPSchedule, cfg
    from dtk.diffusion.schedule import alphas_cumprod

    pipe, seeds, prompts, guidance = tiny_animatediff, [0, 1], ["a red circle moving right", "a blue star"], 7.5
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


def test_the_motion_unet_mixes_frames_and_gives_x0_eps(tiny_animatediff):
    """The adapter is a video model, not F image models: a change in frame 0 reaches the others; (x̂₀, ε̂) come out
    flattened like the input."""
    from dtk.diffusion.conditioning import Conditioning
    from dtk.diffusion.denoiser import Denoiser, VPSchedule
    from dtk.diffusion.schedule import alphas_cumprod

    pipe = tiny_animatediff
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
