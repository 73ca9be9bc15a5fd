"""benchmarks/gpu_check.py: its reduced CPU form passes every row it can run, a failing check is one FAIL row
(the run goes on, exit 1), and the exact-resume comparison catches a resumed run that differs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))


def gpu_check(out: Path, *args: str):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)


def table_rows(markdown: str) -> list[dict]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ") and not ln.startswith("| check |")]
    rows = []
    for line in lines:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(dict(zip(("check", "setting", "result", "pass", "note"), cells)))
    return rows


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    r = gpu_check(out)
    return r, out


@pytest.mark.slow
def test_reduced_form_passes_every_row_it_can_run(reduced):
    r, out = reduced
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.startswith("machine: no GPU (reduced CPU form); torch ")
    markdown = (out / "gpu_check.md").read_text()
    assert "machine: no GPU" in markdown and "diffusers " in markdown and "gsplat " in markdown
    rows = table_rows(markdown)
    saved = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert [(row["check"], row["pass"]) for row in rows] == [(x["check"], x["status"]) for x in saved]
    assert all(row["pass"] in ("pass", "skipped") for row in rows), [row for row in rows if row["pass"] != "pass"]
    assert all(row["result"] == "skipped: needs CUDA" for row in rows if row["pass"] == "skipped")
    training = {(row["check"], row["setting"].split(",")[0]) for row in rows if "--resume auto" in row["setting"]}
    assert training == {("train-reflow", "tiny-sd"), ("train-reflow", "tiny-sdxl"),
                        ("train-reflow --phased 8", "tiny-sd"), ("distill-pcm --adversarial", "tiny-sd"),
                        ("tune-sct --bank-size 4", "tiny-sd"), ("dpo", "tiny-sd"), ("train-npo --from-pairs", "tiny-sd"),
                        ("train-npo --self", "tiny-sd"), ("tune-sct --full, dropout 0.1", "tiny-pixel-dropout")}
    for row in rows:
        if "--resume auto" in row["setting"]:
            assert "resume max |Δ| 0.0e+00 (exact)" in row["result"] and row["note"].startswith("on cpu"), row
    by_check = {row["check"]: row for row in rows}
    assert "method state" in by_check["distill-pcm --adversarial"]["note"]    # the discriminator is compared too
    assert "method state" in by_check["tune-sct --bank-size 4"]["note"]       # ... and the reference bank
    assert by_check["every training check above"]["setting"] == "fp16"
    assert by_check["render-gs --device cpu"]["pass"] == "pass"
    cap = by_check["render-gs α cap: dtk's 0.99 vs gsplat's 0.999"]    # the documented difference, measured
    assert cap["pass"] == "pass" and float(re.search(r"alpha max ([\d.]+)", cap["result"])[1]) > 0
    assert by_check["render-gs --device cuda (gsplat) vs --device cpu"]["pass"] == "skipped"
    for check in ("dtk sample", "diffusers StableDiffusionPipeline()"):
        assert re.match(r"\d+\.\d+ s/image, peak RSS \d+ MB$", by_check[check]["result"]), by_check[check]
    assert "dtk / diffusers = " in by_check["diffusers StableDiffusionPipeline()"]["note"]
    assert re.match(r"\d+\.\d+ s/step, peak RSS \d+ MB$", by_check["SDXL LoRA training step"]["result"])
    assert re.search(r"\d+ passed, 0 failed, \d+ skipped in \d+ s \(reduced CPU form", markdown)


@pytest.mark.slow
def test_a_failing_check_is_one_fail_row_and_the_run_goes_on(tmp_path):
    r = gpu_check(tmp_path, "--only", "dtk sample|--device cuda", "--fail", "dtk sample")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert [(row["check"], row["pass"]) for row in rows] == [
        ("render-gs --device cuda (gsplat) vs --device cpu", "skipped")] * 2 + [("dtk sample", "FAIL")]
    assert rows[2]["result"] == "failed on purpose (--fail)"
    assert "[skip] render-gs --device cuda" in r.stderr.split("[FAIL] dtk sample")[1]   # checked after the failure
    assert "0 passed, 1 failed, 2 skipped" in r.stdout


def write_run(run: Path, steps: dict, losses: list) -> Path:
    """A fake finished training folder: checkpoints {step: {tensor name: tensor}}, metrics and dtk.json."""
    from safetensors.torch import save_file

    for step, tensors in steps.items():
        folder = run / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "trainable.safetensors"))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": x, "grad_norm": 1.0}) + "\n"
                                               for i, x in enumerate(losses)))
    (run / "dtk.json").write_text("{}")
    return run


def test_resume_comparison(tmp_path):
    import torch

    from gpu_check import CheckFailed, compare_runs

    w1, w2 = torch.zeros(3), torch.tensor([1e-3, -1e-3, 2e-3])
    write_run(tmp_path / "a", {1: {"w": w1}, 2: {"w": w2}}, [0.5, 0.4])
    write_run(tmp_path / "same", {1: {"w": w1}, 2: {"w": w2.clone()}}, [0.5, 0.4])
    result, note = compare_runs(tmp_path / "a", tmp_path / "same", 2, 1)
    assert "(exact)" in result and "compared: trained weights;" in note
    write_run(tmp_path / "off", {1: {"w": w1}, 2: {"w": w2 + 1e-4}}, [0.5, 0.41])
    with pytest.raises(CheckFailed, match="the resumed run differs"):
        compare_runs(tmp_path / "a", tmp_path / "off", 2, 1)
    # the same difference between two uninterrupted runs (nondeterministic kernels) raises the tolerance
    write_run(tmp_path / "twin", {1: {"w": w1}, 2: {"w": w2 - 1e-4}}, [0.5, 0.4])
    result, note = compare_runs(tmp_path / "a", tmp_path / "off", 2, 1, twin=tmp_path / "twin")
    assert "two uninterrupted runs differ by 1.0e-04" in note
    write_run(tmp_path / "still", {1: {"w": w1}, 2: {"w": w1.clone()}}, [0.5, 0.5])
    with pytest.raises(CheckFailed, match="did not move"):
        compare_runs(tmp_path / "still", tmp_path / "still", 2, 1)
    write_run(tmp_path / "nan", {1: {"w": w1}, 2: {"w": w2}}, [0.5, float("nan")])
    with pytest.raises(CheckFailed, match="not finite"):
        compare_runs(tmp_path / "a", tmp_path / "nan", 2, 1)
