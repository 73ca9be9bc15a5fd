"""dtk score: rewards on hand-made images, the pairs file, and bad input."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dtk.demo import shapes


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _manifest(tmp_path, items):
    """items: (prompt, attrs-to-render) → PNGs and a manifest like dtk sample's."""
    lines = []
    for i, (prompt, attrs) in enumerate(items):
        path = tmp_path / f"{i:06d}.png"
        shapes.render(attrs, rng=np.random.default_rng(i)).save(path)
        lines.append(json.dumps({"path": str(path), "prompt": prompt, "seed": i}))
    f = tmp_path / "samples.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def _attrs(caption):
    attrs = shapes.parse_caption(caption)
    assert attrs is not None, caption
    return attrs


RED = "a large red circle on a white background"
BLUE_STAR = "a small blue star at the top on a black background"


def test_shapes_reward_orders_correct_above_incorrect(run_dtk, tmp_path):
    wrong_colour = _attrs("a large green circle on a white background")
    wrong_shape = _attrs("a large red square on a white background")
    f = _manifest(tmp_path, [(RED, _attrs(RED)), (RED, wrong_colour), (RED, wrong_shape), (BLUE_STAR, _attrs(BLUE_STAR))])
    r = run_dtk("score", "--data", f, "--reward", "shapes")
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    s = [rec["scores"]["shapes"] for rec in recs]
    assert s[0] == 1.0 and s[3] == 1.0
    assert s[1] < 1.0 and s[2] < 1.0
    assert recs[1]["scores"]["shapes/color1"] == 0.0 and recs[1]["scores"]["shapes/shape1"] == 1.0
    assert recs[2]["scores"]["shapes/shape1"] == 0.0 and recs[2]["scores"]["shapes/color1"] == 1.0
    assert recs[0]["seed"] == 0  # the manifest's fields pass through
    conf = [rec["scores"]["shapes/confidence"] for rec in recs]
    assert all(0.0 < c <= 1.0 for c in conf)
    assert conf[0] > 0.8 and conf[0] > conf[1] and conf[0] > conf[2]  # a wrong attribute has a low probability


def test_shapes_confidence_is_the_mean_probability_of_the_stated_values():
    import torch

    from dtk.demo.classifier import load_classifier, predict, read

    model = load_classifier()
    images = torch.rand(3, 3, 64, 64)
    stated = [shapes.stated_attributes(_attrs(c)) for c in (RED, BLUE_STAR, RED)]
    with torch.no_grad():
        logits = model(images)
    want = []
    for j, attrs in enumerate(stated):
        p = [logits[k][j].softmax(-1)[[str(c) for c in model.labels[k]].index(str(v))].item() for k, v in attrs.items()]
        want.append(sum(p) / len(p))
    preds, conf = read(model, images, stated, batch_size=2)
    assert conf == pytest.approx(want, abs=1e-6)
    assert preds == predict(model, images)


def test_pairs_file_round_trip(run_dtk, tmp_path):
    import pyarrow.parquet as pq

    good, bad = _attrs(RED), _attrs("a large green circle on a white background")
    f = _manifest(tmp_path, [(RED, good), (RED, bad), (RED, good), (BLUE_STAR, _attrs(BLUE_STAR))])
    pairs = tmp_path / "pairs.parquet"
    r = run_dtk("score", "--data", f, "--pairs-out", pairs, "--out", tmp_path / "scored.jsonl",
                "--pair-by", "shapes")
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(pairs).to_pylist()
    assert len(t) == 3  # 3 images of one prompt → 3 pairs; a single image forms none
    assert [row["caption"] for row in t] == [RED] * 3
    assert [(row["label_0"], row["label_1"]) for row in t] == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert Image.open(io.BytesIO(t[0]["jpg_0"])).format == "JPEG"
    assert Image.open(io.BytesIO(t[0]["jpg_1"])).size == (64, 64)
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 4
    # by default the shapes reward ranks by its continuous confidence: two correct images are no tie
    r = run_dtk("score", "--data", f, "--pairs-out", tmp_path / "conf.parquet")
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(tmp_path / "conf.parquet").to_pylist()
    assert [row["label_0"] for row in t][1] in (0.0, 1.0) and "by shapes/confidence" in r.stderr
    # overwriting needs --overwrite
    r = run_dtk("score", "--data", f, "--pairs-out", pairs)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    # a ranking key no reward gives, or no prompt with two images: refused, and nothing written
    for args, message in ((["--pair-by", "shapes/bogus"], "--pair-by shapes/bogus: no such score"),
                          (["--data", _manifest((tmp_path / "one").mkdir() or tmp_path / "one", [(RED, good)])],
                           "no prompt has two or more")):
        r = run_dtk("score", "--data", f, "--pairs-out", tmp_path / "p2.parquet", "--out", tmp_path / "s2.jsonl", *args)
        assert r.exit_code == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "p2.parquet").exists() and not (tmp_path / "s2.jsonl").exists()


def test_stdin_pipe_and_relative_paths(run_dtk, tmp_path, monkeypatch):
    f = _manifest(tmp_path, [(RED, _attrs(RED))])
    rel = [json.dumps({**json.loads(x), "path": "000000.png"}) for x in f.read_text().splitlines()]
    f.write_text("\n".join(rel) + "\n")
    r = run_dtk("score", "--data", f)  # relative to the manifest's directory
    assert r.exit_code == 0, r.stderr
    monkeypatch.chdir(tmp_path)
    r = run_dtk("score", input="\n".join(rel) + "\n")  # stdin: relative to the working directory
    assert r.exit_code == 0 and json.loads(r.stdout)["scores"]["shapes"] == 1.0


