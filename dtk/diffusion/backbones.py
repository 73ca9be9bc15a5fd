"""Backbones other than an image UNet, made to look like one to a ``Denoiser``.

A ``Denoiser`` calls its network as ``net(x_t, t, return_dict=False, **cond.unet_kwargs())`` on 4-D latents
[B, C, h, w]. Video latents keep that shape by flattening frames into channels, [B, F·C, h, w] (in the order the
backbone lays them out), so every per-example formula in the methods and samplers (``.view(-1, 1, 1, 1)``
scalings, ``Guided``, ``VPSchedule.renoise``, ``ddim_step``) holds unchanged; an adapter here un-flattens around
the network call. A per-seed noise draw of shape (F·C, h, w) is the same stream diffusers draws for one video,
so seeds reproduce across dtk and diffusers.
"""

from __future__ import annotations

import torch


class MotionUNet:
    """An AnimateDiff-class ``UNetMotionModel`` (an SD UNet with motion modules) over flattened latents
    [B, C·F, h, w]: the network sees [B, C, F, h, w] and one copy of the text conditioning per frame."""

    def __init__(self, net, channels: int):
        self.net, self.channels = net, channels
        self.module = getattr(net, "module", net)   # the nn.Module itself (DDP, an adapter switch)

    def frames(self, x: torch.Tensor) -> int:
        if x.shape[1] % self.channels:
            raise ValueError(f"latents of {x.shape[1]} channels are not frames of {self.channels}")
        return x.shape[1] // self.channels

    def __call__(self, x: torch.Tensor, t, return_dict: bool = False, encoder_hidden_states=None, **kwargs):
        b, cf, h, w = x.shape
        f = self.frames(x)
        embeds = None if encoder_hidden_states is None else encoder_hidden_states.repeat_interleave(f, dim=0)
        out = self.net(x.view(b, self.channels, f, h, w), t, encoder_hidden_states=embeds, return_dict=False,
                       **kwargs)[0]
        return (out.reshape(b, cf, h, w),)


def flatten_video(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] → [B, C·F, h, w]."""
    b, c, f, h, w = latents.shape
    return latents.reshape(b, c * f, h, w)


def unflatten_video(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, C·F, h, w] → [B, C, F, h, w]."""
    b, cf, h, w = latents.shape
    return latents.view(b, channels, cf // channels, h, w)
