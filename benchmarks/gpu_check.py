#!/usr/bin/env python3
"""GPU check: dtk's CUDA paths in one prepared run, one table. Run it first whenever a GPU is lent:

    timeout 480 python benchmarks/gpu_check.py --out /tmp/gpu_check

It prints a machine line (GPU, driver, torch/CUDA/diffusers/gsplat versions) and one markdown table, one row per
check (check | setting | result | pass | note), writes both to OUT/gpu_check.md (rows also as OUT/gpu_check.json,
the logs of failed checks as OUT/gpu_check-logs.txt; --save also writes benchmarks/results/gpu_check-cuda.md) and
exits 1 if any row is FAIL. Each check runs in its own processes with a time limit: a failure is a FAIL row and
the run goes on. The whole run stays inside --budget seconds (default 420 with CUDA, so that `timeout 480` never
cuts the report; not yet timed on a GPU: the longest part is expected to be the first build of gsplat's CUDA
kernels, which runs in the background from the start).

What it checks:
  (a) every training command and mode — train-reflow on reflow-pairs pairs and --phased 8, distill-pcm
      --adversarial, tune-sct with a reference bank, dpo, train-npo --from-pairs and --self — with
      --mixed-precision bf16 and fp16 on the tiny SD and tiny SDXL configs of tests/configs/, plus tune-sct --full
      on a tiny pixel UNet with dropout 0.1 (its masks come from the device's RNG). All with LoRA rank 4 (--full
      for the pixel UNet), EMA, a cosine schedule with warm-up, lr 1e-3, batch 2. The uninterrupted run of N = 4
      steps must end with finite losses on the GPU; a second one gives the noise floor of the GPU kernels; a third
      gets SIGTERM at the start of step K = 2 (as Slurm preempts), must checkpoint and exit 75, and
      `--resume auto` takes it to step N. Its trained weights, EMA and method state (discriminator, reference
      bank) at step N must equal the uninterrupted run's within 1e-6 + 1e-3 × the largest change of a weight
      after step K + twice the noise floor (exact on the CPU, as tests/test_train.py requires);
  (b) `dtk render-gs --device cuda` (gsplat's CUDA rasteriser) against `--device cpu` (dtk's pure-torch one) on
      one synthetic scene (320×240, a point per pixel on a tilted plane, two frames, cameras identity and
      orbit:10): max/mean |Δ| of the RGB, alpha and depth images, and dtk.json must say backend gsplat. At the
      default opacity 0.99 the α caps never bind: mean RGB and alpha |Δ| ≤ 1/255, max RGB |Δ| ≤ 0.1. At opacity 1
      the documented difference shows (dtk caps α at 0.99 as the original 3DGS, gsplat at 0.999:
      dtk/gs/render.py): one row measures it on the CPU alone (dtk's rasteriser with its cap patched to 0.999),
      and gsplat must match that render within the same limits;
  (c) `dtk sample` and the plain diffusers StableDiffusionPipeline call on an SD1.5-architecture model (UNet,
      CLIP ViT-L text encoder and VAE at full size, random weights from the configs below) at 512×512, fp16,
      dpm++2m 25 steps, CFG 7.5, batch 1: seconds per image (median of 3 after a warm-up image) and peak GPU
      memory of each; FAIL if dtk is more than 1.25× slower;
  (d) one full-size SDXL-architecture LoRA training step (train-reflow on 2 pairs from reflow-pairs, 1024×1024,
      batch 1, rank 16 on the default targets, bf16, --gradient-checkpointing): seconds per step (median of
      steps 2–3) and peak GPU memory, in the training loop and over the whole process (which includes loading).

Without CUDA, or with --cpu, it runs a reduced form (tests/test_gpu_check.py runs it; 1–2 minutes on 2 busy
cores): bf16 autocast on the CPU, N = 2 and K = 1, every mode on tiny SD and train-reflow on tiny SDXL, (c) on
tiny SD at 16×16 in fp32 with 4 steps, (d) on tiny SDXL, (b) at 64×48 with the α-cap row; the fp16 and gsplat
rows say 'skipped: needs CUDA'.
The committed result is benchmarks/results/gpu_check-cpu.md (--save).

How dtk runs: each dtk command is its CLI entry point (`dtk.cli.cli.main` with the command's arguments) in a
process of its own, forked from a server that has imported torch and diffusers once (--launch fork, the
default), or a fresh `python` per command (--launch exec: slower, no shared imports). Inside that process a few
hooks measure without changing behaviour: a SIGTERM sent to itself at the start of step K, the time of each
training step and each generate() call (CUDA synchronised), and the peak memory; for the α-cap row only, dtk's
rasteriser gets gsplat's cap.

A GPU machine without network access and without diffusers or gsplat (an image with torch, transformers,
accelerate and peft, say) gets them as wheels made where pip works, for its Python (3.12 in this example):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 gsplat==1.5.3 importlib_metadata==8.7.0

and there, in the repo root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu_check.py --out /tmp/gpu_check

gsplat 1.5.3 has no prebuilt kernels: it compiles them with nvcc and ninja on first use (minutes), which this
script starts at once in the background; a failed build is a FAIL row with its log.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "tests"), str(ROOT)):   # dtk itself, and the tiny model builders of the test suite
    if _p not in sys.path:
        sys.path.insert(0, _p)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Full-size architectures (random weights: nothing is downloaded). The published configs of
# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0, written out.

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512, scaling_factor=0.18215)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                      prediction_type="epsilon")

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, upcast_attention=False)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                      interpolation_type="linear", use_karras_sigmas=False)
CLIP_VOCAB = 49408   # the real embedding table's size; the prompts use a character tokenizer's first ids

PROMPT = "a photo of an astronaut riding a horse on mars"

# ----------------------------------------------------------------------------------------------------------------
# The child side: what runs in a check's own process


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _memory(result: dict) -> dict:
    import resource

    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        result["cuda_peak"] = max(result.get("cuda_peak_before", 0), torch.cuda.max_memory_allocated())
    return result


def job_dtk(spec: dict) -> dict:
    """The dtk CLI in this process, with measuring hooks: SIGTERM at step K, step and generate() times, memory."""
    import inspect

    import torch

    from dtk.cli import cli
    from dtk.diffusion import sampling
    from dtk.train import engine

    result: dict = {"step_times": [], "generate_times": []}
    stop_at = spec.get("stop_at")
    one_step, train_loop, generate = engine._one_step, engine._train_loop, sampling.generate
    step_signature = inspect.signature(one_step)

    def timed(fn, times: list):
        def call(*args, **kwargs):
            _sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                times.append(time.perf_counter() - t0)
        return call

    timed_one_step = timed(one_step, result["step_times"])

    def timed_step(*args, **kwargs):
        step = step_signature.bind(*args, **kwargs).arguments["state"].step
        if stop_at and step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)   # what Slurm sends before preempting: handled at the step's end
        return timed_one_step(*args, **kwargs)

    def measured_loop(*args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            result["cuda_peak_before"] = torch.cuda.max_memory_allocated()   # loading the model
            torch.cuda.reset_peak_memory_stats()
        try:
            return train_loop(*args, **kwargs)
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                result["cuda_peak_loop"] = torch.cuda.max_memory_allocated()

    engine._one_step, engine._train_loop = timed_step, measured_loop
    sampling.generate = timed(generate, result["generate_times"])
    if spec.get("alpha_max") is not None:   # gsplat's α cap in dtk's rasteriser: the documented difference alone
        import dtk.gs.render as gs_render

        gs_render.ALPHA_MAX = float(spec["alpha_max"])
    print("+ dtk " + " ".join(spec["argv"]), file=sys.stderr, flush=True)
    result["code"] = cli.main(args=list(spec["argv"]), prog_name="dtk", standalone_mode=False)
    return result


def job_build(spec: dict) -> dict:
    """A model directory: a tiny test pipeline, a tiny pixel UNet with dropout, or a full-size SD1.5/SDXL one."""
    from tiny_models import build_tiny_pipeline, build_tiny_pixel_pipeline

    kind, out = spec["kind"], Path(spec["out"])
    if kind in ("tiny-sd", "tiny-sdxl"):
        build_tiny_pipeline(kind, out)
    elif kind == "tiny-pixel-dropout":
        build_tiny_pixel_pipeline(out)
        config = out / "unet" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dropout": 0.1}))   # same weights
    else:
        build_full_size(kind, out, spec["device"])
    return {"code": 0}


def build_full_size(kind: str, out: Path, device: str) -> None:
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tiny_models import write_char_tokenizer

    tok_dir = out.parent / f"{out.name}-tokenizer"
    n = write_char_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    special = dict(vocab_size=CLIP_VOCAB, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):   # random initialisation on the GPU: seconds, not minutes
        if kind == "sd15":
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **special))
            parts = dict(text_encoder=text_encoder)
        else:
            unet, vae = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)
            parts = dict(text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **special)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G, **special)))
    for module in (unet, vae, *parts.values()):
        module.to(dtype)
    if kind == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, tokenizer=tokenizer,
                                       scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                         scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                         force_zeros_for_empty_prompt=True, **parts)
    pipe.save_pretrained(str(out))
    print(f"{kind}: UNet {sum(p.numel() for p in unet.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)


def job_diffusers_sample(spec: dict) -> dict:
    """The plain diffusers pipeline call, with dtk's scheduler of the same name and steps."""
    import torch
    from diffusers import StableDiffusionPipeline

    from dtk.diffusion.schedulers import make_sampler

    device = torch.device(spec["device"])
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[spec["dtype"]]
    pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_sampler(spec["scheduler"], pipe.scheduler.config, spec["steps"], None, device).scheduler
    times = []
    for i in range(spec["images"]):
        _sync()
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=spec["steps"], guidance_scale=spec["guidance"], height=spec["size"],
             width=spec["size"], output_type="np", generator=torch.Generator().manual_seed(i))
        _sync()
        times.append(time.perf_counter() - t0)
    return {"code": 0, "generate_times": times}


