"""The training engine: data formats and order, exact resume, preemption, NaN, disk full, DDP, export."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import dtk_subprocess
from dtk.errors import BadInput, RunFailure
from dtk.data.images import open_dataset
from dtk.methods.reflow import RectifiedDiffusion
from dtk.train.config import EXIT_PREEMPTED, TrainConfig
from dtk.train.data import BatchOrder
from dtk.train.engine import Preempted, train


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from dtk.demo.shapes import write_folder

    out = tmp_path_factory.mktemp("shapes") / "images"
    write_folder(out, 8, seed=1)
    return out


@pytest.fixture(scope="module")
def sd_pairs(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "sd"
    r = dtk_subprocess("reflow-pairs", "--model", tiny_sd, "--num", 8, "--pairs-per-shard", 4, "--steps", 3,
                       "--out", out, "a red circle", "a blue square", "a green star")
    assert r.returncode == 0, r.stderr
    return out


def config(tmp_path, model, data, **kw):
    base = dict(out=str(tmp_path), model=str(model), data=str(data), max_steps=4, batch_size=2, lr=1e-3,
                checkpoint_every=2, log_every=1, lora_rank=4, device="cpu")
    return TrainConfig(**{**base, **kw})


def trained(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "trainable.safetensors"))


# ------------------------------------------------------------------ data


def test_batch_order_depends_only_on_the_step():
    one = BatchOrder(10, seed=3, batch=4, grad_accum=1, world=1)
    two = BatchOrder(10, seed=3, batch=2, grad_accum=1, world=2)
    acc = BatchOrder(10, seed=3, batch=1, grad_accum=2, world=2)
    for step in range(6):  # crosses epochs (10 examples, 4 per step)
        assert one.indices(step, 0, 0) == two.indices(step, 0, 0) + two.indices(step, 0, 1)
        assert one.indices(step, 0, 0) == [i for m in range(2) for r in range(2) for i in acc.indices(step, m, r)]
    epoch0 = [i for s in range(5) for i in BatchOrder(10, 3, 2, 1, 1).indices(s, 0, 0)]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))  # a permutation, shuffled
    assert BatchOrder(10, 4, 2, 1, 1).indices(0, 0, 0) != BatchOrder(10, 3, 2, 1, 1).indices(0, 0, 0)


def test_every_image_format_gives_the_same_examples(shapes_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(shapes_dir.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    # JSONL manifest (relative paths resolve against the manifest's folder)
    (shapes_dir / "m.jsonl").write_text("".join(json.dumps({"path": f.name, "prompt": c}) + "\n"
                                               for f, c in zip(files, captions)))
    # parquet, Hugging Face image-feature style
    pq.write_table(pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
                             "caption": captions}), tmp_path / "d.parquet")
    # webdataset: two shards, a brace pattern
    for k in range(2):
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as tf:
            for f, c in list(zip(files, captions))[k * 4:(k + 1) * 4]:
                for name, data in ((f"{f.stem}.png", f.read_bytes()), (f"{f.stem}.txt", c.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    specs = [str(shapes_dir), str(shapes_dir / "m.jsonl"), str(tmp_path / "d.parquet"),
             str(tmp_path / "shard-{000..001}.tar")]
    sets = [open_dataset(s, resolution=32) for s in specs]
    for ds in sets:
        assert len(ds) == 8
        assert [ds[i]["caption"] for i in range(8)] == captions
        assert ds[0]["image"].shape == (3, 32, 32) and -1 <= ds[0]["image"].min() <= ds[0]["image"].max() <= 1
        assert torch.equal(ds[3]["image"], sets[0][3]["image"])


def test_data_errors(shapes_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(shapes_dir.glob("*.png"))[:3]:
        (bare / f.name).write_bytes(f.read_bytes())
    (bare / "000000.txt").write_text("a caption")
    with pytest.raises(BadInput, match=r"2 of 3 images have no .txt caption .*--allow-missing-captions"):
        open_dataset(str(bare), resolution=32)
    ds = open_dataset(str(bare), resolution=32, allow_missing_captions=True)
    assert [ds[i]["caption"] for i in range(3)] == ["a caption", "", ""]
    (bare / ".replaced-dtk.json").mkdir()   # hidden folders are not data
    (bare / ".replaced-dtk.json" / "x.png").write_bytes((bare / "000000.png").read_bytes())
    assert len(open_dataset(str(bare), resolution=32, allow_missing_captions=True)) == 3
    (bare / "000001.png").write_bytes(b"not a png")
    with pytest.raises(BadInput, match="000001.png: not a readable image"):
        ds[1]
    with pytest.raises(BadInput, match="no such file"):
        open_dataset(str(tmp_path / "nope"), resolution=32)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "label": ["y"]}), tmp_path / "p.parquet")
    with pytest.raises(BadInput, match="no caption column"):
        open_dataset(str(tmp_path / "p.parquet"), resolution=32)
    # a null caption in a parquet is missing (not silently the empty prompt)
    png = sorted(shapes_dir.glob("*.png"))[0]
    pq.write_table(pa.table({"image": [png.read_bytes()] * 3, "caption": ["a red circle", None, ""]}),
                   tmp_path / "n.parquet")
    with pytest.raises(BadInput, match=r"1 of 3 images have no caption \(null\) \(e.g. n.parquet row 1\)"):
        open_dataset(str(tmp_path / "n.parquet"), resolution=32)
    ds = open_dataset(str(tmp_path / "n.parquet"), resolution=32, allow_missing_captions=True)
    assert [ds[i]["caption"] for i in range(3)] == ["a red circle", "", ""]


@pytest.mark.parametrize("setting, message", [
    (dict(log_every=0), "--log-every 0"), (dict(weight_decay=-1.0), "--weight-decay -1.0"),
    (dict(lr=float("nan")), "--lr nan: must be a finite number"), (dict(resolution=-16), "--resolution -16"),
    (dict(validate_every=-1), "--validate-every -1"), (dict(max_grad_norm=float("nan")), "--max-grad-norm nan"),
    (dict(lora_alpha=float("inf")), "--lora-alpha inf"), (dict(lora_targets=[]), "--lora-targets")])
def test_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(BadInput, match=message):
        TrainConfig(out="x", **setting).check()


def test_a_toml_array_is_a_comma_list(run_dtk, tmp_path):
    (tmp_path / "c.toml").write_text('lora_targets = ["to_q", "to_v"]\nlog_every = 0\n')
    r = run_dtk("train-reflow", "--config", tmp_path / "c.toml", "--data", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--log-every 0" in r.stderr, r.stderr   # the list was read; the 0 is refused
    config = TrainConfig(out="x", lora_targets="to_q,to_v")
    config.check()
    assert config.lora_targets == ("to_q", "to_v")


# ------------------------------------------------------------------ the loop


class StopAt(RectifiedDiffusion):
    """Sends this process SIGTERM during a given step: what Slurm does before preempting a job."""

    def __init__(self, stop_step, **kw):
        super().__init__(**kw)
        self.stop_step = stop_step

    def loss(self, batch, run):
        if run.step + 1 == self.stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss(batch, run)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tiny_sd, sd_pairs, tmp_path):
    """SIGTERM → checkpoint at the step boundary → resume: the same weights as a run never stopped."""
    kw = dict(grad_accum=2, ema_decay=0.9, lr_schedule="cosine", warmup_steps=1)
    train(RectifiedDiffusion(), config(tmp_path / "a", tiny_sd, sd_pairs, **kw))
    with pytest.raises(Preempted, match="at step 3") as e:
        train(StopAt(3), config(tmp_path / "b", tiny_sd, sd_pairs, **kw))
    assert e.value.exit_code == EXIT_PREEMPTED == 75
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert not (tmp_path / "b/dtk.json").exists()
    with pytest.raises(BadInput, match="unfinished run .*--resume auto"):
        train(RectifiedDiffusion(), config(tmp_path / "b", tiny_sd, sd_pairs, **kw))
    train(RectifiedDiffusion(), config(tmp_path / "b", tiny_sd, sd_pairs, resume="auto", **kw))
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the resumed run's log continues without duplicates
    ema_a = (tmp_path / "a/checkpoints/step-00000004/ema.safetensors").read_bytes()
    assert ema_a == (tmp_path / "b/checkpoints/step-00000004/ema.safetensors").read_bytes()


@pytest.mark.slow
def test_sigusr1_while_loading_checkpoints_at_the_first_step(run_dtk, tiny_sd, sd_pairs, tmp_path):
    """Slurm's SIGUSR1 warning may come before the loop starts: noted (not fatal), then acted on."""
    from dtk import signals

    run_dtk("--version")
    assert signal.getsignal(signal.SIGUSR1) is signals.note   # installed by the CLI
    signals.note(signal.SIGUSR1, None)
    with pytest.raises(Preempted, match="at step 1"):
        train(RectifiedDiffusion(), config(tmp_path, tiny_sd, sd_pairs))
    assert not signals.received


