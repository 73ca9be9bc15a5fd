"""scripts/golden.py: the record matches its plan, the comparison's verdicts, and record/check on one step."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import golden  # noqa: E402

RECORD = ROOT / "benchmarks/results/golden.json"


def test_record_is_of_this_plan():
    """Every step of the plan is in the committed record with the same command, and every item comes from one:
    a changed plan needs a new record."""
    rec = json.loads(RECORD.read_text())
    plan = {s.name: s for s in golden.plan()}
    assert rec["about"]["steps"] == {n: shlex.join(golden.cmdline(s)) for n, s in plan.items()}
    assert {v["step"] for v in rec["items"].values()} == {n for n, s in plan.items() if s.collect}


def test_verdicts(tmp_path):
    number = {"kind": "number", "value": 1.5}
    assert golden.compare("x", number, number, None, tmp_path) == ("same", "")
    assert golden.compare("x", number, {**number, "value": 1.5 + 1e-7}, None, tmp_path)[0] == "float-order"
    assert golden.compare("x", number, {**number, "value": 1.5001}, None, tmp_path)[0] == "DIFFERS"
    assert golden.compare("x", number, None, None, tmp_path)[0] == "MISSING"
    png = {"kind": "png", "sha256": "a", "pixels": "p", "pixel_sum": 10}
    assert golden.compare("x.png", png, {**png, "sha256": "b"}, None, tmp_path) == \
        ("DIFFERS", "same pixels, other PNG bytes (metadata)")
    assert golden.compare("x.png", png, {**png, "sha256": "b", "pixels": "q"}, None, tmp_path)[0] == "DIFFERS"
    w = {"kind": "tensors", "sha256": "a", "tensors": 2, "numel": 10, "max_abs": 0.5, "sum": 0.1, "abs_sum": 3.0}
    assert golden.compare("w", w, {**w, "sha256": "b", "sum": 0.1 + 1e-9}, None, tmp_path)[0] == "float-order"
    assert golden.compare("w", w, {**w, "sha256": "b", "max_abs": 0.51}, None, tmp_path)[0] == "DIFFERS"
    assert golden.compare("w", w, {**w, "sha256": "b", "numel": 11}, None, tmp_path)[0] == "DIFFERS"


def test_weights_against_the_recorded_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    for run, delta in (("old", 0.0), ("same", 1e-7), ("new", 1e-3)):
        (tmp_path / run).mkdir()
        save_file({"a": torch.ones(4) * 0.25 + delta}, str(tmp_path / run / "w.safetensors"))
    old = golden.tensors_item(tmp_path / "old/w.safetensors")
    for run, verdict in (("same", "float-order"), ("new", "DIFFERS")):
        new = golden.tensors_item(tmp_path / run / "w.safetensors")
        status, detail = golden.compare("w.safetensors", old, new, tmp_path / "old", tmp_path / run)
        assert status == verdict and "max |Δw|" in detail, detail


@pytest.mark.slow
def test_record_then_check_one_step(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts/golden.py"), *map(str, args),
                               "--only", "sample/guidance-1"], capture_output=True, text=True, timeout=600)

    rec = tmp_path / "rec.json"
    r = run("record", "--out", rec, "--work", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    items = json.loads(rec.read_text())["items"]
    assert len(items) == 2 and all(v["kind"] == "png" for v in items.values())
    r = run("check", "--against", rec, "--work", tmp_path / "b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 items: 2 same, 0 float-order, 0 DIFFERS, 0 MISSING" in r.stdout

    data = json.loads(rec.read_text())
    name = sorted(data["items"])[0]
    data["items"][name]["sha256"] = "0" * 64
    rec.write_text(json.dumps(data))
    r = run("check", "--against", rec, "--work", tmp_path / "b")
    assert r.returncode == 1 and "DIFFERS (1)" in r.stdout and name in r.stdout, r.stdout + r.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("not ours")
    r = run("check", "--against", rec, "--work", tmp_path / "c")
    assert r.returncode != 0 and (tmp_path / "c" / "keep.txt").exists()