def test_clip_family_rewards_with_tiny_weights(run_dtk, tmp_path, tiny_clip):
    from safetensors.torch import save_file

    f = _manifest(tmp_path, [(RED, _attrs(RED)), (BLUE_STAR, _attrs(BLUE_STAR))])
    g = torch.Generator().manual_seed(0)
    mlp = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((16, 32), (32, 8), (8, 8), (8, 4), (4, 1))):
        mlp[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g)
        mlp[f"layers.{i}.bias"] = torch.randn(n_out, generator=g)
    save_file(mlp, str(tmp_path / "aesthetic.safetensors"))
    torch.save(mlp, str(tmp_path / "aesthetic.pth"))
    r = run_dtk("score", "--data", f, "--reward", f"clip={tiny_clip}", "--reward", f"pickscore={tiny_clip}",
                "--reward", f"hpsv2={tiny_clip}", "--reward", f"aesthetic={tmp_path / 'aesthetic.safetensors'}",
                "--clip-model", tiny_clip, "--reward", "shapes")
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x)["scores"] for x in r.stdout.splitlines()]
    for s in recs:
        assert set(s) >= {"clip", "pickscore", "hpsv2", "aesthetic", "shapes"}
        assert all(np.isfinite(v) for v in s.values())
        assert 0 <= s["clip"] <= 100 and -100 <= s["hpsv2"] <= 100
    assert recs[0]["clip"] != recs[1]["clip"]
    # the original .pth state dict gives the same aesthetic scores (loaded with weights_only)
    r2 = run_dtk("score", "--data", f, "--reward", f"aesthetic={tmp_path / 'aesthetic.pth'}", "--clip-model", tiny_clip)
    assert [json.loads(x)["scores"]["aesthetic"] for x in r2.stdout.splitlines()] == \
        pytest.approx([s["aesthetic"] for s in recs], rel=1e-5)
    # a prompt longer than CLIP reads is cut (not an error); PickScore's card truncates at 77 tokens
    long_prompt = [json.dumps({**json.loads(x), "prompt": "red " * 600}) for x in f.read_text().splitlines()]
    (tmp_path / "long.jsonl").write_text("\n".join(long_prompt) + "\n")
    assert run_dtk("score", "--data", tmp_path / "long.jsonl", "--reward", f"clip={tiny_clip}").exit_code == 0
    # an incomplete CLIP (transformers would fill in random weights) and a predictor of another width: refused
    import shutil

    from safetensors.torch import load_file

    partial = shutil.copytree(tiny_clip, tmp_path / "partial-clip")
    weights = partial / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "visual_projection" not in k}, str(weights))
    r = run_dtk("score", "--data", f, "--reward", f"clip={partial}")
    assert r.exit_code == 2 and "an incomplete CLIP checkpoint" in r.stderr and "visual_projection" in r.stderr
    save_file({"layers.0.weight": torch.randn(1, 512), "layers.0.bias": torch.randn(1)}, str(tmp_path / "wide.safetensors"))
    r = run_dtk("score", "--data", f, "--reward", f"aesthetic={tmp_path / 'wide.safetensors'}", "--clip-model", tiny_clip)
    assert r.exit_code == 2 and "an MLP from 512 to 1; this --clip-model gives 16-wide" in r.stderr
    torch.save({"state_dict": mlp}, str(tmp_path / "nested.pth"))   # a Lightning-style checkpoint is unwrapped
    r3 = run_dtk("score", "--data", f, "--reward", f"aesthetic={tmp_path / 'nested.pth'}", "--clip-model", tiny_clip)
    assert [json.loads(x)["scores"]["aesthetic"] for x in r3.stdout.splitlines()] == \
        pytest.approx([s["aesthetic"] for s in recs], rel=1e-5)


def _bad_image_manifest(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"path": str(tmp_path / "x.png"), "prompt": RED}) + "\n")
    return f


@pytest.mark.parametrize("case,expected", [
    ("missing image", "m.jsonl:2: image"),
    ("corrupt image", "not a readable image"),
    ("empty manifest", "no images"),
    ("no prompt", "needs 'path' and 'prompt'"),
    ("weights not cached", "no hub model 'nobody/clip'"),
    ("hpsv2 without weights", "needs weights"),
    ("unknown reward", "unknown reward"),
    ("not a shapes caption", "not a caption of the shapes grammar"),
])
def test_bad_input(run_dtk, tmp_path, case, expected):
    ok = _manifest(tmp_path, [(RED, _attrs(RED))])
    f, extra = tmp_path / "m.jsonl", []
    if case == "missing image":
        f.write_text(ok.read_text() + json.dumps({"path": str(tmp_path / "gone.png"), "prompt": RED}) + "\n")
    elif case == "corrupt image":
        f = _bad_image_manifest(tmp_path)
    elif case == "empty manifest":
        f.write_text("\n")
    elif case == "no prompt":
        f.write_text(json.dumps({"path": str(tmp_path / "000000.png")}) + "\n")
    elif case == "not a shapes caption":
        f.write_text(json.dumps({"path": str(tmp_path / "000000.png"), "prompt": "a cat"}) + "\n")
    else:
        f = ok
        extra = {"weights not cached": ["--reward", "clip=nobody/clip"], "hpsv2 without weights": ["--reward", "hpsv2"],
                 "unknown reward": ["--reward", "beauty"]}[case]
    r = run_dtk("score", "--data", f, *extra, "--pairs-out", tmp_path / "p.parquet")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == "" and not (tmp_path / "p.parquet").exists()


@pytest.mark.slow
def test_waiting_on_a_terminal_says_so(tmp_path):
    """`dtk score` with no --data reads stdin; on a terminal it says so instead of waiting silently."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dtk", "score"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    try:
        os.write(master, b"\x04")   # Ctrl-D: an empty manifest
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert "reading from stdin" in err and "no images in the manifest" in err, err
