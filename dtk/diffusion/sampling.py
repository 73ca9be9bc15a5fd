"""The sampling loop: noise → latents → images, for any sampler and guidance.

Per-sample generators make every image a function of its own seed only, so
batching and sharding do not change results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dtk.diffusion.conditioning import Conditioning, encode_prompts
from dtk.diffusion.loading import LoadedModel
from dtk.diffusion.schedulers import make_sampler


@dataclass
class SamplerSettings:
    scheduler: str
    steps: int
    guidance: float                       # diffusers convention: ε_u + s(ε_c − ε_u)
    height: int
    width: int
    timesteps: list[int] | None = None
    consistency: dict | None = None       # σ_max, σ_min, σ_data, t_mid, boundaries (scheduler "consistency")
    guidance_rule: str = "cfg"            # "cfg", or "scfg": S-CFG's per-region scales (dtk.diffusion.scfg)


DEFAULT_SAMPLER = {"scheduler": "dpm++2m", "steps": 25, "guidance": 7.5}
GUIDANCE_RULES = ("cfg", "scfg")


def settings_for(model: LoadedModel, *, scheduler: str | None = None, steps: int | None = None,
                 timesteps: list[int] | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None,
                 guidance_rule: str = "cfg") -> SamplerSettings:
    """Explicit choices, else the model's recommendation (its dtk.json), else dtk's defaults.

    A model's recommended explicit timesteps apply when neither the scheduler
    nor timesteps were chosen and the step count is theirs (or unset); its
    ``timesteps_for_steps`` table covers other step counts. The sampler is
    built once here so that a bad combination fails before any work.
    """
    from dtk.diffusion.loading import check_size
    from dtk.errors import BadInput

    recommended = model.ref.sampler

    defaults = {**DEFAULT_SAMPLER, **({"guidance": 1.0} if model.family == "pixel" else {})}

    def pick(name, value):
        return value if value is not None else recommended.get(name, defaults.get(name))

    if timesteps is None and scheduler is None:
        # a model's own timesteps (e.g. a PCM's phase tops), also per step count when it lists them
        own, table = recommended.get("timesteps"), recommended.get("timesteps_for_steps", {})
        if steps is None or (own and len(own) == steps):
            timesteps = own
        else:
            timesteps = table.get(str(steps))
    if timesteps and steps is not None and steps != len(timesteps):
        raise BadInput(f"--steps {steps} disagrees with --timesteps ({len(timesteps)} values)")
    height, width = height or model.default_size, width or model.default_size
    check_size(model.vae_scale_factor, height, width)
    settings = SamplerSettings(scheduler=pick("scheduler", scheduler),
                               steps=len(timesteps) if timesteps else int(pick("steps", steps)),
                               guidance=float(pick("guidance", guidance)), height=height, width=width,
                               timesteps=list(timesteps) if timesteps else None,
                               consistency=recommended.get("consistency"))
    if guidance_rule != "cfg":
        if guidance_rule not in GUIDANCE_RULES:
            raise BadInput(f"--guidance-rule {guidance_rule}: unknown; one of {', '.join(GUIDANCE_RULES)}")
        from dtk.diffusion.scfg import check_scfg

        settings.guidance_rule = guidance_rule
        check_scfg(model, settings)
    if settings.scheduler == "consistency":
        check_consistency_steps(settings)
        if settings.guidance != 1.0 and model.guide is None:
            raise BadInput(f"--guidance {settings.guidance:g}: a consistency model is guided by a worse version of "
                           "itself; name one with --guide-with (or sample with guidance 1)")
    elif model.guide is not None:
        raise BadInput(f"--guide-with {model.guide.ref.spec}: guides consistency sampling only "
                       f"(this run samples with {settings.scheduler})")
    elif model.family == "pixel" and settings.guidance > 1.0:
        raise BadInput(f"--guidance {settings.guidance:g}: a pixel-space model has no unconditional branch for CFG; "
                       "use a guidance ≤ 1")
    if settings.scheduler != "consistency":
        make_sampler(settings.scheduler, model.pipe.scheduler.config, settings.steps, settings.timesteps, model.device)
    return settings


@dataclass
class Request:
    prompt: str
    seed: int
    negative_prompt: str = ""
    meta: dict = field(default_factory=dict)


def initial_noise(model: LoadedModel, seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, list]:
    """One CPU generator per sample: the same seed gives the same noise on any device."""
    f = model.vae_scale_factor
    shape = (model.unet.config.in_channels, height // f, width // f)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(model.device, model.dtype), generators


@torch.no_grad()
def denoise(model: LoadedModel, settings: SamplerSettings, requests: list[Request],
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run the sampler for one batch from ``noise`` (default: drawn from each request's seed); final latents."""
    if settings.scheduler == "consistency":
        return consistency_sample(model, settings, requests, noise)
    sampler = make_sampler(settings.scheduler, model.pipe.scheduler.config, settings.steps,
                           settings.timesteps, model.device)
    drawn, generators = initial_noise(model, [r.seed for r in requests], settings.height, settings.width)
    latents = (drawn if noise is None else noise.to(model.device, model.dtype)) * sampler.init_noise_sigma
    guided = settings.guidance > 1.0  # as diffusers: guidance ≤ 1 runs the conditional branch only
    denoiser = model_denoiser(model)
    cond = encode_prompts(model, [r.prompt for r in requests], settings.height, settings.width)
    if guided:
        uncond = encode_prompts(model, [r.negative_prompt for r in requests], settings.height, settings.width)
        rule = guidance_rule(model, denoiser, cond, uncond, settings.guidance, settings.guidance_rule)
    for t in sampler.timesteps:
        x_in = sampler.scale_model_input(latents, t)
        out = rule(x_in, t) if guided else denoiser.raw(x_in, t, cond)
        latents = sampler.step(out, t, latents, generators)
    return latents