@pytest.mark.slow
def test_resume_errors(tiny_sd, sd_pairs, tmp_path):
    out = tmp_path / "r"
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=2))
    with pytest.raises(BadInput, match="holds a finished model"):
        train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=2))
    broken = out / "checkpoints" / "step-00000009"
    broken.mkdir()
    with pytest.raises(BadInput, match="incomplete checkpoint"):
        train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, resume=str(broken), overwrite=True))
    with pytest.raises(BadInput, match="lora_rank"):
        train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=4, lora_rank=8, resume="auto",
                                           overwrite=True))
    import shutil

    other = shutil.copytree(tiny_sd, tmp_path / "other-sd")   # the same weights, but another model
    with pytest.raises(BadInput, match=r"saved with other model than this run \(model=.*tiny-sd\)"):
        train(RectifiedDiffusion(), config(out, other, sd_pairs, max_steps=4, resume="auto", overwrite=True))
    # refused input removes nothing that --overwrite would replace: the finished model and its checkpoints stay
    with pytest.raises(BadInput, match="no such file"):
        train(RectifiedDiffusion(), config(out, tiny_sd, tmp_path / "missing", max_steps=4, overwrite=True))
    assert (out / "dtk.json").exists() and (out / "checkpoints" / "step-00000002").is_dir()
    assert (out / "metrics.jsonl").exists()
    with pytest.raises(BadInput, match="--lora-rank 0"):
        train(RectifiedDiffusion(), config(tmp_path / "x", tiny_sd, sd_pairs, lora_rank=0))
    with pytest.raises(BadInput, match="--device cuda:1: .*CUDA_VISIBLE_DEVICES"):
        train(RectifiedDiffusion(), config(tmp_path / "x", tiny_sd, sd_pairs, device="cuda:1"))
    # a finished run continues with more steps (and, here, a new learning rate) from its last checkpoint
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=4, resume="auto", overwrite=True, lr=5e-4))
    assert json.loads((out / "dtk.json").read_text())["training"]["steps"] == 4
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 1e-3, 5e-4, 5e-4]
    # resuming from an older checkpoint starts a new branch: the newer one is set aside, not rotated in
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=3, checkpoint_every=1, overwrite=True,
                                       resume=str(out / "checkpoints" / "step-00000002"), keep_checkpoints=1))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004.abandoned", "step-00000009"]  # 9: the incomplete one


