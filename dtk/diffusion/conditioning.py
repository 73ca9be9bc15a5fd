"""Text conditioning for the UNet, SD and SDXL alike.

SDXL needs, besides the token embeddings of both text encoders, the pooled
embedding of the second and six "time ids" (original size, crop, target
size) everywhere the UNet is called; ``Conditioning`` carries both so callers
never branch on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtk.diffusion.loading import SDXL, LoadedModel


@dataclass
class Conditioning:
    embeds: torch.Tensor                      # [B, L, D] encoder hidden states
    pooled: torch.Tensor | None = None        # [B, P] (SDXL)
    time_ids: torch.Tensor | None = None      # [B, 6] (SDXL)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))


@torch.no_grad()
def encode_prompts(model: LoadedModel, prompts: list[str], height: int, width: int) -> Conditioning:
    """Encode each prompt on its own row; an empty prompt is the unconditional one.

    For SDXL models with ``force_zeros_for_empty_prompt`` (the base model), an
    empty prompt encodes to zeros, as diffusers does for the default negative.
    """
    pipe = model.pipe
    if model.family == SDXL:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=embeds.device)
        return Conditioning(embeds, pooled, time_ids.repeat(len(prompts), 1))
    embeds, _ = pipe.encode_prompt(list(prompts), model.device, 1, False)
    return Conditioning(embeds)
