"""Samplers by name: diffusers' schedulers, and dtk's own DDIM over any timesteps.

Every sampler has the same face: ``timesteps``, ``init_noise_sigma``,
``scale_model_input(x, t)`` and ``step(model_output, t, x, generators)``,
so the sampling loop does not care which one it drives.
"""

from __future__ import annotations

from typing import Any

from dtk.errors import BadInput

# name -> (diffusers class, config overrides). "ddim*" use dtk's DDIM (below),
# with diffusers only choosing the default timesteps.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm-solver": ("DPMSolverMultistepScheduler",
                   {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
SCHEDULER_NAMES = list(SCHEDULERS)

# Keys of a base scheduler config that describe the model, not the sampler (a zero-terminal-SNR model's
# schedule and a pixel model's x0 clipping included); where the config is silent, diffusers' defaults, but
# no clipping (diffusers' DDPM would clip by default, which latent models must not).
_MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type", "steps_offset", "timestep_spacing", "set_alpha_to_one", "clip_sample",
               "clip_sample_range", "rescale_betas_zero_snr")
_DEFAULTS = {"clip_sample": False}


def parse_timesteps(text: str, num_train_timesteps: int = 1000) -> list[int]:
    from dtk.parsing import comma_values

    try:
        ts = comma_values(text, int)
    except ValueError:
        raise BadInput(f"--timesteps {text!r}: expected comma-separated integers, e.g. 999,749,499,249") from None
    if not ts:
        raise BadInput("--timesteps: empty list")
    if any(not 0 <= t < num_train_timesteps for t in ts):
        raise BadInput(f"--timesteps {text}: each must be in 0..{num_train_timesteps - 1}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise BadInput(f"--timesteps {text}: must be strictly decreasing")
    return ts


def make_sampler(name: str, base_config: dict, steps: int, timesteps: list[int] | None, device):
    if name not in SCHEDULERS:
        raise BadInput(f"--scheduler {name}: unknown (choose from {', '.join(SCHEDULER_NAMES)})")
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    model_config = {k: v for k, v in dict(base_config).items() if k in _MODEL_KEYS}
    config = {**_DEFAULTS, **model_config, **overrides}
    if config.get("rescale_betas_zero_snr") and not _takes(cls_name, "rescale_betas_zero_snr"):
        supported = [n for n, (c, _) in SCHEDULERS.items() if _takes(c, "rescale_betas_zero_snr")]
        raise BadInput(f"--scheduler {name}: diffusers' {cls_name} has no zero-terminal-SNR schedule, which this "
                       f"model was trained on (choose from {', '.join(supported)})")
    scheduler = getattr(diffusers, cls_name).from_config(config)
    n_train = int(config.get("num_train_timesteps", 1000))
    if timesteps is None and not 1 <= steps <= n_train:
        raise BadInput(f"--steps {steps}: must be in 1..{n_train} (the model's training timesteps)")
    try:
        if name.startswith("ddim"):
            if timesteps is None:
                scheduler.set_timesteps(steps)
                timesteps = [int(t) for t in scheduler.timesteps]
            return DDIMSampler(config, timesteps, device)
        if timesteps is not None:
            import inspect

            if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
                raise BadInput(f"--scheduler {name} does not accept --timesteps; use ddim, euler, dpm++2m, lcm or tcd")
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(steps, device=device)
    except ValueError as e:   # diffusers' own limits (e.g. lcm's original-steps grid, karras with timesteps)
        what = f"--timesteps {','.join(map(str, timesteps))}" if timesteps is not None else f"--steps {steps}"
        raise BadInput(f"--scheduler {name} {what}: {' '.join(str(e).split())}") from None
    return DiffusersSampler(scheduler)


def _takes(cls_name: str, key: str) -> bool:
    """Whether a diffusers scheduler class has the setting (from_config keeps unknown keys, and ignores them)."""
    import inspect

    import diffusers

    return key in inspect.signature(getattr(diffusers, cls_name).__init__).parameters


class DiffusersSampler:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

    def scale_model_input(self, x, t):
        return self.scheduler.scale_model_input(x, t)

    def step(self, model_output, t, x, generators):
        import inspect

        kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            kwargs["generator"] = generators
        return self.scheduler.step(model_output, t, x, return_dict=False, **kwargs)[0]


class DDIMSampler:
    """Deterministic DDIM (η = 0) over an explicit, possibly uneven, list of timesteps.

    Each step jumps to the next listed timestep; the last one jumps to ᾱ = 1
    (or ᾱ_0 when the config has ``set_alpha_to_one: false``, as diffusers does).
    """

    def __init__(self, config: dict, timesteps: list[int], device):
        import torch

        from dtk.diffusion.schedule import alphas_cumprod

        self.abar = alphas_cumprod(config)
        self.final_abar = 1.0 if config.get("set_alpha_to_one", True) else float(self.abar[0])
        self.prediction_type = config.get("prediction_type", "epsilon")
        # a pixel model's x0 clipped as diffusers' DDIM clips it (ε as predicted)
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)
        self._next = {int(t): int(s) for t, s in zip(timesteps, list(timesteps[1:]) + [-1])}
        self.init_noise_sigma = 1.0

    def scale_model_input(self, x, t):
        return x

    def step(self, model_output, t, x, generators=None):
        from dtk.diffusion.schedule import alpha_sigma, ddim_step, to_x0_eps

        t = int(t)
        a_t, s_t = alpha_sigma(self.abar, t)
        a_s, s_s = alpha_sigma(self.abar, self._next[t], self.final_abar)
        x0, eps = to_x0_eps(model_output.float(), x.float(), a_t, s_t, self.prediction_type)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return ddim_step(x0, eps, a_s, s_s).to(x.dtype)