class NanAt(RectifiedDiffusion):
    def loss(self, batch, run):
        loss, logs = super().loss(batch, run)
        return (loss * float("nan") if run.step + 1 == 3 else loss), logs


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd, sd_pairs, tmp_path):
    with pytest.raises(RunFailure, match=r"loss is nan at step 3; .*last good checkpoint is .*step-00000002"):
        train(NanAt(), config(tmp_path, tiny_sd, sd_pairs))
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000002"] and (ckpts[0] / "state.json").exists()
    assert all(torch.isfinite(t).all() for t in trained(tmp_path).values())


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanGradientAt(RectifiedDiffusion):
    def loss(self, batch, run):
        loss, logs = super().loss(batch, run)
        return (_NanBackward.apply(loss) if run.step + 1 == 3 else loss), logs   # a finite loss, NaN gradients


def test_nan_gradient_stops_even_without_clipping(tiny_sd, sd_pairs, tmp_path):
    with pytest.raises(RunFailure, match=r"gradient norm is nan at step 3; .*last good checkpoint is .*step-00000002"):
        train(NanGradientAt(), config(tmp_path, tiny_sd, sd_pairs, max_grad_norm=0.0, checkpoint_every=1,
                                      keep_checkpoints=1))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in trained(tmp_path).values())


