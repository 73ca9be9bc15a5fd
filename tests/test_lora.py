"""LoRA files: dtk's diffusers layout and kohya layout apply the adapter at alpha/rank, exactly."""

import pytest
import torch

from dtk.train.config import DEFAULT_LORA_TARGETS


def _peft_unet(model_dir, rank, alpha, seed=0):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    # every module dtk trains by default (on SDXL linear_1/2 also match add_embedding, the pooled/size MLP)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                target_modules=list(DEFAULT_LORA_TARGETS)))
    return unet


def _images(model_dir, unet=None, loras=()):
    from dtk.diffusion.loading import load_model, resolve_model
    from dtk.diffusion.lora import apply_loras
    from dtk.diffusion.sampling import Request, SamplerSettings, generate

    model = load_model(resolve_model(str(model_dir)), torch.device("cpu"), torch.float32)
    if unet is not None:
        model.pipe.unet = unet
    apply_loras(model, list(loras))
    settings = SamplerSettings("ddim", 3, 3.0, 16, 16)
    return generate(model, settings, [Request("a red circle", 1), Request("b", 2, "neg")])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_lora_reproduces_the_trained_adapter(family, tiny_sd, tiny_sdxl, tmp_path):
    from safetensors import safe_open

    from dtk.diffusion.lora import save_kohya, save_lora

    model_dir = tiny_sd if family == "sd" else tiny_sdxl
    unet = _peft_unet(model_dir, rank=4, alpha=32)  # scale alpha/rank = 8: the classic 8x trap
    reference = _images(model_dir, unet=unet)
    base = _images(model_dir)
    assert (reference - base).abs().max() > 1e-3  # the adapter does something

    diffusers_file = save_lora(tmp_path / "d", unet, family)
    with safe_open(str(diffusers_file), "pt") as f:
        meta = f.metadata()
    assert (meta["dtk.lora.rank"], meta["dtk.lora.alpha"]) == ("4", "32")
    # dtk fuses LoRAs into the weights: equal to the unfused adapter up to float rounding (an alpha/rank error
    # would be off by the size of the update, ~0.4 here)
    assert (_images(model_dir, loras=[(diffusers_file, 1.0)]) - reference).abs().max() < 2e-3, "diffusers file"

    kohya_file = save_kohya(tmp_path / "k.safetensors", unet)
    with safe_open(str(kohya_file), "pt") as f:
        keys = list(f.keys())
        assert float(f.get_tensor([k for k in keys if k.endswith(".alpha")][0])) == 32.0
    assert all(k.startswith("lora_unet_") for k in keys)
    assert (_images(model_dir, loras=[(kohya_file, 1.0)]) - reference).abs().max() < 2e-3, "kohya file"

    # a LoRA scale multiplies the update: scale 0 is the base model
    assert torch.allclose(_images(model_dir, loras=[(kohya_file, 0.0)]), base, atol=1e-6)
