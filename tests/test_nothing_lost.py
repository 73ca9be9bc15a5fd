"""Nothing lost, whatever happens: one writer per --out, --overwrite that sets aside and puts back, outputs
kept apart from inputs, signals acted on at safe points."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import dtk_subprocess


@pytest.fixture(scope="module")
def quick_sd_pairs(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "sd"
    r = dtk_subprocess("reflow-pairs", "--model", tiny_sd, "--num", 8, "--pairs-per-shard", 4, "--steps", 2,
                       "--out", out, "a red circle", "a blue square")
    assert r.returncode == 0, r.stderr
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# ------------------------------------------------------------------ reflow-pairs --overwrite


def test_reflow_pairs_overwrite_puts_the_old_pairs_back_when_it_fails(run_dtk, tiny_sd, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    args = ("reflow-pairs", "--model", tiny_sd, "--steps", "2", "--pairs-per-shard", "2", "--out", out, "a", "b", "c")
    r = run_dtk(*args)
    assert r.exit_code == 0, r.stderr
    before = snapshot(out)
    import dtk.pairs

    real, calls = dtk.pairs._write_shard, []

    def dies_after_one(*a, **k):   # a full disk (or SIGTERM) while the second shard is written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(dtk.pairs, "_write_shard", dies_after_one)
    r = run_dtk(*args[:-3], "--seed", "5", "--overwrite", "a", "b", "c")
    assert r.exit_code == 1 and len(calls) == 2
    assert snapshot(out) == before   # the old pairs, whole, and nothing of the failed run
    assert not list(out.glob(".replaced*"))


def test_reflow_pairs_never_writes_into_another_commands_result(run_dtk, tiny_sd, tmp_path):
    model = tmp_path / "model"
    r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", model, "x")
    assert r.exit_code == 0, r.stderr
    before = snapshot(model)
    r = run_dtk("reflow-pairs", "--model", tiny_sd, "--steps", "2", "--out", model, "a")
    assert r.exit_code == 2 and "holds a finished sample result (dtk.json)" in r.stderr, r.stderr
    assert snapshot(model) == before


# ------------------------------------------------------------------ set aside, put back


def test_a_killed_drop_or_a_newer_checkpoint_is_never_put_back(tmp_path):
    """SIGKILL while --overwrite deleted the set-aside result, or after the new run's first checkpoint but
    before the drop: the next run must not put the old result over the new checkpoints."""
    from dtk.io import Replacing, recover_set_aside

    def folder():
        out = tmp_path / "run"
        (out / "checkpoints" / "step-00000008").mkdir(parents=True)
        (out / "checkpoints" / "step-00000008" / "state.json").write_text("old")
        (out / "dtk.json").write_text(json.dumps({"files": ["w.safetensors"]}))
        (out / "w.safetensors").write_text("old weights")
        return out

    def newest(out):
        found = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                 if (p / "state.json").exists()] if (out / "checkpoints").is_dir() else []
        return max(found, default=-1)

    out = folder()
    Replacing(out, names=("checkpoints",), owner={"checkpoint_step": -1}).set_aside()
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)   # the new run's first checkpoint ...
    (out / "checkpoints" / "step-00000002" / "state.json").write_text("new")   # ... then SIGKILL, no drop
    recover_set_aside(out, progressed=lambda owner: newest(out) > owner.get("checkpoint_step", -1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (out / "dtk.json").exists() and not list(out.glob(".replaced*"))
    # killed while the set-aside folder was being deleted: what is left of it is never put back
    out2 = tmp_path / "run2"
    out2.mkdir()
    (out2 / ".dtk-trash-123").mkdir()
    (out2 / ".dtk-trash-123" / "dtk.json").write_text("{}")
    recover_set_aside(out2)
    assert list(out2.iterdir()) == []
    # a kill before the new run had anything of its own: the old result comes back whole
    out3 = tmp_path / "run3"
    out3.mkdir()
    (out3 / "dtk.json").write_text(json.dumps({"files": ["w.safetensors"]}))
    (out3 / "w.safetensors").write_text("old weights")
    aside = Replacing(out3, names=("checkpoints",), owner={"checkpoint_step": -1}).set_aside()
    assert json.loads((aside.aside / ".owner.json").read_text())["pid"] == os.getpid()   # who set it aside
    recover_set_aside(out3, progressed=lambda owner: newest(out3) > owner.get("checkpoint_step", -1))
    assert (out3 / "w.safetensors").read_text() == "old weights" and (out3 / "dtk.json").exists()


# ------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_holder(run_dtk, tiny_sd, tmp_path):
    import socket

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dtk.io import lock_out; "
                               f"lock_out({str(out)!r}, command='sample'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", out, "x")
        assert r.exit_code == 2 and f"in use by pid {holder.pid} on {socket.gethostname()}" in r.stderr, r.stderr
        r = run_dtk("train-reflow", "--model", tiny_sd, "--data", tmp_path / "none", "--out", out, "--device", "cpu")
        assert r.exit_code == 2 and "in use by pid" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", out, "x")   # the holder is gone
    assert r.exit_code == 0, r.stderr
    assert not (out / ".dtk.lock").exists()   # let go, and removed, at the end


def test_shards_of_one_run_write_side_by_side(run_dtk, tiny_sd, tmp_path):
    from dtk.io import lock_out, release_out

    out = tmp_path / "o"
    assert lock_out(out, ".dtk.shard-00001-of-00002.lock")   # another shard of the same run, writing now
    try:
        r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", out, "--shard", "0/2", "x", "y")
        assert r.exit_code == 0, r.stderr
    finally:
        release_out(out, ".dtk.shard-00001-of-00002.lock")


# ------------------------------------------------------------------ --out apart from inputs


def test_out_may_not_be_inside_or_contain_an_input(run_dtk, tiny_sd, tiny_sd_lora, tmp_path):
    model = tmp_path / "m"
    r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", tmp_path / "s", "x")
    assert r.exit_code == 0
    import shutil

    shutil.copytree(tiny_sd, model)
    before = snapshot(model)
    cases = [
        (["sample", "--model", model, "--out", model, "--overwrite", "x"], "is the input --model"),
        (["sample", "--model", model, "--out", model / "unet", "x"], "lies inside the input --model"),
        (["sample", "--model", model, "--out", tmp_path, "x"], "contains the input --model"),
        (["sample", "--model", tiny_sd, "--lora", tiny_sd_lora, "--out", Path(tiny_sd_lora).parent, "x"],
         "contains the input --lora"),
        (["sample", "--model", tiny_sd, "--out", "/", "x"], "is the root directory"),
        (["reflow-pairs", "--model", model, "--out", model / "pairs", "x"], "lies inside the input --model"),
        (["train-reflow", "--model", model, "--data", tmp_path / "s", "--out", tmp_path / "s" / "run",
          "--device", "cpu"], "lies inside the input --data"),
        (["eval", "--model", model, "--out", model, "--num-images", "2"], "is the input --model"),
    ]
    for args, message in cases:
        r = run_dtk(*args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)
    assert snapshot(model) == before


# ------------------------------------------------------------------ signals


def _signal_after(args, delay, sig=signal.SIGTERM, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dtk", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])   # imports, model loading, sampling
def test_sigterm_during_start_up_of_sample_is_143(tiny_sd, tmp_path, delay):
    code, _, err = _signal_after(["sample", "--model", tiny_sd, "--steps", "2", "--out", tmp_path / "o", "x"], delay)
    assert code in (143, 0), err   # 0: it finished first
    assert "Traceback" not in err and "unexpected" not in err
    if code == 143:
        assert "terminated" in err and not (tmp_path / "o" / "dtk.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])   # imports, model loading, the first steps
def test_sigterm_during_start_up_of_training_is_75(tiny_sd, quick_sd_pairs, tmp_path, delay):
    code, _, err = _signal_after(["train-reflow", "--model", tiny_sd, "--data", quick_sd_pairs, "--out", tmp_path / "r",
                                  "--max-steps", "50", "--device", "cpu", "--lora-rank", "2"], delay)
    assert code == 75, err   # never lost (trained to the end), never a traceback
    assert "Traceback" not in err and "unexpected" not in err


@pytest.mark.slow
def test_sigterm_during_export_finishes_it(run_dtk, tiny_sd, quick_sd_pairs, tmp_path, monkeypatch):
    import dtk.train.export as export

    real = export.export_model

    def export_while_terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)   # Slurm's preemption, just as the export starts
        return real(*a, **k)

    monkeypatch.setattr(export, "export_model", export_while_terminated)
    r = run_dtk("train-reflow", "--model", tiny_sd, "--data", quick_sd_pairs, "--out", tmp_path / "r", "--max-steps", "2",
                "--device", "cpu", "--lora-rank", "2")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "r" / "dtk.json").read_text())["kind"] == "model"


def test_signals_stay_handled_to_the_end_of_the_process():
    """Python's shutdown puts the fatal defaults back; `dtk` leaves SIGUSR1/SIGTERM ignored instead."""
    code = ("import signal, sys\nfrom dtk.cli import main\nsys.argv = ['dtk', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split()[-2:] == ["True", "True"], r.stdout + r.stderr


# ------------------------------------------------------------------ failures named truthfully


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["1e38", "1e20"])
def test_overflowing_weights_are_never_a_good_checkpoint(run_dtk, tiny_sd, quick_sd_pairs, tmp_path, lr):
    """A finite loss with weights at 1e30 (or an update that overflows): the run stops naming the step,
    exit 1, and no checkpoint holds those weights."""
    out = tmp_path / "r"
    r = run_dtk("train-reflow", "--model", tiny_sd, "--data", quick_sd_pairs, "--out", out, "--max-steps", "4",
                "--lr", lr, "--device", "cpu", "--checkpoint-every", "1", "--batch-size", "2")
    assert r.exit_code == 1 and "at step 1;" in r.stderr and "unexpected" not in r.stderr, r.stderr
    assert "no checkpoint was written yet" in r.stderr and not (out / "checkpoints").exists()


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    from dtk.errors import RunFailure
    from dtk.io import atomic_write

    (tmp_path / "x.json").write_text("old")

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFailure, match=r"x\.json: cannot write it \(No space left on device\)"):
        with atomic_write(tmp_path / "x.json", "w") as f:
            Full().write("new")
    assert (tmp_path / "x.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failed_export_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import diffusers

    from dtk.diffusion import lora

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_lora_weights", full_disk)
    monkeypatch.setattr(lora, "lora_layers", lambda *a: {})
    monkeypatch.setattr(lora, "_adapter_config", lambda *a: {})
    with pytest.raises(OSError):
        lora.save_lora(tmp_path, object(), "sd")
    assert list(tmp_path.iterdir()) == []


def test_file_outputs_never_replace_their_inputs(run_dtk, tmp_path):
    """track3d --out over its --depth (or --viz into the frames folder, where it would become a frame), and
    score --out over its --data: refused, the input kept."""
    import numpy as np
    from PIL import Image

    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(frames / f"{i:03d}.png")
    depth = tmp_path / "depth.npz"
    np.savez(depth, depth=np.ones((2, 16, 16), np.float32))
    before = depth.read_bytes()
    for args, message in ((["--out", depth, "--overwrite"], "--out"),
                          (["--out", tmp_path / "t.npz", "--viz", frames / "viz.webp"], "--viz")):
        r = run_dtk("track3d", frames, "--depth", depth, "--fov", "60", *args)
        assert r.exit_code == 2 and message in r.stderr, r.stderr
        assert "is the input --depth" in r.stderr or "lies inside the input VIDEO" in r.stderr, r.stderr
    assert depth.read_bytes() == before and sorted(p.name for p in frames.iterdir()) == ["000.png", "001.png"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "x.png", "prompt": "a"}\n')
    r = run_dtk("score", "--data", manifest, "--out", manifest, "--overwrite")
    assert r.exit_code == 2 and "is the input --data" in r.stderr


def test_fp16_training_on_the_cpu_is_refused(run_dtk, tiny_sd, quick_sd_pairs, tmp_path):
    r = run_dtk("train-reflow", "--model", tiny_sd, "--data", quick_sd_pairs, "--out", tmp_path / "r", "--device", "cpu",
                "--mixed-precision", "fp16")
    assert r.exit_code == 2 and "--mixed-precision fp16: needs a CUDA GPU" in r.stderr, r.stderr


def test_a_run_that_finished_here_while_this_one_loaded_is_not_overwritten(tiny_sd, quick_sd_pairs, tmp_path, monkeypatch):
    """Two trainings started into a new --out: the first finishes while the second loads its model; the
    second must not then train and export over the first's finished model."""
    import dtk.train.engine as engine
    import dtk.train.setup as setup
    from dtk.errors import BadInput
    from dtk.methods.reflow import RectifiedDiffusion
    from dtk.train.config import TrainConfig

    out = tmp_path / "r"
    real = setup.load_model

    def load_while_another_run_finishes(*a, **k):
        out.mkdir()
        (out / "dtk.json").write_text('{"kind": "model", "command": "train-reflow"}')
        return real(*a, **k)

    monkeypatch.setattr(setup, "load_model", load_while_another_run_finishes)
    config = TrainConfig(out=str(out), model=str(tiny_sd), data=str(quick_sd_pairs), max_steps=2, device="cpu",
                         lora_rank=2, batch_size=2)
    with pytest.raises(BadInput, match="holds a finished model"):
        engine.train(RectifiedDiffusion(), config)
    assert json.loads((out / "dtk.json").read_text())["command"] == "train-reflow" and not (out / "checkpoints").exists()


def test_a_sample_that_finished_here_meanwhile_is_not_replaced(run_dtk, tiny_sd, tmp_path, monkeypatch):
    """Two `dtk sample` runs into one new --out: the first finishes while the second loads its model."""
    import dtk.diffusion.compose as compose

    out = tmp_path / "o"
    real = compose.open_model

    def open_while_another_run_finishes(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "dtk.json").write_text('{"command": "sample", "files": ["000000.png"]}')
        (out / "000000.png").write_bytes(b"the other run's image")
        return real(*a, **k)

    monkeypatch.setattr(compose, "open_model", open_while_another_run_finishes)
    r = run_dtk("sample", "--model", tiny_sd, "--steps", "2", "--out", out, "x")
    assert r.exit_code == 2 and "another run finished a result here" in r.stderr, r.stderr
    assert (out / "000000.png").read_bytes() == b"the other run's image"