def job_probe(spec: dict) -> dict:
    """Can a child of this launcher use CUDA (a forked child after a CUDA init in its parent cannot)?"""
    import torch

    return {"code": 0, "sum": float(torch.ones(4, device=spec["device"]).sum())}


JOBS = {"dtk": job_dtk, "build": job_build, "diffusers-sample": job_diffusers_sample, "probe": job_probe}


def child_entry(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    result: dict = {}
    try:
        result = JOBS[spec["job"]](spec)
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent gets a result and the log
        traceback.print_exc()
        result = {"code": 1, "error": f"{type(e).__name__}: {e}"}
    finally:
        try:
            _memory(result)
        except Exception:  # noqa: BLE001
            pass
        Path(spec["result"]).write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------------
# The parent side: launching children, within a deadline


PRELOAD = ["torch", "numpy", "PIL.Image", "safetensors.torch", "accelerate", "peft", "transformers", "diffusers",
           "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
           "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
           "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
           "transformers.models.clip.modeling_clip", "peft.tuners.lora", "dtk.cli", "dtk.train.engine", "dtk.train.setup",
           "dtk.diffusion.loading", "dtk.diffusion.sampling", "dtk.gs.render", "tiny_models"]


class Launcher:
    def __init__(self, mode: str, work: Path, jobs: int, deadline: float):
        self.mode, self.work, self.deadline = mode, work, deadline
        self.slots = threading.Semaphore(jobs)
        self.count = 0
        self.lock = threading.Lock()
        self.timings: list[tuple[str, float, object]] = []   # (run, seconds, exit code)
        self.ctx = None
        if mode == "fork":
            import multiprocessing as mp

            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, spec: dict, limit: float) -> dict:
        """Run one job in its own process: its result dict, with 'code', 'seconds' and 'log'."""
        with self.lock:
            self.count += 1
            stem = self.work / "runs" / f"{self.count:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:80]}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "log": str(stem) + ".log", "result": str(stem) + ".json"}
        Path(str(stem) + ".spec").write_text(json.dumps(spec))
        with self.slots:
            timeout = min(limit, self.left())
            if timeout < 5:
                return {"code": None, "error": "not run: the time budget (--budget) is used up", "log": spec["log"],
                        "seconds": 0.0}
            t0 = time.monotonic()
            timed_out = False
            if self.ctx is not None:
                p = self.ctx.Process(target=child_entry, args=(str(stem) + ".spec",), daemon=True)
                p.start()
                p.join(timeout)
                if p.is_alive():
                    timed_out = True
                    p.kill()
                    p.join()
                exit_code = p.exitcode
            else:
                try:
                    exit_code = subprocess.run([sys.executable, __file__, "--child", str(stem) + ".spec"],
                                               timeout=timeout, stdin=subprocess.DEVNULL).returncode
                except subprocess.TimeoutExpired:
                    timed_out, exit_code = True, None
            seconds = time.monotonic() - t0
        try:
            result = json.loads(Path(spec["result"]).read_text())
        except (OSError, ValueError):
            result = {"code": None, "error": f"the process ended without a result (exit status {exit_code})"}
        if timed_out:
            result = {**result, "code": None, "error": f"timed out after {seconds:.0f} s"}
        result.update(seconds=seconds, log=spec["log"])
        with self.lock:
            self.timings.append((stem.name, round(seconds, 2), result.get("code")))
        return result


