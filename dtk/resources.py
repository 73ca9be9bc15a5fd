"""Will it fit? A run's estimated memory, checked against what this process can have, before the run starts.

A run too large for the machine is otherwise killed by the kernel's OOM killer
part-way through, with no message (or fails with a CUDA out-of-memory error
after minutes of work). Commands estimate their peak allocation from their
inputs (sizes, counts) and call ``check_fits`` before any work or output; it
refuses, in one line that gives the estimate and what is available, only what
clearly cannot fit: estimates should be of the order of the real peak, not
upper bounds, and a run that passes can still fail (other processes grow).

Available memory: on the CPU, ``MemAvailable`` of /proc/meminfo (what the kernel
can hand out without swapping), lowered to the room left under a cgroup memory
limit (containers, Slurm and systemd jobs: their limit is not in /proc/meminfo),
counting the cgroup's file cache as reclaimable; without /proc/meminfo, the free
physical pages of ``os.sysconf``. On CUDA: the device's free memory
(``torch.cuda.mem_get_info``) plus what torch's caching allocator holds unused.
Where none of these can be read, nothing is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtk.errors import BadInput

_UNLIMITED = 1 << 60   # cgroup v1 writes "no limit" as a huge number (2^63 rounded down to a page)
_MEMINFO = Path("/proc/meminfo")
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def human(nbytes: float) -> str:
    """1536 → "1.5 KiB"; binary units, as free(1) and nvidia-smi count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """One field of a cgroup's memory.stat (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """The bytes this process's cgroups (v2, or v1's memory controller) let it still allocate: the tightest
    limit minus the usage that is not file cache (reclaimable); None without a limit."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)   # hierarchy-id:controllers:path
        if len(parts) != 3:
            continue
        if parts[1] == "" and (_CGROUP_ROOT / "cgroup.controllers").exists():   # v2, mounted alone
            base, limit_file, usage_file, prefix = _CGROUP_ROOT, "memory.max", "memory.current", ""
        elif "memory" in parts[1].split(","):                                          # v1
            base, limit_file, usage_file, prefix = (_CGROUP_ROOT / "memory", "memory.limit_in_bytes",
                                                    "memory.usage_in_bytes", "total_")
        else:
            continue
        # the process's own group and those above it, up to the mount (a container sees its own as "/")
        here = base / parts[2].lstrip("/")
        for folder in [here, *here.parents]:
            if folder == base.parent:
                break
            limit = _read_int(folder / limit_file)   # None: "max" (v2), or not there
            usage = _read_int(folder / usage_file)
            if limit is not None and limit < _UNLIMITED and usage is not None:
                cache = sum(_stat(folder / "memory.stat", prefix + key) for key in ("inactive_file", "active_file"))
                rooms.append(limit - max(0, usage - cache))
    return max(0, min(rooms)) if rooms else None


def available_memory(device=None) -> int | None:
    """Bytes a run on ``device`` (a torch.device or its name; None: the CPU) can still allocate; None when
    unknown."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if kind != "cpu":
        return None   # mps, xpu: no reliable free-memory query
    avail = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def check_fits(what: str, nbytes: int, device=None) -> None:
    """Refuse (``BadInput``, one line beginning with ``what``: say the option and value that make the run this
    large) a run whose estimated peak of ``nbytes`` exceeds the memory available on ``device`` (None: the
    CPU's). Nothing is checked where the available memory cannot be read."""
    available = available_memory(device)
    if available is not None and nbytes > available:
        kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
        where = "GPU memory" if kind == "cuda" else "memory"
        raise BadInput(f"{what}: needs about {human(nbytes)} of {where}, {human(available)} available")


# What a run holds at once, roughly (an estimate from below: a run it refuses would not have fitted). Measured
# on the demo model (fp32, CPU): about 750 bytes per output pixel of one image; the VAE decoder's top stage
# (its first block_out_channels, several tensors of them alive) is most of it.
VAE_TENSORS = 6          # tensors of the VAE decoder's full-resolution width alive at its peak
HOST_IMAGE_BYTES = 36    # per pixel, the float images and their uint8 copy on the CPU (3 channels)


def image_bytes(unet: dict, vae: dict | None, height: int, width: int, dtype) -> tuple[int, int]:
    """What generating one image takes at its peak, roughly, on the model's device and on the host: the UNet's
    top stage (twice, with CFG) or the VAE decoder's full-resolution stage, whichever is larger, and the
    images' copies on the CPU. ``unet``/``vae``: the models' configs (no VAE: a pixel-space model)."""
    import torch

    per = torch.finfo(dtype).bits // 8
    factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1) if vae else 1
    latent = (height // factor) * (width // factor)
    layers = unet.get("layers_per_block", 2)
    layers = max(layers) if isinstance(layers, (list, tuple)) else int(layers)
    # the UNet's top stage, twice the batch with CFG: its input, hidden and skip tensors
    unet_bytes = 2 * (unet.get("block_out_channels") or [320])[0] * latent * per * (3 + layers)
    vae_bytes = 0
    if vae:
        vae_per = 4 if per == 2 and vae.get("force_upcast", True) else per
        vae_bytes = (vae.get("block_out_channels") or [128])[0] * height * width * vae_per * VAE_TENSORS
    device = max(unet_bytes, vae_bytes) + (unet.get("in_channels", 4) * latent + 3 * height * width) * 4
    return device, HOST_IMAGE_BYTES * height * width
