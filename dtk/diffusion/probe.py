"""A model's fingerprint: "were these pairs made by this model?" without trusting paths."""

from __future__ import annotations


def model_probe(model) -> list[float]:
    """The UNet's ε̂ on a fixed input (8×8 latent, t = 500, empty prompt), pooled to 4×4 per channel.

    Equal models (whatever their path, dtype or device) give close values;
    different weights give clearly different ones.
    """
    import torch

    from dtk.diffusion.conditioning import encode_prompts

    f = model.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    dtype = model.unet.dtype  # may differ from model.dtype (full fine-tuning keeps the UNet in fp32)
    x = torch.randn(1, model.unet.config.in_channels, 8, 8, generator=g).to(model.device, dtype)
    cond = encode_prompts(model, [""], 8 * f, 8 * f)
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else {n: t.to(dtype) for n, t in v.items()}
              for k, v in cond.unet_kwargs().items()}
    with torch.no_grad():
        out = model.unet(x, torch.tensor([500], device=model.device), return_dict=False, **kwargs)[0]
    return [round(v, 4) for v in torch.nn.functional.avg_pool2d(out.float(), 2).flatten().tolist()]


def probes_match(a: list[float], b: list[float]) -> bool:
    import torch

    a_t, b_t = torch.tensor(a), torch.tensor(b)
    # loose enough for fp16 vs bf16 vs fp32; different weights differ by O(1)
    return a_t.shape == b_t.shape and bool(((a_t - b_t).abs() <= 0.05 * a_t.abs().max() + 1e-2).all())