@pytest.mark.slow
def test_a_failed_overwrite_puts_the_finished_model_back(tiny_sd, sd_pairs, tmp_path):
    """--overwrite sets the finished run aside; a run that fails before its first checkpoint restores it
    whole, one that gets a checkpoint drops it."""
    out = tmp_path / "m"
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=2))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunFailure, match="loss is nan at step 3"):
        train(NanAt(), config(out, tiny_sd, sd_pairs, max_steps=4, checkpoint_every=10, overwrite=True))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before   # dtk.json, the LoRA, the checkpoints and the metrics, byte for byte; nothing else
    with pytest.raises(RunFailure, match="loss is nan at step 3"):
        train(NanAt(), config(out, tiny_sd, sd_pairs, max_steps=4, checkpoint_every=2, overwrite=True))
    assert not (out / "dtk.json").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not list(out.glob(".replaced*"))
    # --overwrite --resume auto already at --max-steps: no new checkpoint, only the export; nothing left aside
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=2, resume="auto", overwrite=True))
    assert (out / "dtk.json").exists() and not list(out.glob(".replaced*"))
    # a run into its own base model's folder is refused before anything is touched
    with pytest.raises(BadInput, match="one of the models it is built on"):
        train(RectifiedDiffusion(), config(tiny_sd, tiny_sd, sd_pairs, overwrite=True))


def test_full_disk_keeps_the_previous_checkpoint(tiny_sd, sd_pairs, tmp_path, monkeypatch):
    import errno

    import dtk.io

    real, calls = dtk.io.save_safetensors, []

    def failing(path, *a, **k):
        calls.append(path)
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(dtk.io, "save_safetensors", failing)
    with pytest.raises(RunFailure, match=r"No space left on device.*previous checkpoint .*step-00000002 is intact"):
        train(RectifiedDiffusion(), config(tmp_path, tiny_sd, sd_pairs))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no temp dir left