def log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def reason(result: dict) -> str:
    """One line saying why a run failed: its own error line when it printed one."""
    if result.get("error"):
        return result["error"]
    lines = log_tail(result.get("log", ""), 200).splitlines()
    for line in reversed(lines):
        if re.search(r"\berror\b|Error|Traceback", line):
            return line.strip()
    return f"exit status {result.get('code')}" + (f": {lines[-1].strip()}" if lines else "")


# ----------------------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    part: str
    check: str
    setting: str
    result: str
    status: str        # pass | FAIL | skipped
    note: str = ""


class CheckFailed(Exception):
    """A check's own failure: its message is the row's result."""

    def __init__(self, message: str, *logs: str, note: str = ""):
        super().__init__(message)
        self.logs, self.note = [x for x in logs if x], note


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


class Check:
    def __init__(self, args):
        self.args = args
        self.cuda = not args.cpu
        self.work: Path = args.work
        self.device = "cuda" if self.cuda else "cpu"
        self.train_device = "auto" if self.cuda else "cpu"
        self.launcher = Launcher(args.launch, self.work, args.jobs, time.monotonic() + args.budget)
        self.rows: list[Row] = []
        self.logs: list[str] = []
        self.lock = threading.Lock()
        self.pool = cf.ThreadPoolExecutor(max_workers=128)   # threads wait; --jobs bounds processes
        self.prepared: dict[str, cf.Future] = {}
        self.steps, self.stop = (4, 2) if self.cuda else (2, 1)
        self.gsplat_build = self.gsplat_proc = None

    # --- bookkeeping

    def add(self, row: Row, logs=()) -> None:
        with self.lock:
            self.rows.append(row)
            for path in logs:
                self.logs.append(f"==== {row.check} [{row.setting}]: {path}\n{log_tail(path, 60)}\n")
        mark = {"pass": "ok  ", "FAIL": "FAIL", "skipped": "skip"}[row.status]
        print(f"[{mark}] {row.check} [{row.setting}]: {row.result}", file=sys.stderr, flush=True)

    def wanted(self, check: str, setting: str) -> bool:
        return self.args.only is None or re.search(self.args.only, f"{check} {setting}") is not None

    def guarded(self, part: str, check: str, setting: str, fn, *a) -> None:
        """Run one check; any failure becomes its FAIL row, never the end of the run."""
        try:
            if self.args.fail is not None and re.search(self.args.fail, f"{check} {setting}"):
                raise CheckFailed("failed on purpose (--fail)")
            result, note = fn(*a)
            self.add(Row(part, check, setting, result, "pass", note))
        except CheckFailed as e:
            self.add(Row(part, check, setting, str(e), "FAIL", e.note), e.logs)
        except Exception as e:  # noqa: BLE001 - the check's own code broke: still one row
            self.add(Row(part, check, setting, f"{type(e).__name__}: {e}", "FAIL", "error in gpu_check itself"),
                     [])
            traceback.print_exc()

    def run_dtk(self, name: str, argv: list, limit: float = 240, **hooks) -> dict:
        return self.launcher.run(name, {"job": "dtk", "argv": [str(a) for a in argv], **hooks}, limit)

    def dtk_ok(self, name: str, argv: list, limit: float = 240, codes=(0,), **hooks) -> dict:
        r = self.run_dtk(name, argv, limit, **hooks)
        if r.get("code") not in codes:
            raise CheckFailed(f"`dtk {argv[0]}` ({name}): {reason(r)}", r["log"])
        return r

    # --- prepared inputs (each made once, on first need, shared by the checks)

    def need(self, key: str) -> Path:
        with self.lock:
            if key not in self.prepared:
                self.prepared[key] = self.pool.submit(self._prepare, key)
        try:
            return self.prepared[key].result()
        except CheckFailed as e:
            raise CheckFailed(f"needs {key}, which failed: {e}", *e.logs) from None

    def _prepare(self, key: str) -> Path:
        out = self.work / "inputs" / key
        if key in ("tiny-sd", "tiny-sdxl", "tiny-pixel-dropout", "sd15", "sdxl"):
            r = self.launcher.run(f"build {key}", {"job": "build", "kind": key, "out": str(out),
                                                  "device": self.device}, 300)
            if r.get("code") != 0:
                raise CheckFailed(f"build {key}: {reason(r)}", r["log"])
            return out
        if key.startswith("pairs-"):   # pairs-MODEL: reflow-pairs of that model
            kind = key[len("pairs-"):]
            model = self.need(kind)
            extra = ([2, "--steps", 2, "--guidance", 1, "--batch-size", 1, "--pairs-per-shard", 2, "--dtype", "bf16",
                      PROMPT]   # full size: two pairs, little solving; random weights may overflow fp16
                     if kind in ("sd15", "sdxl") else
                     [8, "--steps", 3, "--pairs-per-shard", 4, "a red circle", "a blue square", "a green star"])
            self.dtk_ok(key, ["reflow-pairs", "--model", model, "--device", self.device, "--out", out, "--num", *extra],
                        300)
            return out
        if key == "images":
            from dtk.demo.shapes import write_folder

            write_folder(out, 6, seed=2)
            return out
        if key == "prefs":
            write_preferences(out.with_suffix(".parquet"))
            return out.with_suffix(".parquet")
        raise KeyError(key)

    # --- (a) training: mixed precision and exact resume

    def modes(self):
        """(check, data key, the command's arguments before the shared options, from model and data)."""
        return [
            ("train-reflow", "pairs", lambda m, d: ["train-reflow", "--model", m, "--data", d]),
            ("train-reflow --phased 8", "images",
             lambda m, d: ["train-reflow", "--phased", 8, "--model", m, "--data", d]),
            ("distill-pcm --adversarial", "images",
             lambda m, d: ["distill-pcm", "--teacher", m, "--data", d, "--ddim-steps", 20, "--adversarial",
                           "--adv-lr", "1e-3"]),
            ("tune-sct --bank-size 4", "images",
             lambda m, d: ["tune-sct", "--model", m, "--data", d, "--bank-size", 4, "--double", 2]),
            ("dpo", "prefs", lambda m, d: ["dpo", "--model", m, "--data", d, "--beta", 500]),
            ("train-npo --from-pairs", "prefs", lambda m, d: ["train-npo", "--from-pairs", "--model", m, "--data", d]),
            ("train-npo --self", "images",
             lambda m, d: ["train-npo", "--self", "--teacher-steps", 1, "--model", m, "--data", d]),
        ]

    def training_checks(self) -> list:
        """With CUDA: every mode on both tiny models in bf16 and fp16. The reduced form: bf16, every mode on tiny
        SD and train-reflow on tiny SDXL (the test suite covers the rest on the CPU)."""
        tasks = []
        precisions = ("bf16", "fp16") if self.cuda else ("bf16",)
        plan = [(check, model, data, argv) for check, data, argv in self.modes()
                for model in ("tiny-sd", "tiny-sdxl") if self.cuda or model == "tiny-sd" or check == "train-reflow"]
        plan.append(("tune-sct --full, dropout 0.1", "tiny-pixel-dropout", "images",
                     lambda m, d: ["tune-sct", "--model", m, "--data", d, "--full", "--target", "ect"]))
        for check, model, data, argv in plan:
            for precision in precisions:
                setting = f"{model}, {precision}, {self.steps} steps, SIGTERM in step {self.stop}, --resume auto"
                if self.wanted(check, setting):
                    tasks.append(self.pool.submit(self.guarded, "a", check, setting, self.resume_check, check,
                                                  model, data, argv, precision))
        if not self.cuda and self.wanted("every training check above", "fp16"):
            self.add(Row("a", "every training check above", "fp16", "skipped: needs CUDA", "skipped",
                         "accelerate runs no fp16 autocast on the CPU"))
        return tasks

    def resume_check(self, check, model_kind, data_key, argv, precision):
        model, data = self.need(model_kind), self.need(data_key if data_key != "pairs" else f"pairs-{model_kind}")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{check}-{model_kind}-{precision}").strip("-")
        a, b = self.work / "train" / f"{slug}-a", self.work / "train" / f"{slug}-b"
        common = ["--max-steps", self.steps, "--checkpoint-every", self.stop, "--batch-size", 2, "--lr", "1e-3",
                  "--ema-decay", 0.9, "--lr-schedule", "cosine", "--warmup-steps", 1, "--log-every", 1,
                  "--mixed-precision", precision, "--device", self.train_device]
        if "--full" not in argv(model, data):
            common += ["--lora-rank", 4]
        base = [*argv(model, data), *common]
        ra = self.dtk_ok(f"{slug} uninterrupted", [*base, "--out", a])
        device = ran_on(ra["log"])
        if device is None or device.split(":")[0] != self.device:
            raise CheckFailed(f"ran on {device}, not {self.device}", ra["log"])
        twin = None
        if self.cuda:   # CUDA kernels with atomics are not bitwise reproducible: a second run gives the noise floor
            twin = self.work / "train" / f"{slug}-a2"
            self.dtk_ok(f"{slug} uninterrupted again", [*base, "--out", twin])
        rb = self.run_dtk(f"{slug} stopped", [*base, "--out", b], stop_at=self.stop)
        if rb.get("code") != 75:
            raise CheckFailed(f"SIGTERM in step {self.stop}: expected exit 75 (checkpoint, stopped), got "
                              f"{rb.get('code')}: {reason(rb)}", rb["log"])
        rc = self.dtk_ok(f"{slug} resumed", [*base, "--out", b, "--resume", "auto"])
        why = ("dropout masks come from the device's RNG; a checkpoint keeps torch.get_rng_state(), the CPU's"
               if "dropout" in check else "")
        try:
            result, note = compare_runs(a, b, self.steps, self.stop, [ra["log"], rb["log"], rc["log"]], twin)
        except CheckFailed as e:
            e.note = "; ".join(filter(None, [f"on {device}", why]))
            raise
        return result, "; ".join(filter(None, [f"on {device}", note, why]))

    # --- (b) render-gs: gsplat against dtk's CPU rasteriser

    GSPLAT = "render-gs --device cuda (gsplat) vs --device cpu"
    CAP = "render-gs α cap: dtk's 0.99 vs gsplat's 0.999"

    def render_plan(self) -> tuple[tuple[int, int], str]:
        size = (320, 240) if self.cuda else (64, 48)
        return size, f"{size[0]}×{size[1]}, 2 frames, cameras identity + orbit:10"

    def render_checks(self) -> None:
        """CPU renders of one scene (and, at opacity 1, with gsplat's α cap patched into dtk's rasteriser), then
        gsplat's renders of it compared with them."""
        size, where = self.render_plan()
        scene = write_scene(self.work / "inputs" / "scene.npz", *size)
        renders: dict = {}
        for opacity in ("0.99", "1") if self.cuda else ("0.99",):
            setting = f"{where}, --opacity {opacity}"
            if self.wanted("render-gs --device cpu", setting) or (self.cuda and self.wanted(self.GSPLAT, setting)):
                self.guarded("b", "render-gs --device cpu", setting, self.render_cpu, scene, opacity, renders)
        setting = f"{where}, --opacity 1, --device cpu"
        if self.wanted(self.CAP, setting) or (self.cuda and self.wanted(self.GSPLAT, f"{where}, --opacity 1")):
            self.guarded("b", self.CAP, setting, self.render_cap, scene, renders)
        for opacity in ("0.99", "1"):
            setting = f"{where}, --opacity {opacity}"
            if not self.wanted(self.GSPLAT, setting):
                continue
            if not self.cuda:
                self.add(Row("b", self.GSPLAT, setting, "skipped: needs CUDA", "skipped"))
                continue
            self.guarded("b", self.GSPLAT, setting, self.render_gsplat, scene, opacity, renders)

    def render(self, scene: Path, opacity: str, device: str, alpha_max: float | None = None) -> Path:
        out = self.work / "render" / f"{device}-{opacity}{'' if alpha_max is None else f'-cap{alpha_max}'}"
        self.dtk_ok(f"render-gs {out.name}",
                    ["render-gs", "--tracks", scene, "--camera", "identity", "--camera", "orbit:10", "--depth",
                     "--alpha", "--video-format", "gif", "--opacity", opacity, "--device", device, "--out", out], 180,
                    **({} if alpha_max is None else {"alpha_max": alpha_max}))
        return out

    def render_cpu(self, scene: Path, opacity: str, renders: dict):
        import numpy as np
        from PIL import Image

        out = renders[opacity] = self.render(scene, opacity, "cpu")
        backend = json.loads((out / "dtk.json").read_text()).get("backend")
        colors = np.load(scene)["colors"].reshape(-1, 3)
        first = np.asarray(Image.open(out / "cam0-00000.png"), dtype=np.float64).reshape(-1, 3) / 255
        error = float(np.abs(first - colors).mean())
        if backend != "torch" or error > 0.04:
            raise CheckFailed(f"backend {backend}; identity camera vs the scene's colours: mean |Δ| {error:.4f} "
                              "(want < 0.04)")
        return f"identity camera reproduces the scene: mean |Δ| {error:.4f}", "backend torch (dtk.gs.render)"

    def render_cap(self, scene: Path, renders: dict):
        """The documented difference alone: dtk's rasteriser with its α cap (0.99) and with gsplat's (0.999)."""
        ours = renders.get("1") or self.render(scene, "1", "cpu")
        renders["1"] = ours
        renders["1-cap0.999"] = self.render(scene, "1", "cpu", alpha_max=0.999)
        d = image_differences(ours, renders["1-cap0.999"])
        if d["rgb_max"] == 0:
            raise CheckFailed("the cap made no difference at opacity 1: the patched cap did not take effect")
        return (describe(d), "what gsplat should differ by at opacity 1 (documented in dtk/gs/render.py); "
                             "at opacity ≤ 0.99 the caps never bind")

    def render_gsplat(self, scene: Path, opacity: str, renders: dict):
        if opacity not in renders:
            raise CheckFailed("the CPU render of this setting failed: nothing to compare with")
        waited = self.wait_for_gsplat()
        out = self.render(scene, opacity, "cuda")
        backend = json.loads((out / "dtk.json").read_text()).get("backend")
        if backend != "gsplat":
            raise CheckFailed(f"dtk.json says backend {backend}: gsplat's CUDA kernels did not load "
                              f"({waited})", str(self.work / "gsplat-build.log"))
        d = image_differences(renders[opacity], out)
        text, same = describe(d), d
        if opacity == "1":   # the α caps bind here: compare with dtk's rasteriser at gsplat's cap as well
            if "1-cap0.999" not in renders:
                raise CheckFailed(text + "; no CPU render with gsplat's α cap to compare with")
            same = image_differences(renders["1-cap0.999"], out)
            text += f"; against dtk with gsplat's cap 0.999: {describe(same)}"
        if not (same["rgb_mean"] <= 1 / 255 and same["alpha_mean"] <= 1 / 255 and same["rgb_max"] <= 0.1):
            raise CheckFailed(text + " (limits: mean RGB and alpha |Δ| ≤ 1/255, max RGB |Δ| ≤ 0.1)")
        return text, waited

    def start_gsplat_build(self) -> None:
        """gsplat compiles its CUDA kernels on first use (minutes, once per machine): start that now."""
        import importlib.util

        if importlib.util.find_spec("gsplat") is None:
            self.gsplat_build = "gsplat is not installed (pip install gsplat; see this script's docstring)"
            return

        def build():
            t0 = time.monotonic()
            with open(self.work / "gsplat-build.log", "w") as log:
                self.gsplat_proc = subprocess.Popen(
                    [sys.executable, "-c", "from gsplat.cuda._backend import _C; assert _C is not None, 'no kernels'"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                return self.gsplat_proc.wait(), time.monotonic() - t0

        self.gsplat_build = self.pool.submit(build)

    def wait_for_gsplat(self) -> str:
        if self.gsplat_build is None:
            self.start_gsplat_build()
        if isinstance(self.gsplat_build, str):
            raise CheckFailed(self.gsplat_build)
        log = str(self.work / "gsplat-build.log")
        try:
            code, seconds = self.gsplat_build.result(timeout=max(1.0, self.launcher.left() - 60))
        except cf.TimeoutError:
            self.gsplat_proc.kill()
            raise CheckFailed("gsplat's CUDA kernels were still building when the time budget ran out", log) from None
        if code != 0:
            raise CheckFailed(f"gsplat's CUDA kernels failed to build or load (exit {code})", log)
        return f"gsplat's kernels built or loaded in {seconds:.0f} s"

    # --- (c) sampling speed: dtk sample against the diffusers pipeline call

    SAMPLE = ("dtk sample", "diffusers StableDiffusionPipeline()")

    def sample_plan(self):
        if self.cuda:
            return ("sd15", 512, 25, 4, "fp16",
                    "SD1.5 architecture (random weights), 512×512, fp16, dpm++2m 25 steps, CFG 7.5, batch 1")
        return "tiny-sd", 16, 4, 6, "fp32", "tiny SD (tests/configs), 16×16, fp32, dpm++2m 4 steps, CFG 7.5, batch 1"

    def sample_checks(self) -> None:
        *plan, setting = self.sample_plan()
        results = {}
        for check in self.SAMPLE:
            if self.wanted(check, setting):
                self.guarded("c", check, setting, self.sample_one, check, *plan, results)

    def sample_one(self, check, model_kind, size, steps, images, dtype, results):
        model = self.need(model_kind)
        if check == "dtk sample":
            r = self.dtk_ok("sample", ["sample", "--model", model, "--scheduler", "dpm++2m", "--steps", steps,
                                       "--guidance", 7.5, "--height", size, "--width", size, "--num-per-prompt",
                                       images, "--batch-size", 1, "--seed", 0, "--device", self.device, "--dtype",
                                       dtype, "--out", self.work / "sample-dtk", PROMPT], 300)
            written = len(list((self.work / "sample-dtk").glob("*.png")))
            if written != images or ran_on(r["log"]) != self.device:
                raise CheckFailed(f"wrote {written} images (of {images}) on {ran_on(r['log'])}", r["log"])
        else:
            r = self.launcher.run("diffusers sample", {
                "job": "diffusers-sample", "model": str(model), "device": self.device, "dtype": dtype,
                "scheduler": "dpm++2m", "steps": steps, "guidance": 7.5, "size": size, "images": images}, 300)
            if r.get("code") != 0:
                raise CheckFailed(f"diffusers pipeline: {reason(r)}", r["log"])
        times = r.get("generate_times", [])
        if len(times) != images:
            raise CheckFailed(f"{len(times)} timed images, not {images}", r["log"])
        per_image = median(times[1:])
        results[check] = per_image
        memory = (f"peak {fmt_bytes(r.get('cuda_peak'))} GPU" if self.cuda else
                  f"peak RSS {r.get('maxrss_mb', 0):.0f} MB")
        note = f"median of {images - 1} images after a warm-up one ({times[0]:.2f} s)"
        if check != "dtk sample" and "dtk sample" in results:
            ratio = results["dtk sample"] / per_image
            note += f"; dtk / diffusers = {ratio:.2f}×"
            if self.cuda and ratio > 1.25:
                raise CheckFailed(f"{per_image:.3f} s/image, dtk sample {results['dtk sample']:.3f}: dtk is "
                                  f"{ratio:.2f}× slower (limit 1.25×)")
        return f"{per_image:.3f} s/image, {memory}", note

    # --- (d) one SDXL LoRA step with gradient checkpointing

    SDXL = "SDXL LoRA training step"

    def sdxl_plan(self) -> tuple[str, str]:
        if self.cuda:
            return "sdxl", ("SDXL architecture (random weights), 1024×1024, batch 1, LoRA rank 16 (default targets), "
                            "bf16, --gradient-checkpointing")
        return "tiny-sdxl", "tiny SDXL (tests/configs), 16×16, batch 1, LoRA rank 16, bf16, --gradient-checkpointing"

    def sdxl_step_check(self) -> None:
        model_kind, setting = self.sdxl_plan()
        if self.wanted(self.SDXL, setting):
            self.guarded("d", self.SDXL, setting, self.sdxl_step, model_kind)

    def sdxl_step(self, model_kind):
        model, pairs, out = self.need(model_kind), self.need(f"pairs-{model_kind}"), self.work / "sdxl-step"
        r = self.dtk_ok("sdxl step", ["train-reflow", "--model", model, "--data", pairs, "--out", out,
                                      "--max-steps", 3, "--batch-size", 1, "--gradient-checkpointing",
                                      "--mixed-precision", "bf16", "--checkpoint-every", 1000, "--log-every", 1,
                                      "--device", self.train_device], 300)
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        device = ran_on(r["log"])
        if not all(math.isfinite(x) for x in losses) or device is None or device.split(":")[0] != self.device:
            raise CheckFailed(f"losses {losses} on {device}", r["log"])
        times = r["step_times"]
        per_step = median(times[1:])
        if self.cuda:
            memory = (f"peak {fmt_bytes(r.get('cuda_peak_loop'))} GPU in the loop, {fmt_bytes(r.get('cuda_peak'))} "
                      "in the process")
            note = ("the process peak includes loading: dtk loads the weights in fp32 on the GPU, then casts the "
                    "frozen ones to bf16")
        else:
            memory, note = f"peak RSS {r.get('maxrss_mb', 0):.0f} MB", ""
        return (f"{per_step:.3f} s/step, {memory}",
                f"median of steps 2–3 (step 1: {times[0]:.2f} s); losses finite" + (f"; {note}" if note else ""))

    # --- the whole run

    def run(self) -> int:
        t0 = time.monotonic()
        if self.cuda:
            if any(self.wanted(self.GSPLAT, f"{self.render_plan()[1]}, --opacity {o}") for o in ("0.99", "1")):
                self.start_gsplat_build()
            self.probe()
        tasks = self.training_checks()
        if self.cuda:   # the full-size models (and the SDXL pairs) are made while the tiny ones train
            if any(self.wanted(check, self.sample_plan()[-1]) for check in self.SAMPLE):
                self.pool.submit(self.need, "sd15")
            if self.wanted(self.SDXL, self.sdxl_plan()[1]):
                self.pool.submit(self.need, "pairs-sdxl")
        cf.wait(tasks)
        self.sample_checks()      # alone on the GPU: timings
        self.sdxl_step_check()
        self.render_checks()
        if self.gsplat_proc is not None and self.gsplat_proc.poll() is None:
            self.gsplat_proc.kill()   # not waited for (a check failed before it): nothing may outlast the run
        self.pool.shutdown(wait=True)
        self.seconds = time.monotonic() - t0
        return 1 if any(r.status == "FAIL" for r in self.rows) else 0

    def probe(self) -> None:
        if self.launcher.ctx is None:
            return
        r = self.launcher.run("probe", {"job": "probe", "device": "cuda"}, 120)
        if r.get("code") != 0:   # the fork server touched CUDA: one fresh interpreter per command instead
            print(f"gpu_check: forked children cannot use CUDA ({reason(r)}); using --launch exec",
                  file=sys.stderr)
            self.launcher.ctx = None
            self.args.launch = "exec (fork failed)"


# ----------------------------------------------------------------------------------------------------------------
# Inputs and comparisons


def write_preferences(path: Path) -> Path:
    """Pick-a-Pic-style pairs (caption, jpg_0, jpg_1, label_0), one tie among them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(color) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"caption": f"a red circle {i}", "jpg_0": png((200, 10 * i, 0)), "jpg_1": png((0, 0, 200)),
             "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0][i]} for i in range(6)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), str(path))
    return path


def write_scene(path: Path, w: int, h: int, frames: int = 2) -> Path:
    """One coloured point per pixel on a tilted plane (2–2.75 m), drifting sideways: a tracks npz with colours."""
    import numpy as np

    f = 1.04 * w
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    colors = np.stack([xs / w, ys / h, 0.5 + 0.5 * np.sin(xs / 5.0) * np.cos(ys / 7.0)], -1).reshape(-1, 3)
    depth = 2.0 + 0.5 * xs / w + 0.25 * ys / h
    x, y = (xs + 0.5 - w / 2) * depth / f, (ys + 0.5 - h / 2) * depth / f
    base = np.stack([x, y, depth], -1).reshape(-1, 3)
    xyz = np.stack([base + [0.01 * t, 0, 0] for t in range(frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tracks_xyz=xyz, visibility=np.ones(xyz.shape[:2], bool), intrinsics=[f, f, w / 2, h / 2],
             image_size=[w, h], colors=colors.astype(np.float32))
    return path


def image_differences(a: Path, b: Path) -> dict:
    """Largest and mean absolute differences of the RGB (0–1), alpha (0–1) and depth (mm) images of two renders."""
    import numpy as np
    from PIL import Image

    out = {}
    for kind, pattern, scale in (("rgb", "cam[0-9]-[0-9]*.png", 255.0), ("alpha", "cam[0-9]-alpha-*.png", 255.0),
                                 ("depth", "cam[0-9]-depth-*.png", 1.0)):
        files = sorted(p.name for p in a.glob(pattern))
        if not files or files != sorted(p.name for p in b.glob(pattern)):
            raise CheckFailed(f"the two renders wrote different {kind} images ({len(files)} here)")
        diffs = [np.abs(np.asarray(Image.open(a / n), dtype=np.float64) - np.asarray(Image.open(b / n),
                                                                                     dtype=np.float64)) / scale
                 for n in files]
        out[f"{kind}_max"] = max(float(d.max()) for d in diffs)
        out[f"{kind}_mean"] = float(np.mean([d.mean() for d in diffs]))
    return out


def describe(d: dict) -> str:
    return (f"RGB max {d['rgb_max']:.4f} mean {d['rgb_mean']:.5f}, alpha max {d['alpha_max']:.4f} mean "
            f"{d['alpha_mean']:.5f}, depth max {d['depth_max']:.0f} mm mean {d['depth_mean']:.2f} mm")


def _tensors(obj, prefix=""):
    """Every tensor in a (nested) state: name → tensor."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    found = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            found.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.update(_tensors(v, f"{prefix}.{i}"))
    return found


def compare_runs(a: Path, b: Path, steps: int, stop: int, logs: list = (), twin: Path | None = None
                 ) -> tuple[str, str]:
    """The uninterrupted run A against the run B stopped at step ``stop`` and resumed: finite losses, moved
    weights, the same trained weights, EMA and method state at ``steps``. ``twin``, a second uninterrupted run,
    measures how far two runs of the same settings differ anyway (nondeterministic kernels); the tolerance is
    1e-6 + 1e-3 × the largest change of a trained weight after step ``stop`` + twice that difference."""
    import torch
    from safetensors.torch import load_file

    def ckpt(run: Path, step: int) -> Path:
        return run / "checkpoints" / f"step-{step:08d}"

    def metrics(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    def state(run: Path, step: int) -> dict:
        """Every tensor of a checkpoint that a resume must restore: trained weights, EMA, the method's state."""
        found = {}
        for name in ("trainable", "ema"):
            if (ckpt(run, step) / f"{name}.safetensors").exists():
                found.update({f"{name}:{k}": v for k, v in load_file(str(ckpt(run, step) / f"{name}.safetensors")
                                                                     ).items()})
        if (ckpt(run, step) / "method.pt").exists():
            method = torch.load(str(ckpt(run, step) / "method.pt"), weights_only=True, map_location="cpu")
            found.update({f"method:{k}": v for k, v in _tensors(method).items()})
        return found

    def largest(x: dict, y: dict) -> float:
        if x.keys() != y.keys():
            raise CheckFailed(f"the checkpoints hold different tensors ({sorted(x.keys() ^ y.keys())[:3]})", *logs)
        return max((float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].numel()), default=0.0)

    if not (b / "dtk.json").exists() or not ckpt(b, steps).is_dir():
        raise CheckFailed("the resumed run left no finished model", *logs)
    ma, mb = metrics(a), metrics(b)
    losses_a, losses_b = [m["loss"] for m in ma], [m["loss"] for m in mb]
    if [m["step"] for m in mb] != list(range(1, steps + 1)):
        raise CheckFailed(f"the resumed run logged steps {[m['step'] for m in mb]}", *logs)
    if not all(math.isfinite(x) for x in losses_a + losses_b):
        raise CheckFailed(f"losses not finite: {losses_a} / {losses_b}", *logs)
    skipped = sum(1 for m in ma if not math.isfinite(m.get("grad_norm", 0.0)))
    end_a, end_b = state(a, steps), state(b, steps)
    worst = largest(end_a, end_b)
    trained = {k: v for k, v in end_a.items() if k.startswith("trainable:")}
    moved = largest(trained, {k: v for k, v in state(a, stop).items() if k.startswith("trainable:")})
    noise = largest(end_a, state(twin, steps)) if twin is not None else 0.0
    tolerance = 1e-6 + 1e-3 * moved + 2 * noise
    kinds = {k.split(":")[0] for k in end_a}
    parts = [name for kind, name in (("trainable", "trained weights"), ("ema", "EMA"), ("method", "method state"))
             if kind in kinds]
    loss_gap = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(losses_a[stop:], losses_b[stop:]))
    share = "exact" if worst == 0 else (f"{worst / moved:.1e} of the update after step {stop}" if moved else "n/a")
    result = (f"losses finite ({losses_a[0]:.4g} → {losses_a[-1]:.4g}); resume max |Δ| {worst:.1e} ({share})")
    note = f"compared: {', '.join(parts)}; losses after step {stop} agree to {loss_gap:.1e} (relative)"
    if twin is not None:
        note += f"; two uninterrupted runs differ by {noise:.1e}"
    if skipped:
        note += f"; the fp16 grad scaler skipped {skipped} of {steps} steps"
    if moved == 0:
        raise CheckFailed(result + f"; the weights did not move after step {stop}: nothing was tested", *logs)
    if worst > tolerance:
        raise CheckFailed(result + f" > tolerance {tolerance:.1e}: the resumed run differs" +
                          (f" (two uninterrupted runs: {noise:.1e})" if twin is not None else ""), *logs)
    return result, note


def ran_on(log: str) -> str | None:
    """The device a dtk command said it ran on (its first log line says '... on DEVICE')."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r" on (cuda(?::\d+)?|cpu|mps)\b", text)
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------------------------
# Machine line and report


def machine_line(cuda: bool) -> str:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {version(n)}" for n in ("diffusers", "transformers", "accelerate", "peft", "gsplat"))
    import dtk

    if cuda:
        p = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "?"
        gpu = (f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}), driver {driver}, "
               f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    elif torch.cuda.is_available():
        gpu = f"GPU {torch.cuda.get_device_name(0)} not used (--cpu: reduced CPU form)"
    else:
        gpu = "no GPU (reduced CPU form)"
    return f"{gpu}; torch {torch.__version__}, {libs}, dtk {dtk.__version__}; CPU: {machine()}"


def table(rows: list[Row]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| check | setting | result | pass | note |", "|---|---|---|---|---|"]
    lines += [f"| {cell(r.check)} | {cell(r.setting)} | {cell(r.result)} | {r.status} | {cell(r.note)} |"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="Where gpu_check.md (and .json) go.")
    ap.add_argument("--cpu", action="store_true", help="The reduced CPU form even where CUDA is available.")
    ap.add_argument("--jobs", type=int, default=None,
                    help="Processes at a time [with CUDA: half the CPUs, 2 to 8; on the CPU: the CPUs, at most 2].")
    ap.add_argument("--budget", type=float, default=None,
                    help="Seconds for the whole run; a check still waiting then is a FAIL [420 CUDA, 600 CPU].")
    ap.add_argument("--launch", choices=["fork", "exec"], default="fork",
                    help="fork: children of a server that imported torch once; exec: a fresh python per command.")
    ap.add_argument("--only", default=None, metavar="REGEX", help="Only the checks whose 'check setting' matches.")
    ap.add_argument("--work", type=Path, default=None,
                    help="Where the run's working folder (models, runs, logs) is made [the system's temporary folder].")
    ap.add_argument("--keep", action="store_true", help="Keep the working folder (else it is removed at the end).")
    ap.add_argument("--save", action="store_true", help="Also write benchmarks/results/gpu_check-{cpu,cuda}.md.")
    ap.add_argument("--fail", default=None, help=argparse.SUPPRESS)   # testing: these checks fail on purpose
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_entry(args.child)
        return 0

    import torch

    if not torch.cuda.is_available():
        args.cpu = True
    defaults = {"OMP_NUM_THREADS": "1" if args.cpu else "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # the children too: the reduced form is the CPU's
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.jobs = args.jobs or (min(2, cpus) if args.cpu else min(8, max(2, cpus // 2)))
    args.budget = args.budget or (600.0 if args.cpu else 420.0)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work))   # a fresh one every run

    head = machine_line(not args.cpu)
    print(f"machine: {head}", flush=True)
    check = Check(args)
    try:
        status = check.run()
    finally:
        if args.keep:
            print(f"kept the working folder {args.work}", file=sys.stderr)
        else:
            shutil.rmtree(args.work, ignore_errors=True)
    order = {"a": 0, "b": 1, "c": 2, "d": 3}
    keys = [m[0] for m in check.modes()] + ["tune-sct --full, dropout 0.1"]
    rows = sorted(check.rows, key=lambda r: (order[r.part], keys.index(r.check) if r.check in keys else 99,
                                             r.setting if r.part == "a" else ""))   # b–d keep their run order
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skipped")}
    form = "reduced CPU form" if args.cpu else "CUDA"
    busy = sum(t for _, t, _ in check.launcher.timings)
    summary = (f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skipped']} skipped in "
               f"{check.seconds:.0f} s ({form}, --launch {args.launch}, --jobs {args.jobs}: "
               f"{len(check.launcher.timings)} processes, {busy:.0f} process-seconds)")
    text = table(rows)
    print(text)
    print(summary)
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    body = f"machine: {head}\n\n{text}\n\n{summary}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(f"# GPU check\n\nCommand: `{command}`\n\n{body}")
    (args.out / "gpu_check.json").write_text(json.dumps({"machine": head, "summary": summary,
                                                         "rows": [asdict(r) for r in rows],
                                                         "runs": sorted(check.launcher.timings)}, indent=1))
    if check.logs:
        (args.out / "gpu_check-logs.txt").write_text("\n".join(check.logs))
    if args.save:
        name = "gpu_check-cpu" if args.cpu else "gpu_check-cuda"
        (RESULTS / f"{name}.md").write_text(f"# GPU check ({form})\n\nCommand: `{command}`\n\n{body}")
        print(f"wrote {RESULTS / name}.md", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
