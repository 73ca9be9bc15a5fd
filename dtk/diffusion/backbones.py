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


class VideoTransformer:
    """A CogVideoX-class 3D transformer over flattened latents [B, F·C, h, w] (frames first, as the transformer
    lays them out: [B, F, C, h, w]). A model with rotary position embeddings gets them for the latent grid of
    the call: without them it would run, and be silently wrong."""

    def __init__(self, net, channels: int):
        self.net, self.channels = net, channels
        self.module = getattr(net, "module", net)
        self._rotary: dict = {}

    def rotary(self, frames: int, h: int, w: int, device):
        """(cos, sin) of the 3D rotary embedding for ``frames`` latent frames on an h×w latent grid, as
        CogVideoX's pipeline computes them (1.0: the grid's crop of the training grid; 1.5: a slice of it)."""
        config = self.module.config
        if not config.use_rotary_positional_embeddings:
            return None
        key = (frames, h, w, str(device))
        if key not in self._rotary:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            p, p_t = config.patch_size, config.patch_size_t
            grid = (h // p, w // p)
            base = (config.sample_height // p, config.sample_width // p)
            if p_t is None:
                self._rotary[key] = get_3d_rotary_pos_embed(
                    embed_dim=config.attention_head_dim, crops_coords=_centre_crop(grid, base), grid_size=grid,
                    temporal_size=frames, device=device)
            else:
                self._rotary[key] = get_3d_rotary_pos_embed(
                    embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=base, device=device)
        return self._rotary[key]

    def __call__(self, x: torch.Tensor, t, return_dict: bool = False, encoder_hidden_states=None, **kwargs):
        b, fc, h, w = x.shape
        if fc % self.channels:
            raise ValueError(f"latents of {fc} channels are not frames of {self.channels}")
        f = fc // self.channels
        t = torch.as_tensor(t, device=x.device).reshape(-1)   # the transformer takes a 1-D timestep
        out = self.net(hidden_states=x.view(b, f, self.channels, h, w), encoder_hidden_states=encoder_hidden_states,
                       timestep=t.expand(b) if t.numel() == 1 else t,
                       image_rotary_emb=self.rotary(f, h, w, x.device), return_dict=False, **kwargs)[0]
        return (out.reshape(b, fc, h, w),)


def _centre_crop(grid: tuple[int, int], base: tuple[int, int]):
    """The region of the training grid ``base`` (h, w) that a grid of another aspect covers when resized to fit it
    and centred: ((top, left), (bottom, right))."""
    (h, w), (bh, bw) = grid, base
    if h / w > bh / bw:
        rh, rw = bh, int(round(bh / h * w))
    else:
        rw, rh = bw, int(round(bw / w * h))
    top, left = int(round((bh - rh) / 2.0)), int(round((bw - rw) / 2.0))
    return (top, left), (top + rh, left + rw)
