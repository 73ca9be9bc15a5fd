"""Convert a diffusers SD1.x pipeline directory to the original single-file (LDM/CompVis) layout.

The inverse of the renaming ``StableDiffusionPipeline.from_single_file`` does on load, written
from the two layouts (not from any existing converter). Tests use it to make a real-looking single-file
checkpoint out of the tiny random pipeline, so the single-file path can be checked against the
directory path with the very same weights.

Layout of the single file (SD1.x):
  * ``model.diffusion_model.*``        the UNet (openaimodel.UNetModel naming);
  * ``first_stage_model.*``            the VAE (ldm AutoencoderKL naming);
  * ``cond_stage_model.transformer.*`` the CLIP text model (transformers' own naming, under
                                       ``text_model.``, as transformers 4.x laid it out).

Every tensor of the pipeline is mapped (an unknown key raises), so a round trip through
diffusers' single-file loader gives back exactly the same weights. Generic over the number of
blocks, ``layers_per_block`` (an int) and text-encoder layers; SD1.x only (no SD2/SDXL extras:
OpenCLIP text encoders, label/add embeddings, per-block ``layers_per_block``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers ResnetBlock2D → ldm ResBlock (in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv]).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}     # conv_in, conv_out, (post_)quant_conv keep their names
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _load_component(directory: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of ``rest`` (``conv1.weight`` → ``in_layers.2.weight``)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, lpb: int, up_blocks_with_attn: set[int]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    # Input blocks: [conv_in] then, per down block, lpb × (resnet [+ attention]) and a downsampler
    # (all but the last block), each its own TimestepEmbedSequential.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + block * (lpb + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{idx}.1.{rest}"  # SpatialTransformer: same names as Transformer2DModel
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        idx = 1 + int(m[1]) * (lpb + 1) + lpb
        return f"input_blocks.{idx}.0.op.{m[2]}"
    # Middle block: resnet, attention, resnet.
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * i}.{_rename_head(rest, _UNET_RESNET)}"
        return f"middle_block.{2 * i + 1}.{rest}"
    # Output blocks: per up block, (lpb + 1) × (resnet [+ attention]); the last of each up block
    # (but the last block's) also holds the upsampler, after the attention if there is one.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = block * (lpb + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        idx = block * (lpb + 1) + lpb
        sub = 2 if block in up_blocks_with_attn else 1
        return f"output_blocks.{idx}.{sub}.conv.{m[2]}"
    raise KeyError(f"UNet key with no LDM counterpart: {key}")


def _vae_key(key: str, num_up_blocks: int) -> str:
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder"):
        raise KeyError(f"VAE key with no LDM counterpart: {key}")
    if rest.split(".")[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{_rename_head(rest, _VAE_TOP)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its up blocks from the lowest resolution's end: diffusers' up_blocks.i
    # is up.(n-1-i), so the state dict's order is reversed.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{_rename_head(m[2], _VAE_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.mid.attn_1.{_rename_head(m[1], _VAE_ATTN)}"
    raise KeyError(f"VAE key with no LDM counterpart: {key}")


def diffusers_to_ldm(pipe_dir) -> dict:
    """The weights of the SD1.x pipeline in ``pipe_dir`` as one original-layout state dict."""
    pipe_dir = Path(pipe_dir)
    out = {}

    unet_cfg = json.loads((pipe_dir / "unet" / "config.json").read_text())
    lpb = unet_cfg["layers_per_block"]
    if not isinstance(lpb, int):
        raise NotImplementedError("per-block layers_per_block has no single LDM layout here")
    unet = _load_component(pipe_dir / "unet")
    n_in = len(unet)
    with_attn = {int(m[1]) for k in unet if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    for k, v in unet.items():
        out[UNET_PREFIX + _unet_key(k, lpb, with_attn)] = v

    vae_cfg = json.loads((pipe_dir / "vae" / "config.json").read_text())
    vae = _load_component(pipe_dir / "vae")
    n_in += len(vae)
    for k, v in vae.items():
        ldm_key = _vae_key(k, len(vae_cfg["up_block_types"]))
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the LDM VAE's attention projections are 1×1 convolutions
        out[VAE_PREFIX + ldm_key] = v

    # CLIPTextModel's own keys, under text_model. (newer transformers save them without it).
    text_encoder = _load_component(pipe_dir / "text_encoder")
    n_in += len(text_encoder)
    for k, v in text_encoder.items():
        out[CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v

    if len(out) != n_in:
        raise AssertionError(f"{n_in - len(out)} tensor(s) mapped onto the same LDM key")
    return {k: v.contiguous() for k, v in out.items()}
