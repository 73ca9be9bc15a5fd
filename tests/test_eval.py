"""dtk eval on tiny models: outputs, metric identities, the prompt benchmark, bad input."""

import json

import pytest
from PIL import Image


@pytest.mark.slow
def test_eval_outputs_and_identities(run_dtk, tiny_sd, tmp_path):
    out = tmp_path / "ev"
    # the model is its own teacher and baseline, with its own sampler: FD-teacher is 0 at the teacher's 25 steps,
    # every image ties with the baseline's (win rate ½), consistency with itself at the top is 1
    r = run_dtk("eval", "--model", tiny_sd, "--teacher", tiny_sd, "--baseline", tiny_sd,
                "--steps", "25,1", "--num-images", "6", "--out", out)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["steps"] for row in rows] == [1, 25]
    top = rows[1]
    assert top["fd_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert top["consistency"] == pytest.approx(1.0)
    assert all(row["win_rate"] == 0.5 for row in rows)
    assert rows[0]["fd_teacher"] > 1.0 and rows[0]["consistency"] < 1.0
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and rows[0]["fd_real"] > 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["benchmark"] == "shapes-v1" and saved["noise_floor"] > 0 and saved["rows"] == rows
    assert Image.open(out / "plot.png").size[0] > 400
    grid = Image.open(out / "grid-tiny-sd.png")
    assert grid.size[1] == 2 * 16  # one row per step count
    assert "| model | steps | accuracy |" in (out / "eval.md").read_text()
    assert "FD-real" in r.stderr  # the human table


@pytest.mark.slow
def test_markdown_on_stdout_and_deterministic(run_dtk, tiny_sd, tmp_path):
    args = ("eval", "--model", tiny_sd, "--teacher", tiny_sd, "--steps", "2", "--num-images", "4", "--format", "md")
    a = run_dtk(*args, "--out", tmp_path / "a")
    b = run_dtk(*args, "--out", tmp_path / "b")
    assert a.exit_code == 0, a.stderr
    assert a.stdout.startswith("| model | steps |") and "noise floor" in a.stdout
    assert "FD-real" not in a.stderr   # the table once, on stdout (not also the stderr one)
    assert a.stdout == b.stdout


def test_shape_classes_benchmark_for_pixel_models(run_dtk, tiny_pixel_classes, tiny_sd, tmp_path):
    import shutil

    from dtk.demo.pixel import CLASSES

    model = tmp_path / "pixel"
    shutil.copytree(tiny_pixel_classes, model)
    (model / "dtk.json").write_text(json.dumps({"kind": "model", "classes": CLASSES,
                                                "sampler": {"scheduler": "ddim", "steps": 25}}))
    r = run_dtk("eval", "--model", model, "--teacher", model, "--steps", "2,25", "--num-images", "8",
                "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows[1]["fd_teacher"] == pytest.approx(0.0, abs=1e-6) and rows[0]["fd_teacher"] > 0
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["fd_real"] > 0 for row in rows)
    saved = json.loads((tmp_path / "ev/eval.json").read_text())
    assert saved["benchmark"] == "shape-classes-v1" and saved["noise_floor"] > 0
    r = run_dtk("eval", "--model", model, "--model", tiny_sd, "--teacher", model, "--out", tmp_path / "ev2")
    assert r.exit_code == 2 and "is not a pixel model like the teacher" in r.stderr
    r = run_dtk("eval", "--model", tiny_pixel_classes, "--teacher", tiny_pixel_classes, "--out", tmp_path / "ev3")
    assert r.exit_code == 2 and "evaluated on the shapes classes" in r.stderr


def test_prompt_benchmark_with_clip(run_dtk, tiny_sd, tmp_path):
    from tiny_models import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog on a sofa\n")
    real = tmp_path / "real"
    real.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(real / f"{i}.png")
    r = run_dtk("eval", "--model", tiny_sd, "--teacher", tiny_sd, "--prompts", prompts, "--real-dir", real,
                "--clip-model", clip, "--steps", "1,2", "--num-images", "4", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert all("clip_score" in row and row["fd_real"] >= 0 for row in rows)


@pytest.mark.parametrize("args,expected", [
    (["--model", "nope/nothing"], "no hub model"),
    (["--steps", "0,2"], "--steps"),
    (["--steps", "a"], "--steps"),
    (["--num-images", "1"], "--num-images"),
])
def test_bad_input(run_dtk, tmp_path, args, expected):
    out = tmp_path / "ev"
    r = run_dtk("eval", *args, "--out", out)
    assert r.exit_code == 2, r.stderr
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
