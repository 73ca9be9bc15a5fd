"""A model as a command uses it: the pipeline (``dtk.diffusion.loading``) with its LoRAs applied, the guide model
of a guided consistency sampler beside it, and an NPO negative branch (``dtk.diffusion.npo``) attached."""

from __future__ import annotations

from dtk.diffusion.loading import LoadedModel, ModelRef, load_model, resolve_guide
from dtk.diffusion.lora import apply_loras
from dtk.diffusion.npo import attach_npo


def open_model(ref: ModelRef, device, dtype, model_config: str | None = None,
               extra_loras: list | tuple = (), guide: str | bool | None = None, npo: str | None = None,
               npo_scale: float = 1.0) -> LoadedModel:
    """Load a model and apply the LoRAs its dtk.json names plus ``extra_loras``; with a guide model
    (``guide``, else the one its consistency sampler names; ``False``: none) that one is loaded beside it."""
    model = load_model(ref, device, dtype, model_config)
    apply_loras(model, list(ref.loras) + list(extra_loras))
    apply_loras(model, ref.text_encoder_loras, text_encoders_only=True)
    if guide is None:
        guide = (ref.sampler.get("consistency") or {}).get("guide")
    if guide:
        guide_ref = resolve_guide(guide, ref)
        model.guide = load_model(guide_ref, device, dtype)
        apply_loras(model.guide, list(guide_ref.loras))
        apply_loras(model.guide, guide_ref.text_encoder_loras, text_encoders_only=True)
    if npo:
        attach_npo(model, npo, npo_scale)
    return model
