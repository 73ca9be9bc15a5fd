"""--device and --dtype, resolved once, the same way for every command."""

from __future__ import annotations

import os

from dtk.errors import BadInput


def resolve_device(spec: str = "auto"):
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            # one GPU per process when a launcher (torchrun, srun) started several on a node
            local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
            return torch.device("cuda", int(local) % torch.cuda.device_count()) if local else torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BadInput(f"--device {spec}: not a device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadInput(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {spec}: MPS is not available on this machine")
    return device


def resolve_dtype(spec: str, device):
    import torch

    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec]
