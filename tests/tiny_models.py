"""Tiny random SD-like and SDXL-like pipelines, built from the configs in tests/configs/.

They exercise the same classes and call paths as SD1.5 / SDXL (two text
encoders, pooled embeddings, time ids) in milliseconds on a CPU; the tiny
CogVideoX- and AnimateDiff-class pipelines do the same for video models.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode alphabet: printable stand-ins for all 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_char_tokenizer(out: Path) -> int:
    """A CLIP tokenizer with a character-level vocabulary (no merges): every string tokenizes."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def build_tiny_pipeline(name: str, out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    tok_dir = out.parent / f"{out.name}-tokenizer"
    vocab_size = write_char_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    special = {"vocab_size": vocab_size, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
               "pad_token_id": vocab_size - 1}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **special))
    scheduler_cfg = dict(cfg["scheduler"])
    cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[scheduler_cfg.pop("_class_name")]
    scheduler = cls.from_config(scheduler_cfg)
    if cfg["family"] == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **special))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


def make_tiny_lora(pipe_dir: Path, out_dir: Path, rank: int = 4, alpha: float = 4.0, seed: int = 0,
                   family: str = "sd", text_encoder: bool = False) -> Path:
    """A random (non-zero) LoRA on the UNet attention projections (and with ``text_encoder`` on the first text
    encoder's attention projections too), saved in the diffusers layout."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    extra = {}
    if text_encoder:
        from peft import inject_adapter_in_model
        from transformers import CLIPTextModel

        # peft itself rather than transformers' add_adapter, which transformers 5.24 refuses below peft 0.22
        encoder = CLIPTextModel.from_pretrained(str(pipe_dir / "text_encoder"))
        encoder = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                          encoder)
        extra["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True, **extra)
    return out_dir / "pytorch_lora_weights.safetensors"


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIPProcessor (32 px images, character tokenizer), saved for from_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab_size = write_char_tokenizer(out)
    tokenizer = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    torch.manual_seed(seed)
    special = {"vocab_size": vocab_size, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
               "pad_token_id": vocab_size - 1}
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 77, **special},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(out))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    return out


def build_tiny_pixel_pipeline(out: Path, num_classes: int | None = None, seed: int = 0, out_channels: int = 3) -> Path:
    """A tiny random DDPMPipeline (pixel-space UNet2DModel, 16×16 RGB), optionally class-conditional:
    the layout of diffusers' DDPM checkpoints (google/ddpm-cifar10-32)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=num_classes)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    return out


def build_tiny_cogvideox(out: Path, seed: int = 0, **transformer) -> Path:
    """A tiny CogVideoX-class pipeline from tests/configs/tiny-cogvideox.json, built offline: a T5 whose tokenizer
    is an in-memory Unigram vocabulary (whole words of the config, characters as a fallback; no sentencepiece),
    a 3D transformer (``transformer`` overrides its config), a causal VAE ×4 in space and in time."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    cfg = json.loads((CONFIGS / "tiny-cogvideox.json").read_text())
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in cfg["words"] if len(w) > 1] + [(c, -5.0) for c in chars]
    vocab += [("\u2581" + c, -5.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(T5Config(vocab_size=len(tokenizer), **cfg["text_encoder"])),
        transformer=CogVideoXTransformer3DModel(**{**cfg["transformer"], **transformer}),
        vae=AutoencoderKLCogVideoX(**cfg["vae"]), scheduler=CogVideoXDDIMScheduler(**cfg["scheduler"]))
    pipe.save_pretrained(str(out))
    return out


def build_tiny_animatediff(out: Path, base: Path, seed: int = 0) -> Path:
    """A tiny AnimateDiff-class pipeline from tests/configs/tiny-animatediff.json: the tiny SD pipeline at
    ``base`` with a random motion adapter (its UNet becomes a UNetMotionModel)."""
    import torch
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    cfg = json.loads((CONFIGS / "tiny-animatediff.json").read_text())
    torch.manual_seed(seed)
    pipe = AnimateDiffPipeline.from_pretrained(str(base), motion_adapter=MotionAdapter(**cfg["motion_adapter"]),
                                               local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **cfg["scheduler"])
    pipe.save_pretrained(str(out))
    return out