def model_denoiser(model: LoadedModel):
    """The loaded model's UNet as a denoiser (its own schedule and parameterisation)."""
    from dtk.diffusion.denoiser import Denoiser, VPSchedule
    from dtk.diffusion.schedule import alphas_cumprod

    config = model.pipe.scheduler.config
    return Denoiser(model.unet, VPSchedule(alphas_cumprod(config).to(model.device)),
                    config.get("prediction_type", "epsilon"))


def guidance_rule(model: LoadedModel, denoiser, cond, uncond, scale: float, rule: str = "cfg"):
    """The guided output at (x, t) for a diffusers scheduler: CFG in diffusers' convention, one batched
    evaluation of both branches; with an NPO model (``--npo``) the negative branch runs the model plus the NPO
    LoRA, so the two branches are two evaluations with different weights. ``rule="scfg"``: S-CFG, per-region
    scales from the same batched call's attention maps (``dtk.diffusion.scfg``)."""
    from dtk.diffusion.denoiser import cfg

    if rule == "scfg":
        from dtk.diffusion.scfg import scfg_rule

        return scfg_rule(model, denoiser, cond, uncond, scale)
    npo = model.npo
    if npo is not None:
        def npo_rule(x, t):
            npo.negative(model.pipe)
            out_u = denoiser.raw(x, t, uncond)
            npo.positive(model.pipe)
            return cfg(out_u, denoiser.raw(x, t, cond), scale)
        return npo_rule
    both = Conditioning.cat([uncond, cond])

    def cfg_rule(x, t):
        out_u, out_c = denoiser.raw(torch.cat([x, x]), t, both).chunk(2)
        return cfg(out_u, out_c, scale)
    return cfg_rule


CONSISTENCY_DEFAULTS = {"sigma_max": 80.0, "sigma_min": 0.002, "sigma_data": 0.5, "t_mid": 1.526}


def _consistency_params(settings: SamplerSettings) -> dict:
    params = {**CONSISTENCY_DEFAULTS, **(settings.consistency or {})}
    params.setdefault("boundaries", [params["sigma_max"], params["sigma_min"]])
    return params


def check_consistency_steps(settings: SamplerSettings) -> None:
    from dtk.errors import BadInput

    phases = len(_consistency_params(settings)["boundaries"]) - 1
    allowed = (1, 2) if phases == 1 else (phases,)
    if settings.steps not in allowed:
        raise BadInput(f"--steps {settings.steps}: this consistency model samples with "
                       f"{' or '.join(map(str, allowed))} step(s)" + (" (one per phase)" if phases > 1 else ""))


@torch.no_grad()
def consistency_sample(model: LoadedModel, settings: SamplerSettings, requests: list[Request],
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """Consistency sampling (ECT/SCT): f(σ_max·z, σ_max); a second step re-noises the output to t_mid
    and applies f again. A K-phase model jumps from each phase top to the next, edge to edge.

    With a guide model (SCT's guidance by a worse version of the model itself, in the manner of
    autoguidance) and guidance w, every denoiser output is D_guide + w·(D − D_guide)."""
    from dtk.diffusion.denoiser import guided_by_worse
    from dtk.diffusion.edm import consistency_output, jump_to, vp_sigmas

    p = _consistency_params(settings)
    model_view = model_denoiser(model)
    abar = model_view.schedule.abar
    denoiser = model_view.edm()
    if model.guide is not None and settings.guidance != 1.0:   # the guide shares the model's schedule
        denoiser = guided_by_worse(denoiser, model_view.using(model.guide.unet).edm(), settings.guidance)
    drawn, generators = initial_noise(model, [r.seed for r in requests], settings.height, settings.width)
    z = drawn if noise is None else noise.to(model.device, model.dtype)
    sigma_max = min(p["sigma_max"], float(vp_sigmas(abar)[-1]))
    tops = p["boundaries"][:-1]
    phased = len(tops) > 1
    levels = [sigma_max, *tops[1:]] if phased else [sigma_max, p["t_mid"]][:settings.steps]
    kwargs = encode_prompts(model, [r.prompt for r in requests], settings.height, settings.width).unet_kwargs()
    x = z.float() * sigma_max
    for i, sigma in enumerate(levels):
        s = torch.full((len(requests),), float(sigma), device=model.device)
        f = consistency_output(denoiser(x.to(model.dtype), s, **kwargs), x, s, p["sigma_data"], p["sigma_min"])
        nxt = levels[i + 1] if i + 1 < len(levels) else 0.0
        if phased:
            x = jump_to(f, x, s, torch.full_like(s, nxt))
        elif i + 1 < len(levels):
            fresh = torch.stack([torch.randn(f.shape[1:], generator=g) for g in generators]).to(f.device)
            x = f + nxt * fresh
        else:
            x = f
    return x.to(model.dtype)


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [0, 1], float32 [B, 3, H, W]."""
    vae = model.vae
    if vae is None:  # a pixel-space model: its samples are images in [-1, 1]
        return (latents.float() / 2 + 0.5).clamp(0, 1)
    if latents.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = vae.to(torch.float32)  # the SDXL VAE overflows in fp16
    x = latents.to(vae.dtype) / vae.config.scaling_factor
    images = vae.decode(x, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def generate(model: LoadedModel, settings: SamplerSettings, requests: list[Request]) -> torch.Tensor:
    return decode(model, denoise(model, settings, requests))


def to_uint8(images: torch.Tensor):
    """[B,3,H,W] in [0,1] → list of HxWx3 uint8 numpy arrays (round half up, as diffusers does)."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return list(arr)
