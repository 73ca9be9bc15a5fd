"""Self-NPO (2025): a negative model from the model itself, no preference labels.

The student starts as the model; its teacher is the EMA of the student (the
engine's ``--ema-decay``, 0.999). Per example: a real latent x₀ is noised to a
timestep t of a 25-step DDIM grid; the teacher runs ``teacher_steps`` DDIM steps
down the grid with *negative* guidance ε_c + w(ε_c − ε_u) (w = −1: the plain
unconditional prediction, SD1.x; w = −5: away from the prompt, SDXL), reaching
x_t' and its guided estimate x̂₀; x_t' is re-noised forward to a random s > t'
(q(x_s | x_t')), and the student's *conditional* x̂₀ at s is pulled to the
teacher's x̂₀ with a pseudo-Huber loss (c = 0.001). The student thus learns,
under the prompt, what the model produces without (or against) it: a negative
model for the unconditional branch of CFG (`dtk sample --npo`).

With 0 teacher steps and w = 0 the target is the teacher's plain conditional
denoising of x_t (tested).
"""

from __future__ import annotations

import contextlib

import torch

from dtk.diffusion.denoiser import Denoiser, Guided
from dtk.diffusion.schedule import timestep_grid
from dtk.errors import BadInput, check_number
from dtk.methods.defaults import SELF_NPO, TRAINING
from dtk.methods.common import check_empty_prompt_prob, drop_captions, pseudo_huber
from dtk.train.state import Method, Run

GRID = 25   # the teacher's trailing DDIM grid: 999, 959, …, 39


@torch.no_grad()
def teacher_target(teacher: Guided, x_t, t_index, cond, uncond, steps: int):
    """The teacher's negatively guided DDIM from grid[t_index] down ``steps`` grid steps (per example);
    returns (x_t', t', x̂₀) with x̂₀ the guided estimate at the last point reached."""
    grid = torch.tensor(timestep_grid(GRID, len(teacher.denoiser.schedule)), device=x_t.device)
    last = len(grid) - 1
    x, idx = x_t, t_index
    for _ in range(steps):
        nxt = (idx + 1).clamp(max=last)
        x, idx = teacher.ddim_step(x, grid[idx], grid[nxt], cond, uncond), nxt
    t_end = grid[idx]
    x0_hat, _ = teacher(x, t_end, cond, uncond)
    return x, t_end, x0_hat