@pytest.mark.slow
def test_real_sigterm_saves_a_checkpoint_and_exits_75(tiny_sd, sd_pairs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dtk", "train-reflow", "--model", str(tiny_sd), "--data",
                             str(sd_pairs), "--out", str(out), "--max-steps", "100000", "--checkpoint-every", "100000",
                             "--log-every", "1", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "dtk train-reflow: stopped: checkpoint" in err and "--resume auto" in err and "Traceback" not in err
    (ckpt,) = (out / "checkpoints").iterdir()
    assert (ckpt / "state.json").exists() and stdout == ""


@pytest.mark.slow
def test_two_processes_match_one(tiny_sd, sd_pairs, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch 1 each = 1 process with batch 2."""
    common = ["train-reflow", "--model", str(tiny_sd), "--data", str(sd_pairs), "--max-steps", "3", "--lr", "1e-3",
              "--lora-rank", "4", "--device", "cpu", "--checkpoint-every", "3"]
    one = dtk_subprocess(*common, "--out", tmp_path / "one", "--batch-size", "2")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # without --device cpu: a CPU-only machine joins the launcher's processes on gloo, never N lone copies
    two_args = [a for a in common if a not in ("--device", "cpu")]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "dtk", *two_args, "--out", str(tmp_path / "two"), "--batch-size", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.splitlines()) == 1  # only the main process prints its result
    la = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)  # the same examples, noise and timesteps, the same updates
    # Weights agree to float rounding, except where Adam divides a near-zero gradient by its own
    # near-zero norm (a few LoRA-B entries): there the order of the all-reduce sum shows, bounded
    # by a fraction of the largest possible movement, lr × steps = 3e-3.
    a, b = trained(tmp_path / "one"), trained(tmp_path / "two")
    diffs = torch.tensor([(a[k] - b[k]).abs().max() for k in a])
    assert diffs.max() < 3e-4 and (diffs < 1e-5).float().mean() > 0.9


# ------------------------------------------------------------------ export


def test_exported_lora_loads_in_diffusers_and_matches_dtk(tiny_sd, sd_pairs, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import resolve_model
    from dtk.diffusion.sampling import Request, denoise, settings_for

    out = tmp_path / "lora"
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, lr=3e-2, max_steps=3, lora_alpha=2))
    meta = json.loads((out / "dtk.json").read_text())
    assert meta["sampler"] == {"scheduler": "ddim-trailing", "steps": 2, "guidance": 1.5}
    assert meta["base_model"] == str(Path(tiny_sd).resolve()) and meta["kind"] == "model"

    model = open_model(resolve_model(str(out)), torch.device("cpu"), torch.float32)
    settings = settings_for(model)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = denoise(model, settings, [Request("a red circle", 0)], noise=noise)
    base = denoise(open_model(resolve_model(str(tiny_sd)), torch.device("cpu"), torch.float32), settings,
                   [Request("a red circle", 0)], noise=noise)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ref = pipe("a red circle", latents=noise, num_inference_steps=2, guidance_scale=1.5, output_type="latent").images
    assert torch.allclose(ours, ref, atol=1e-4)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something


@pytest.mark.slow
def test_kohya_export_and_full_export(tiny_sd, sd_pairs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "kohya"
    train(RectifiedDiffusion(), config(out, tiny_sd, sd_pairs, max_steps=2, export_format="kohya", lora_alpha=2))
    with safe_open(str(out / "lora-kohya.safetensors"), "pt") as f:
        keys = set(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "2.0"
    assert alphas == {2.0}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert all(k.startswith("lora_unet_") for k in keys)
    r = dtk_subprocess("sample", "--model", out, "--out", tmp_path / "s", "x")
    assert r.returncode == 0, r.stderr

    full = tmp_path / "full"
    train(RectifiedDiffusion(), config(full, tiny_sd, sd_pairs, max_steps=2, full=True))
    meta = json.loads((full / "dtk.json").read_text())
    assert meta["unet"] == "unet" and (full / "unet/diffusion_pytorch_model.safetensors").exists()
    r = dtk_subprocess("sample", "--model", full, "--out", tmp_path / "s2", "x")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_full_training_on_a_model_with_a_text_encoder_lora_keeps_that_part(tiny_sd, sd_pairs, tmp_path):
    """A full UNet saved from a base with LoRAs holds their UNet part; their text-encoder part still applies."""
    from tiny_models import make_tiny_lora

    from dtk.diffusion.compose import open_model
    from dtk.diffusion.loading import resolve_model

    lora = make_tiny_lora(tiny_sd, tmp_path / "lora", text_encoder=True, seed=4)
    based = tmp_path / "with-lora"
    based.mkdir()
    (based / "dtk.json").write_text(json.dumps({"kind": "model", "base_model": str(tiny_sd),
                                                "loras": [{"path": str(lora), "scale": 1.0}]}))
    full = tmp_path / "full"
    train(RectifiedDiffusion(allow_other_teacher=True), config(full, based, sd_pairs, max_steps=1, full=True))

    def weights(model_dir):
        pipe = open_model(resolve_model(str(model_dir)), torch.device("cpu"), torch.float32).pipe
        return pipe.text_encoder.state_dict(), pipe.unet.state_dict()

    from diffusers import UNet2DConditionModel

    (te_lora, _), (te_full, unet_full), (te_base, _) = weights(based), weights(full), weights(tiny_sd)
    key = next(k for k in te_base if k.endswith("self_attn.q_proj.weight"))
    assert not torch.equal(te_lora[key], te_base[key])                 # the LoRA has a text-encoder part
    assert all(torch.equal(te_full[k], te_lora[k]) for k in te_lora)   # ... kept by the full model
    saved = UNet2DConditionModel.from_pretrained(str(full / "unet")).state_dict()
    assert all(torch.equal(unet_full[k], saved[k]) for k in saved)     # its UNet part is not applied twice


@pytest.mark.slow
def test_bf16_autocast_and_gradient_checkpointing(tiny_sd, sd_pairs, tmp_path):
    """The same run in fp32, under bf16 autocast, and with activations recomputed: close losses."""
    losses = {}
    for name, kw in (("fp32", {}), ("bf16", {"mixed_precision": "bf16"}), ("ckpt", {"gradient_checkpointing": True})):
        train(RectifiedDiffusion(), config(tmp_path / name, tiny_sd, sd_pairs, max_steps=2, **kw))
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses["ckpt"] == pytest.approx(losses["fp32"], rel=1e-5)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05) and losses["bf16"] != losses["fp32"]
    assert all(t.dtype == torch.float32 for t in trained(tmp_path / "bf16").values())
