"""Text conditioning for the UNet, SD and SDXL alike.

SDXL needs, besides the token embeddings of both text encoders, the pooled
embedding of the second and six "time ids" (original size, crop, target
size) everywhere the UNet is called; ``Conditioning`` carries both so callers
never branch on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtk.diffusion.loading import PIXEL, SDXL, LoadedModel
from dtk.errors import BadInput


@dataclass
class Conditioning:
    embeds: torch.Tensor | None               # [B, L, D] encoder hidden states (None: a pixel model)
    pooled: torch.Tensor | None = None        # [B, P] (SDXL)
    time_ids: torch.Tensor | None = None      # [B, 6] (SDXL)
    class_labels: torch.Tensor | None = None  # [B] (class-conditional pixel models)

    def unet_kwargs(self) -> dict:
        if self.embeds is None:
            return {} if self.class_labels is None else {"class_labels": self.class_labels}
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"), join("class_labels"))


@torch.no_grad()
def encode_prompts(model: LoadedModel, prompts: list[str], height: int, width: int) -> Conditioning:
    """Encode each prompt on its own row; an empty prompt is the unconditional one.

    For SDXL models with ``force_zeros_for_empty_prompt`` (the base model), an
    empty prompt encodes to zeros, as diffusers does for the default negative.
    """
    pipe = model.pipe
    if model.family == PIXEL:
        return Conditioning(None, class_labels=class_labels(model, prompts))
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


def class_labels(model: LoadedModel, prompts: list[str]) -> torch.Tensor | None:
    """A pixel model's class labels from the prompts: a class index, or a name its dtk.json lists.
    An unconditional model takes no labels (its prompts must be empty)."""
    n = model.unet.config.get("num_class_embeds")
    if not n:
        if any(prompts):
            raise BadInput(f"--model {model.ref.spec}: an unconditional pixel-space model takes no prompt or class "
                           f"(got {next(p for p in prompts if p)!r})")
        return None
    names = model.classes or []
    labels = []
    for p in prompts:
        if p.strip().isdigit() and int(p) < n:
            labels.append(int(p))
        elif p in names:
            labels.append(names.index(p))
        else:
            known = ", ".join(names) if names else f"0..{n - 1}"
            raise BadInput(f"--model {model.ref.spec}: class {p!r} unknown (classes: {known})")
    return torch.tensor(labels, device=model.device)