def self_npo_loss(student: Denoiser, teacher: Guided, x0: torch.Tensor, captions: list[str], encode, rng, *,
                  teacher_steps: int, huber_c: float, empty_prompt_prob: float,
                  teacher_weights=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-NPO: the student's conditional x̂₀ at a re-noised point of the negatively guided teacher's path is
    pulled to the teacher's guided x̂₀. ``teacher_weights()`` is the context in which ``teacher`` holds the
    teacher's weights (the EMA swapped into the student's UNet). Returns (loss, t')."""
    schedule = student.schedule
    t_index = rng.randint(0, GRID - teacher_steps)
    grid = torch.tensor(timestep_grid(GRID, len(schedule)), device=x0.device)
    alpha, sigma = schedule.alpha_sigma(grid[t_index])
    x_t = alpha * x0 + sigma * rng.randn(*x0.shape[1:])
    captions = list(captions)
    if empty_prompt_prob > 0:  # the empty prompt's branch is where the negative model serves
        captions = drop_captions(captions, rng.rand() >= empty_prompt_prob)
    cond, uncond = encode(captions), encode([""] * len(x0))
    with teacher_weights():
        x_tp, t_p, target = teacher_target(teacher, x_t, t_index, cond, uncond, teacher_steps)
    last = len(schedule) - 1
    s = rng.randint((t_p + 1).clamp(max=last), last + 1)   # s > t' (s = t' only at the very top)
    x_s = schedule.renoise(x_tp, t_p, s, rng.randn(*x0.shape[1:]))
    x0_student, _ = student(x_s, s, cond)
    return pseudo_huber(x0_student, target, huber_c), t_p


class SelfNPO(Method):
    name = "train-npo"
    training_defaults = TRAINING["train-npo --self"]
    data_kinds = ("images", "prompts")

    def __init__(self, *, teacher_guidance: float | None = None, teacher_steps: int = SELF_NPO["teacher_steps"],
                 huber_c: float = SELF_NPO["huber_c"], negative: str = SELF_NPO["negative"],
                 empty_prompt_prob: float = SELF_NPO["empty_prompt_prob"]):
        if teacher_steps < 0 or teacher_steps >= GRID:
            raise BadInput(f"--teacher-steps {teacher_steps}: must be in 0..{GRID - 1} (the {GRID}-step DDIM grid)")
        if negative not in ("ema", "student"):
            raise BadInput(f"--negative {negative}: choose ema (the teacher) or student")
        check_number("--teacher-guidance", teacher_guidance)
        check_number("--huber-c", huber_c, above=0)
        self.teacher_guidance, self.teacher_steps, self.huber_c = teacher_guidance, teacher_steps, huber_c
        check_empty_prompt_prob(empty_prompt_prob)
        self.negative, self.empty_prompt_prob = negative, empty_prompt_prob
        self.export_ema = negative == "ema"
        self.prompt_latents: torch.Tensor | None = None

    def open_data(self, spec: str, *, resolution: int, allow_missing_captions: bool = False):
        if spec.endswith(".txt"):
            return PromptList(spec)
        return super().open_data(spec, resolution=resolution, allow_missing_captions=allow_missing_captions)

    def check_data(self, data, run: Run) -> None:
        if run.family == "pixel":
            raise BadInput(f"--model {run.model.ref.spec}: Self-NPO trains text-to-image (SD/SDXL) models")
        if run.config.ema_decay <= 0:
            raise BadInput("--ema-decay 0: Self-NPO's teacher is the EMA of the student (e.g. --ema-decay 0.999)")

    def setup(self, run: Run) -> None:
        if self.teacher_guidance is None:
            self.teacher_guidance = -5.0 if run.family == "sdxl" else -1.0
        if isinstance(run.data, PromptList):
            self.prompt_latents = run.data.cached_latents(run)

    def loss(self, batch: dict, run: Run):
        x0 = self.prompt_latents[batch["index"]].to(run.device) if "index" in batch else run.latents(batch)
        # the teacher: the EMA weights in the same UNet
        teacher = Guided(run.online, self.teacher_guidance, convention="lcm", dtype=run.weight_dtype)
        loss, t_p = self_npo_loss(run.student, teacher, x0, batch["caption"], run.encode_prompts, run.rng,
                                  teacher_steps=self.teacher_steps, huber_c=self.huber_c,
                                  empty_prompt_prob=self.empty_prompt_prob, teacher_weights=run.ema.swapped)
        return loss, {"t_prime": float(t_p.float().mean())}

    def describe(self) -> dict:
        return {"paper": "Self-NPO (negative preference optimisation from the model itself, 2025)",
                "teacher_guidance": self.teacher_guidance, "teacher_steps": self.teacher_steps,
                "huber_c": self.huber_c, "negative": self.negative, "empty_prompt_prob": self.empty_prompt_prob,
                "grid": GRID}


class PromptList:
    """A prompt list (one per line) as data: the images are the model's own samples, made once at setup."""

    kind = "prompts"

    def __init__(self, spec: str):
        from pathlib import Path

        from dtk.data.prompts import read_prompts

        if not Path(spec).expanduser().is_file():
            raise BadInput(f"--data {spec}: no such file")
        self.name = spec
        try:   # the reader of `dtk sample --prompts`: comments and blank lines skipped
            self.prompts = [item.prompt for item in read_prompts((), str(Path(spec).expanduser()))]
        except BadInput as e:
            raise BadInput(f"--data {e}") from None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.prompts[i], "index": i}

    def captions(self) -> list[str]:
        return list(self.prompts)

    def describe(self) -> dict:
        return {"data": self.name, "format": "prompt list (the model's own samples)", "examples": len(self)}

    def cached_latents(self, run: Run) -> torch.Tensor:
        """The samples, made once by the main process and kept in OUT (a resumed run reads them back)."""
        import hashlib
        import json
        from pathlib import Path

        from safetensors.torch import load_file, save

        from dtk.io import atomic_write

        key = hashlib.sha256(json.dumps([run.model.ref.spec, run.config.seed, run.resolution, self.prompts])
                             .encode()).hexdigest()
        path = Path(run.config.out) / "prompt-samples.safetensors"
        if run.accelerator.is_main_process and not (path.exists() and _cache_key(path) == key):
            latents = self.sample_latents(run)
            path.parent.mkdir(parents=True, exist_ok=True)   # setup runs before the engine makes OUT
            with atomic_write(path, "wb") as f:
                f.write(save({"latents": latents.contiguous()}, metadata={"key": key}))
        run.accelerator.wait_for_everyone()
        return load_file(str(path))["latents"]

    @torch.no_grad()
    def sample_latents(self, run: Run, batch: int = 16) -> torch.Tensor:
        """The model's sample of every prompt (its recommended sampler; seed from (--seed, index))."""
        from dtk.diffusion.sampling import Request, denoise, settings_for
        from dtk.seeds import derive_seed

        settings = settings_for(run.model, height=run.resolution, width=run.resolution)
        out = []
        for start in range(0, len(self.prompts), batch):
            requests = [Request(p, derive_seed(run.config.seed, f"self-npo-{start + k}"))
                        for k, p in enumerate(self.prompts[start:start + batch])]
            out.append(denoise(run.model, settings, requests).float().cpu())
        return torch.cat(out)


def _cache_key(path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key")
    except Exception:  # noqa: BLE001 - a damaged cache is made again
        return None
