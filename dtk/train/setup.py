"""Setting a run up: its output folder, the model and what of it is trained, the data, the optimiser."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from dtk.errors import BadInput
from dtk.train.config import DEFAULT_LORA_TARGETS, EXIT_PREEMPTED, TrainConfig
from dtk.train.state import Method, Preempted

log = logging.getLogger("dtk")


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return f


def make_optimizer(params: list, config: TrainConfig):
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BadInput("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def prepare_out(out: Path, config: TrainConfig, main: bool) -> Path | None:
    """Check ``--out`` against ``--resume``/``--overwrite``; the checkpoint to resume from, if any (nothing is
    removed here: see clear_out)."""
    from dtk.train.checkpoint import complete_checkpoints, find_resume

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    finished = (out / "dtk.json").exists()
    if finished and not config.overwrite:
        raise BadInput(f"--out {out}: holds a finished model (dtk.json); pass --overwrite to replace it "
                       "(with --resume auto to continue from its last checkpoint)")
    resume = find_resume(out, config.resume)
    existing = complete_checkpoints(out)
    if resume is None and existing and config.resume is None and not config.overwrite:
        raise BadInput(f"--out {out}: holds checkpoints of an unfinished run (newest {existing[-1].name}); "
                       "pass --resume auto to continue it or --overwrite to start over")
    return resume


def newest_step(out: Path) -> int:
    from dtk.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(out)
    return int(found[-1].name.split("-")[-1]) if found else -1


def clear_out(out: Path, config: TrainConfig, main: bool, resume: Path | None, command: str):
    """The folder made ready; what --overwrite replaces is set aside (``Replacing``), to be dropped once the
    new run has a checkpoint and put back if it stops before. Called once the model, the data, the method's
    settings and the resume state are all accepted."""
    from dtk.io import Replacing, lock_out
    from dtk.train.checkpoint import CHECKPOINTS, remove_stale_temporaries, set_aside_newer

    if not main:
        return None
    lock_out(out, command=command)   # made now if new; held until the run ends
    if prepare_out(out, config, main) != resume:   # another run finished or checkpointed here meanwhile
        raise BadInput(f"--out {out}: another run wrote into it while this one was loading; run again to see what "
                       "it holds")
    replacing = None
    if config.overwrite:
        started_over = () if resume is not None else (CHECKPOINTS, "metrics.jsonl", "validation", "tensorboard")
        # the owner record says how far the folder was: a later checkpoint is this run's own
        owner = {"command": command, "checkpoint_step": newest_step(out) if resume is not None else -1}
        replacing = Replacing(out, names=started_over, owner=owner).set_aside()
    remove_stale_temporaries(out)
    if resume is not None:
        for p in set_aside_newer(out, resume):
            log.warning("train: resuming from %s: the newer checkpoint is kept as %s", resume.name, p)
    return replacing


def load_model(config: TrainConfig, ref, accelerator, weight_dtype):
    """The pipeline of ``ref`` with its LoRAs fused (they become part of the base), frozen, on the device."""
    from dtk.diffusion.compose import open_model

    model = open_model(ref, accelerator.device, torch.float32, config.model_config, guide=False)   # LoRAs fused
    pipe = model.pipe
    unet_config = pipe.unet.config
    if unet_config.get("out_channels", 0) == 2 * unet_config.get("in_channels", -1):
        # a learned-variance UNet (mean and variance channels): every objective here reads one prediction
        raise BadInput(f"--model {config.model}: its UNet predicts a learned variance too ({unet_config.out_channels} "
                       "output channels); dtk trains models with one prediction (ε, v or x₀) per channel")
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
            if name == "vae" and module.config.get("force_upcast", False):
                module.to(torch.float32)  # the SDXL VAE overflows in fp16
            elif name != "unet" or not config.full:
                module.to(weight_dtype)
    model.dtype = weight_dtype
    return model


def add_trainable(unet, config: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Full fine-tuning: every UNet parameter; LoRA: a peft adapter on ``--lora-targets`` (fp32)."""
    if config.full:
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        if not hasattr(unet, "add_adapter"):
            raise BadInput(f"{type(unet).__name__} (a pixel-space model) takes no LoRA here: train it with --full")
        names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
        full_names = {n for n, _ in unet.named_modules()}
        unknown = [t for t in config.lora_targets
                   if t not in names and not any(fn.endswith("." + t) for fn in full_names)]
        present = [t for t in config.lora_targets if t not in unknown]
        # the default set names SD's modules: a pixel UNet2DModel has only some; names given explicitly must exist
        if (unknown and tuple(config.lora_targets) != DEFAULT_LORA_TARGETS) or not present:
            raise BadInput(f"--lora-targets: no module of this UNet is named {', '.join(unknown)}")
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=present))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    unet.train()
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def open_data_for(method: Method, config: TrainConfig, family: str, unet_config: dict, native: int):
    # an unconditional model reads no caption: a plain folder of images is its data
    unconditional = family == "pixel" and not unet_config.get("num_class_embeds")
    return method.open_data(config.data, resolution=config.resolution or native,
                            allow_missing_captions=config.allow_missing_captions or unconditional)


def stop_if_terminated(when: str) -> None:
    """A safe point before training starts: SIGTERM (preemption) stops the run here, to be requeued."""
    from dtk import signals

    if signals.stop_requested():
        raise Preempted(f"SIGTERM {when}; nothing to save yet: requeue and rerun with --resume auto "
                        f"(exit {EXIT_PREEMPTED})")


def launcher_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, srun with torchrun) says it started."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"WORLD_SIZE={text}: not a whole number (set by the launcher)") from None
