"""Schedules and samplers against closed forms and against diffusers' own schedulers."""

import pytest
import torch

from dtk.diffusion.schedule import alpha_sigma, alphas_cumprod, ddim_step, output_for, to_x0_eps
from dtk.diffusion.schedulers import SCHEDULERS, make_sampler, parse_timesteps
from dtk.errors import BadInput

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1,
             "clip_sample": False, "prediction_type": "epsilon"}


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler.from_config(SD_CONFIG).alphas_cumprod.double()
    assert torch.allclose(alphas_cumprod(SD_CONFIG), ref, rtol=1e-6)
    # SD's scaled_linear endpoints (docs/methods.md): ᾱ_999 ≈ 0.0047
    assert abs(float(alphas_cumprod(SD_CONFIG)[-1]) - 0.00466) < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_inverts_the_forward_process(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a, s = alpha_sigma(alphas_cumprod(SD_CONFIG), 600)
    x_t = a * x0 + s * eps
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    x0_hat, eps_hat = to_x0_eps(out, x_t, a, s, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    # and the training target of each kind (DPO's: a sample-predicting model must not be taught v)
    assert torch.allclose(output_for(x0, eps, a, s, prediction_type), out, atol=1e-6)


def test_ddim_with_an_oracle_stays_on_the_closed_form_path():
    """With the true ε of a single data point, DDIM at any (uneven) timesteps lands on α_s x0 + σ_s ε."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    abar = alphas_cumprod(SD_CONFIG)
    timesteps = [999, 700, 650, 120, 3]
    sampler = make_sampler("ddim", SD_CONFIG, len(timesteps), timesteps, "cpu")
    a, s = alpha_sigma(abar, 999)
    x = a * x0 + s * eps
    for t in sampler.timesteps:
        x = sampler.step(eps, t, x)
    a_end, s_end = alpha_sigma(abar, -1, final_abar=float(abar[0]))  # set_alpha_to_one=False
    assert torch.allclose(x, a_end * x0 + s_end * eps, atol=1e-5)
    assert torch.allclose(ddim_step(x0, eps, 1.0, 0.0), x0)


@pytest.mark.parametrize("spacing,name", [("leading", "ddim"), ("trailing", "ddim-trailing")])
@pytest.mark.parametrize("prediction_type, model_keys", [
    ("epsilon", {}), ("v_prediction", {}),
    ("v_prediction", {"rescale_betas_zero_snr": True}),      # a zero-terminal-SNR model: ᾱ_999 = 0
    ("epsilon", {"clip_sample": True, "clip_sample_range": 0.5})])   # a pixel model's x0 clipping
def test_dtk_ddim_equals_diffusers_ddim(spacing, name, prediction_type, model_keys):
    from diffusers import DDIMScheduler

    config = {**SD_CONFIG, "prediction_type": prediction_type, **model_keys}
    ref = DDIMScheduler.from_config({**config, "timestep_spacing": spacing})
    ref.set_timesteps(10)
    ours = make_sampler(name, config, 10, None, "cpu")
    assert ours.timesteps.tolist() == ref.timesteps.tolist()

    def model(x, t):  # any smooth function of (x, t) will do
        return torch.tanh(x) * (0.5 + t / 2000.0)

    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in ours.timesteps:
        x_ref = ref.step(model(x_ref, int(t)), t, x_ref).prev_sample
        x_ours = ours.step(model(x_ours, int(t)), t, x_ours)
    assert torch.allclose(x_ours, x_ref, atol=1e-5)


def test_the_model_schedule_reaches_every_sampler():
    """A zero-terminal-SNR config's schedule is the one every sampler runs (not dropped as a sampler key)."""
    from diffusers import EulerDiscreteScheduler

    config = {**SD_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}
    ref = EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(4)
    ours = make_sampler("euler", config, 4, None, "cpu")
    assert float(ours.scheduler.sigmas[0]) == pytest.approx(float(ref.sigmas[0])) and float(ref.sigmas[0]) > 1000
    with pytest.raises(BadInput, match="HeunDiscreteScheduler has no zero-terminal-SNR schedule"):
        make_sampler("heun", config, 4, None, "cpu")   # diffusers' Heun would silently sample the other schedule


def test_explicit_trailing_timesteps_equal_ddim_trailing():
    default = make_sampler("ddim-trailing", SD_CONFIG, 4, None, "cpu")
    assert default.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(name):
    s = make_sampler(name, SD_CONFIG, 4, None, "cpu")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * s.init_noise_sigma
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for t in s.timesteps:
        x = s.step(0.1 * s.scale_model_input(x, t), t, x, gens)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["euler", "dpm++2m", "lcm", "tcd", "ddim", "ddpm"])
def test_explicit_timesteps_are_used(name):
    s = make_sampler(name, SD_CONFIG, 4, [999, 759, 499, 259], "cpu")
    assert [int(t) for t in s.timesteps][:4] == [999, 759, 499, 259]


def test_scheduler_without_custom_timesteps_says_so():
    with pytest.raises(BadInput, match="does not accept --timesteps"):
        make_sampler("euler-ancestral", SD_CONFIG, 4, [999, 500], "cpu")


@pytest.mark.parametrize("text,msg", [("999,abc", "integers"), ("999,999", "decreasing"),
                                      ("1000,10", "0..999"), ("", "empty")])
def test_parse_timesteps_rejects(text, msg):
    with pytest.raises(BadInput, match=msg):
        parse_timesteps(text)
    assert parse_timesteps("999, 749,499,249") == [999, 749, 499, 249]


def test_cogvideox_snr_shift_is_in_the_schedule():
    """CogVideoX's schedulers shift the SNR (snr_shift_scale) before rescaling to zero terminal SNR; dtk's table
    is theirs, and without a shift the plain one."""
    from diffusers import CogVideoXDDIMScheduler

    from dtk.diffusion.schedule import alphas_cumprod

    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  snr_shift_scale=3.0)
    ref = CogVideoXDDIMScheduler(**config).alphas_cumprod.double()
    ours = alphas_cumprod(config)
    assert torch.allclose(ours, ref, atol=1e-12) and abs(float(ours[500]) - 0.0953) < 1e-3
    unshifted = alphas_cumprod({**config, "snr_shift_scale": 1.0})
    assert float((unshifted - ours).abs().max()) > 0.2
    assert torch.allclose(unshifted, CogVideoXDDIMScheduler(**{**config, "snr_shift_scale": 1.0}).alphas_cumprod.double(),
                          atol=1e-6)
