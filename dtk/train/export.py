"""What a run shows and leaves: validation images with the method's recommended sampler, and the exported
model directory (weights and dtk.json)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import torch


def validation_settings(run, method):
    from dtk.diffusion.sampling import SamplerSettings

    rec = {"scheduler": "dpm++2m", "steps": 25, "guidance": 7.5, **method.sampler(run)}
    ts = rec.get("timesteps")
    return SamplerSettings(scheduler=rec["scheduler"], steps=len(ts) if ts else int(rec["steps"]),
                           guidance=float(rec["guidance"]), height=run.resolution, width=run.resolution,
                           timesteps=list(ts) if ts else None, consistency=rec.get("consistency"))


def validation_prompts(run) -> list[str]:
    if run.config.validation_prompts:
        return list(run.config.validation_prompts)
    captions = getattr(run.data, "captions", None)
    pool = captions() if callable(captions) else [run.data[i]["caption"] for i in range(min(len(run.data), 64))]
    return list(dict.fromkeys(c for c in pool if c))[:4] or [""]


@torch.no_grad()
def validate(state) -> None:
    """A grid of validation images with the method's recommended sampler (EMA weights when kept)."""
    from PIL import Image

    from dtk.diffusion.sampling import Request, decode, denoise, to_uint8
    from dtk.io import write_grid
    from dtk.seeds import derive_seed

    run, method, ema, out, step = state.run, state.method, state.ema, state.out, state.step
    unet = run.raw_unet
    unet.eval()
    try:
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            prompts = validation_prompts(run)
            requests = [Request(prompt=p, seed=derive_seed(run.config.seed, i)) for i, p in enumerate(prompts)]
            with run.accelerator.autocast():  # trained fp32 weights beside frozen half-precision ones
                latents = denoise(run.model, validation_settings(run, method), requests)
            images = to_uint8(decode(run.model, latents))
    finally:
        unet.train()
    write_grid(out / "validation" / f"step-{step:08d}.png", [Image.fromarray(a) for a in images], len(images))


def export_model(state, seconds: float, last: dict) -> dict:
    """The model directory: weights (LoRA or UNet) and dtk.json, which is written last. Returns the run's
    summary record."""
    import shutil

    from dtk.diffusion.lora import LORA_FILE, save_kohya, save_lora
    from dtk.io import run_record, write_json

    run, method, ema, out, step, seen = state.run, state.method, state.ema, state.out, state.step, state.seen
    config, unet = run.config, run.raw_unet
    files, manifest = [], {}
    with ema.swapped() if ema is not None and method.export_ema else contextlib.nullcontext():
        if config.full:
            tmp = out / ".unet.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                unet.save_pretrained(str(tmp), safe_serialization=True)
            except BaseException:   # a failed export (a full disk) leaves no temporary folder behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(out / "unet", ignore_errors=True)
            os.replace(tmp, out / "unet")
            manifest["unet"] = "unet"
            files += [f"unet/{p.name}" for p in (out / "unet").iterdir()]
        elif config.export_format == "kohya":
            save_kohya(out / "lora-kohya.safetensors", unet)
            manifest["loras"] = [{"path": "lora-kohya.safetensors", "scale": 1.0}]
            files.append("lora-kohya.safetensors")
        else:
            save_lora(out, unet, run.family, metadata={"method": method.name})
            manifest["loras"] = [{"path": LORA_FILE, "scale": 1.0}]
            files.append(LORA_FILE)
    base = run.model.ref.spec
    base_path = Path(base).expanduser()
    if base != "demo" and base_path.exists():
        base = str(base_path.resolve())  # so the model dir works from any directory
    summary = {"steps": step, "examples_seen": seen, "seconds": round(seconds, 1),
               "processes": run.accelerator.num_processes, "final": last}
    args = {k: v for k, v in asdict(config).items() if k != "extra"}
    write_json(out / "dtk.json", run_record(
        method.name, {**args, **config.extra}, kind="model", base_model=base, sampler=method.sampler(run),
        method=method.describe(), data=run.data.describe(), training=summary, files=files, **manifest))
    result = {"out": str(out), "model": str(out), "steps": step, "examples_seen": seen,
              "loss": last.get("loss"), "seconds": round(seconds, 1)}
    return result
