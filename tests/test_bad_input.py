"""Issue #23 "Nothing lost", input validation: text that is not UTF-8, malformed dtk.json fields, launcher
variables that make no shard, runs too large for the machine, relative base models, and unreadable training
images are each refused as bad input (exit 2, one line naming the file or variable), before any output and,
where the inputs allow, before the model loads."""

import io
import json
import tarfile

import pytest
from PIL import Image

import dtk.resources as resources
from dtk.errors import BadInput
from helpers import refused

RED = "a large red circle on a white background"


def image_bytes(fmt="PNG", size=48, color=(200, 30, 30)) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)   # noisy: the encoded file is long enough to cut
    arr = (rng.random((size, size, 3)) * 60 + color).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def memory(monkeypatch):
    """16 GiB available, whatever this machine has (the size checks are deterministic)."""
    monkeypatch.setattr(resources, "available_memory", lambda device=None: 16 << 30)


# ---------------------------------------------------------------------------
# 1. text that is not UTF-8


def test_a_caption_sidecar_that_is_not_utf8_names_the_file(tmp_path):
    from dtk.data.images import open_dataset

    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 circle\n")
    with pytest.raises(BadInput, match=r"^--data .*a\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)$"):
        open_dataset(str(tmp_path), resolution=16)


def test_a_manifest_that_is_not_utf8_names_its_line(run_dtk, tmp_path):
    from dtk.io import read_manifest

    (tmp_path / "a.png").write_bytes(image_bytes())
    good = json.dumps({"path": str(tmp_path / "a.png"), "prompt": "a"}).encode()
    bad = good.replace(b'"a"}', b'"caf\xe9"}')
    (tmp_path / "m.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(BadInput, match=r"m\.jsonl:2: not UTF-8 text \(byte 0xe9 at column \d+\)$"):
        read_manifest(str(tmp_path / "m.jsonl"))
    refused(run_dtk("score", "--data", tmp_path / "m.jsonl"), "m.jsonl:2: not UTF-8 text")
    refused(run_dtk("dpo", "--data", tmp_path / "m.jsonl", "--out", tmp_path / "o"), "m.jsonl:2: not UTF-8 text")
    refused(run_dtk("score", "--data", "-", input=good + b"\n" + bad + b"\n"), "<stdin>:2: not UTF-8 text")
    # a byte-order mark (Windows editors) is not an error
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert len(read_manifest(str(tmp_path / "bom.jsonl"))) == 1


def test_a_prompt_file_that_is_not_utf8(run_dtk, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    refused(run_dtk("sample", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "o"), "p.txt: not UTF-8 text")


@pytest.mark.slow
def test_stdin_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Under the C locale Python lets other bytes through stdin as surrogates: the prompt reached the tokenizer
    ("unexpected TypeError" after the model loaded). Stdin is UTF-8, strictly, as every file is."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENC"))}
    r = subprocess.run([sys.executable, "-m", "dtk", "sample", "--prompts", "-", "--out", str(tmp_path / "o")],
                       input=b"caf\xe9\n", capture_output=True, env={**env, "LC_ALL": "C"}, timeout=300)
    assert r.returncode == 2, r.stderr
    assert b"<stdin>: not UTF-8 text" in r.stderr and not (tmp_path / "o").exists()


def test_json_files_of_a_model_that_are_not_utf8_or_not_objects(run_dtk, tmp_path):
    from dtk.diffusion.loading import resolve_model
    from dtk.io import read_json

    model = tmp_path / "m"
    model.mkdir()
    (model / "dtk.json").write_bytes(b'{"kind": "model",\n "base_model": "caf\xe9"}')
    refused(run_dtk("sample", "--model", model, "x", "--out", tmp_path / "o"), "dtk.json:2: not UTF-8 text (byte 0xe9)")
    (model / "dtk.json").unlink()
    (model / "model_index.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(BadInput, match=r"model_index\.json:1: not UTF-8 text"):
        resolve_model(str(model))
    (model / "model_index.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"model_index\.json: expected a JSON object, got list"):
        resolve_model(str(model))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(BadInput, match="dir.json: cannot read it"):
        read_json(tmp_path / "dir.json")


def test_webdataset_and_parquet_captions_that_are_not_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtk.data.images import open_dataset
    from dtk.data.preferences import open_preferences

    png = image_bytes()
    for ext, caption in (("txt", b"caf\xe9"), ("json", b'{"caption": "caf\xe9"}')):
        with tarfile.open(tmp_path / f"{ext}.tar", "w") as tf:
            for name, data in (("000.png", png), (f"000.{ext}", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with pytest.raises(BadInput, match=rf"--data .*{ext}\.tar:000\.{ext}: not UTF-8 text \(byte 0xe9"):
            open_dataset(str(tmp_path / f"{ext}.tar"), resolution=16)
    # a string column with bytes that are not UTF-8 (pyarrow writes them unchecked from a binary view)
    captions = pa.array([b"fine", b"caf\xe9"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"image": [png, png], "caption": captions}), tmp_path / "d.parquet")
    with pytest.raises(BadInput, match=r"d\.parquet: row 1: column 'caption' is not UTF-8 text"):
        open_dataset(str(tmp_path / "d.parquet"), resolution=16)
    pq.write_table(pa.table({"caption": captions, "jpg_0": [png, png], "jpg_1": [png, png], "label_0": [1.0, 0.0]}),
                   tmp_path / "p.parquet")
    with pytest.raises(BadInput, match=r"p\.parquet: row 1: column 'caption' is not UTF-8 text"):
        open_preferences(str(tmp_path / "p.parquet"), resolution=16)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_bytes(b'{"_data_files": [{"filename": "caf\xe9"}]}')
    with pytest.raises(BadInput, match=r"state\.json: not a datasets state file \(UnicodeDecodeError"):
        open_preferences(str(ds), resolution=16)


# ---------------------------------------------------------------------------
# 2. malformed fields of a model dir's dtk.json, a scored manifest, an aesthetic predictor


def model_dir(tmp_path, **fields):
    from dtk.demo import DEMO_MODEL_DIR

    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "lora.safetensors").write_bytes(b"")
    (path / "dtk.json").write_text(json.dumps({"kind": "model", "base_model": str(DEMO_MODEL_DIR), **fields}))
    return path


@pytest.mark.parametrize("fields, field", [
    ({"loras": "lora.safetensors"}, "'loras' is 'lora.safetensors', expected a list"),
    ({"loras": 5}, "'loras' is 5"),
    ({"loras": ["lora.safetensors"]}, "'loras[0]' is 'lora.safetensors', expected an object with a \"path\""),
    ({"loras": [{"path": "lora.safetensors", "scale": "x"}]}, "'loras[0].scale' is 'x', expected a finite number"),
    ({"loras": [{"path": "lora.safetensors", "scale": True}]}, "'loras[0].scale' is True"),
    ({"sampler": "fast"}, "'sampler' is 'fast', expected an object"),
    ({"sampler": {"steps": "4"}}, "'sampler.steps' is '4', expected a whole number"),
    ({"sampler": {"guidance": "high"}}, "'sampler.guidance' is 'high', expected a number"),
    ({"sampler": {"timesteps": [999, "x"]}}, "'sampler.timesteps' is [999, 'x']"),
    ({"sampler": {"consistency": {"sigma_max": "big"}}}, "'sampler.consistency'"),
    ({"base_model": 123}, "'base_model' is 123, expected a path or hub id"),
    ({"unet": ["unet"]}, "'unet' is ['unet'], expected a path"),
    ({"classes": "circle"}, "'classes' is 'circle', expected a list of class names"),
])
def test_malformed_model_fields_name_the_file_and_the_field(tmp_path, fields, field):
    from dtk.diffusion.loading import resolve_model

    path = model_dir(tmp_path, **fields)
    with pytest.raises(BadInput) as e:
        resolve_model(str(path))
    assert f"{path / 'dtk.json'}: {field}" in str(e.value)


def test_a_malformed_sampler_is_refused_before_the_model_loads(run_dtk, tmp_path, monkeypatch):
    import dtk.diffusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = model_dir(tmp_path, sampler="fast")
    refused(run_dtk("sample", "--model", path, "x", "--out", tmp_path / "o"), "dtk.json: 'sampler' is 'fast'")
    assert not (tmp_path / "o").exists()
    # null values are "not given" (the defaults apply), as an empty field would be
    ref = loading.resolve_model(str(model_dir(tmp_path, sampler={"guidance": None, "steps": 4})))
    assert ref.sampler["steps"] == 4 and "guidance" in ref.sampler   # the demo's own


def test_scores_that_are_not_an_object(run_dtk, tmp_path):
    from dtk.io import read_manifest
    from dtk.data.preferences import open_preferences

    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "s.jsonl").write_text(json.dumps({"path": str(tmp_path / "a.png"), "prompt": "a", "scores": "x"}) + "\n")
    with pytest.raises(BadInput, match=r"s\.jsonl:1: 'scores' is str, not an object of reward"):
        read_manifest(str(tmp_path / "s.jsonl"))
    with pytest.raises(BadInput, match="'scores' is str"):
        open_preferences(str(tmp_path / "s.jsonl"), resolution=16)
    refused(run_dtk("score", "--data", tmp_path / "s.jsonl"), "s.jsonl:1: 'scores' is str")   # was a TypeError


@pytest.mark.slow
def test_a_truncated_aesthetic_predictor_is_refused_before_clip_loads(tmp_path):
    import torch
    from safetensors.torch import save_file

    from dtk.eval.rewards import load_reward

    save_file({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    # the CLIP named is missing too: the predictor, a few KB, is read first and named
    with pytest.raises(BadInput, match=r"^--reward aesthetic=.*cut\.safetensors: not a readable safetensors file"):
        load_reward(f"aesthetic={tmp_path / 'cut.safetensors'}", torch.device("cpu"), clip_model=str(tmp_path / "none"))
    with pytest.raises(BadInput, match="--clip-model"):
        load_reward(f"aesthetic={tmp_path / 'a.safetensors'}", torch.device("cpu"), clip_model=str(tmp_path / "none"))


# ---------------------------------------------------------------------------
# 3. launcher variables that make no shard


@pytest.mark.parametrize("env, message", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 with WORLD_SIZE=2: ranks run from 0 to 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 with WORLD_SIZE=2"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one': not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be at least 1"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}, "SLURM_PROCID=3 with SLURM_NTASKS=2"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID='x': not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4.0"}, "SLURM_ARRAY_TASK_COUNT='4.0': not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "a"},
     "SLURM_ARRAY_TASK_MIN='a'"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "0"},
     "SLURM_ARRAY_TASK_STEP=0: must be at least 1"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"},
     "SLURM_ARRAY_TASK_ID 3: not MIN + k*STEP"),   # it would have made shard 1 again, beside task 2
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "0"}, "SLURM_ARRAY_TASK_COUNT=0"),
])
def test_launcher_variables_that_make_no_shard(env, message):
    from dtk.seeds import default_shard

    with pytest.raises(BadInput, match="pass --shard I/N") as e:
        default_shard(env)
    assert str(e.value).startswith(message)


def test_a_rank_outside_its_world_writes_nothing(run_dtk, tmp_path):
    """RANK=5 WORLD_SIZE=2 wrote shard files "5 of 2" (another run's numbering); now it is refused."""
    r = run_dtk("sample", RED, "--out", tmp_path / "o", env={"RANK": "5", "WORLD_SIZE": "2"})
    refused(r, "RANK=5 with WORLD_SIZE=2")
    assert not (tmp_path / "o").exists()
    r = run_dtk("reflow-pairs", RED, "--out", tmp_path / "p", env={"SLURM_ARRAY_TASK_ID": "?",
                                                                      "SLURM_ARRAY_TASK_COUNT": "2"})
    refused(r, "SLURM_ARRAY_TASK_ID='?'")


# ---------------------------------------------------------------------------
# 4. runs too large for the machine


@pytest.fixture
def no_model_load(monkeypatch):
    import dtk.diffusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("args, says", [
    (("--num-per-prompt", 9223372036854775807), "--num-per-prompt 9223372036854775807: 9223372036854775807 images "
                                                "in this process, their manifest records (split the run with --shard"),
    (("--height", 1048576), "--height 1048576 --width 64: one 64x1048576 image: needs about"),
    (("--batch-size", 1000000000, "--num-per-prompt", 100000, "--height", 512, "--width", 512),
     "--batch-size 1000000000: a batch of 100000 512x512 images: needs about"),
    (("--num-per-prompt", 30000, "--grid", "--height", 512, "--width", 512), "--grid: a contact sheet of 30000"),
])
def test_sample_refuses_what_cannot_fit_before_the_model_loads(run_dtk, tmp_path, memory, no_model_load, args, says):
    r = run_dtk("sample", RED, *args, "--device", "cpu", "--out", tmp_path / "o")
    line = refused(r, says, "GiB available")
    assert "16.0 GiB available" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_large_batch_of_few_images_is_only_as_large_as_the_images(run_dtk, tmp_path, memory):
    r = run_dtk("sample", RED, "--batch-size", 1000000000, "--steps", 1, "--device", "cpu", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr


def test_a_sharded_run_is_checked_for_its_own_share(memory):
    import torch

    from dtk.data.prompts import PromptItem
    from dtk.sample import SampleOptions, check_memory

    unet = {"block_out_channels": [32], "in_channels": 4, "layers_per_block": 1}
    vae = {"block_out_channels": [16, 32, 64]}
    opts = SampleOptions(prompts=[PromptItem("p")], num_per_prompt=40_000_000)
    with pytest.raises(BadInput, match="--num-per-prompt 40000000: 40000000 images in this process"):
        check_memory(opts, unet, vae, 64, 64, torch.device("cpu"), torch.float32, images=40_000_000)
    check_memory(opts, unet, vae, 64, 64, torch.device("cpu"), torch.float32, images=40_000_000 // 8)   # --shard I/8


def test_requests_are_made_lazily_and_as_before():
    """The plan is every image by global index, its seed a function of (seed, index) alone, made when asked for:
    the same requests as the list built before, for every shard."""
    from dtk.data.prompts import PromptItem
    from dtk.sample import SampleOptions, plan_requests
    from dtk.seeds import derive_seed, shard_indices

    opts = SampleOptions(prompts=[PromptItem("a"), PromptItem("b", "neg", seed=100), PromptItem("c")],
                         num_per_prompt=3, negative_prompt="n", seed=7)
    old = [(item.prompt, item.seed + k if item.seed is not None else derive_seed(7, p * 3 + k),
            item.negative_prompt if item.negative_prompt is not None else "n", p * 3 + k)
           for p, item in enumerate(opts.prompts) for k in range(3)]
    plan = plan_requests(opts)
    assert len(plan) == 9
    for shard in ((0, 1), (0, 4), (3, 4), (1, 2)):
        mine = plan.shard(shard)
        got = [(r.prompt, r.seed, r.negative_prompt, r.meta["index"]) for r in mine]
        assert got == [old[i] for i in shard_indices(9, shard)]
        assert [r.meta["index"] for r in mine[0:2]] == shard_indices(9, shard)[:2]   # batches are slices
    huge = plan_requests(SampleOptions(prompts=[PromptItem("a")], num_per_prompt=10 ** 15))
    assert huge.shard((5, 1000))[3].meta["index"] == 3005   # nothing listed


def test_eval_refuses_what_cannot_fit_before_the_model_loads(run_dtk, tmp_path, memory, no_model_load):
    refused(run_dtk("eval", "--num-images", 100000000, "--out", tmp_path / "e"),
            "--num-images 100000000: 600000000 64x64 images kept at once (5 step count(s)")
    refused(run_dtk("eval", "--num-images", 100000, "--batch-size", 100000, "--device", "cpu", "--out", tmp_path / "e"),
            "--batch-size 100000: a batch of 100000 64x64 images: needs about")
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_reflow_pairs_refuses_what_cannot_fit_before_the_model_loads(run_dtk, tmp_path, memory, no_model_load):
    refused(run_dtk("reflow-pairs", RED, "--num", 9223372036854775807, "--out", tmp_path / "p"),
            "--num 9223372036854775807: 36028797018963968 shard(s) of --pairs-per-shard 256")
    refused(run_dtk("reflow-pairs", RED, "--num", 1000000, "--pairs-per-shard", 1000000, "--height", 4096,
                    "--width", 4096, "--device", "cpu", "--out", tmp_path / "p"),
            "--pairs-per-shard 1000000: a shard of 1000000 4096x4096 pairs, held until written")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------
# 5. a relative base_model is read from the model dir


@pytest.fixture
def models(tmp_path):
    """models/base (the demo pipeline, by a link) and models/tuned, whose dtk.json names it as ../base."""
    from dtk.demo import DEMO_MODEL_DIR

    root = tmp_path / "models"
    root.mkdir()
    (root / "base").symlink_to(DEMO_MODEL_DIR, target_is_directory=True)
    (root / "tuned").mkdir()
    (root / "tuned" / "lora.safetensors").write_bytes(b"")
    (root / "tuned" / "dtk.json").write_text(json.dumps({
        "kind": "model", "command": "train-npo", "base_model": "../base",
        "loras": [{"path": "lora.safetensors", "scale": 1.0}]}))
    (tmp_path / "elsewhere").mkdir()
    return root


def test_a_relative_base_model_is_read_from_the_model_dir(models, tmp_path, monkeypatch):
    from dtk.demo import DEMO_MODEL_DIR
    from dtk.diffusion.loading import resolve_model
    from dtk.diffusion.npo import npo_model_dir

    monkeypatch.chdir(tmp_path / "elsewhere")
    ref = resolve_model(str(models / "tuned"))
    assert ref.path.resolve() == DEMO_MODEL_DIR.resolve()
    assert ref.loras == [(models / "tuned" / "lora.safetensors", 1.0)]
    # what other commands take from it (`dtk sample --npo DIR` alone, `dtk eval`'s teacher) works from here too
    base = npo_model_dir(str(models / "tuned"))[0].manifest["base_model"]
    assert base == str(models / "base") and resolve_model(base).path.resolve() == DEMO_MODEL_DIR.resolve()
    # the folder of models moves as a whole
    moved = tmp_path / "moved"
    models.rename(moved)
    assert resolve_model(str(moved / "tuned")).path.resolve() == DEMO_MODEL_DIR.resolve()
    monkeypatch.chdir(moved)
    assert resolve_model("tuned").path.resolve() == DEMO_MODEL_DIR.resolve()


def test_base_models_as_earlier_dtk_read_them(models, tmp_path, monkeypatch, caplog):
    """Absolute paths (all that dtk itself wrote) and hub ids are unchanged; a relative path that exists only
    from the current directory (how it was read before) still works, with a warning; one found nowhere is
    refused naming the dtk.json."""
    from dtk.demo import DEMO_MODEL_DIR
    from dtk.diffusion.loading import resolve_model

    tuned = models / "tuned" / "dtk.json"
    manifest = json.loads(tuned.read_text())
    tuned.write_text(json.dumps({**manifest, "base_model": str(DEMO_MODEL_DIR)}))
    assert resolve_model(str(models / "tuned")).manifest["base_model"] == str(DEMO_MODEL_DIR)
    tuned.write_text(json.dumps({**manifest, "base_model": "models/base"}))   # relative to tmp_path, as before
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="dtk"):
        ref = resolve_model(str(models / "tuned"))
    assert ref.path.resolve() == DEMO_MODEL_DIR.resolve() and "read from the current directory" in caplog.text
    monkeypatch.chdir(tmp_path / "elsewhere")
    tuned.write_text(json.dumps({**manifest, "base_model": "./models/base"}))
    with pytest.raises(BadInput, match=r"tuned/dtk\.json: base_model \./models/base: no such directory \(looked in "):
        resolve_model(str(models / "tuned"))
    # ORG/NAME found nowhere on disk is a hub id: the local cache is asked, and the dtk.json named
    tuned.write_text(json.dumps({**manifest, "base_model": "models/base"}))
    with pytest.raises(BadInput, match=r"tuned/dtk\.json: base_model models/base: no such directory, and no hub model"):
        resolve_model(str(models / "tuned"))


# ---------------------------------------------------------------------------
# 6. unreadable training images, found before training


def test_image_problem_reads_headers_and_ends_only():
    from PIL import ImageFile

    from dtk.data.images import image_problem

    png, jpg, webp, bmp = (image_bytes(f) for f in ("PNG", "JPEG", "WEBP", "BMP"))
    for whole in (png, jpg, webp, bmp, png + b"appended", jpg + b"\0" * 64, bmp + b"xx"):
        assert image_problem(whole) is None
    for cut in (png, jpg, webp, bmp):
        assert image_problem(cut[: len(cut) // 2]) is not None
        assert image_problem(cut[:-len(cut) // 10]) is not None   # the header whole, the data cut
    assert image_problem(b"") == "no image format recognises it"
    assert image_problem(b"GIF89a but not") is not None
    # a whole file is never decoded: that is what keeps it cheap (about 1 s per 10,000 files)
    original = ImageFile.ImageFile.load
    ImageFile.ImageFile.load = lambda self: pytest.fail("decoded")
    try:
        for whole in (png, jpg, webp, bmp):
            assert image_problem(whole) is None
    finally:
        ImageFile.ImageFile.load = original
    # in order, one thread or (where images come slowly: a network file system) several
    from dtk.data.images import check_images

    sources = [png, b"x", jpg] * 300
    for slow in (1.0, 0.0):
        found = list(check_images(sources, slow=slow, chunk=16))
        assert [i for i, _ in found] == list(range(900))
        assert [i for i, problem in found if problem] == list(range(1, 900, 3))


def test_an_unreadable_training_image_is_refused_when_the_data_opens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtk.data.images import open_dataset

    folder = tmp_path / "folder"
    folder.mkdir()
    png = image_bytes()
    for name, data in (("a", png), ("b", png[: len(png) // 2]), ("c", png + b"trailing data")):
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"caption {name}")
    with pytest.raises(BadInput, match=r"^--data .*folder/b\.png: not a readable image \(image file is truncated"):
        open_dataset(str(folder), resolution=16)
    late = open_dataset(str(folder), resolution=16, check=False)   # what happened before: when its batch came
    with pytest.raises(BadInput, match="b.png: not a readable image"):
        late[1]
    (folder / "b.png").write_bytes(png)
    assert len(open_dataset(str(folder), resolution=16)) == 3   # trailing data after the image is no problem
    (folder / "m.jsonl").write_text(json.dumps({"path": "b.png", "prompt": "p"}) + "\n")
    (folder / "b.png").write_bytes(b"<html>not found</html>")
    with pytest.raises(BadInput, match=r"m\.jsonl:1 \(b\.png\): not a readable image \(no image format"):
        open_dataset(str(folder / "m.jsonl"), resolution=16)
    jpg = image_bytes("JPEG")
    pq.write_table(pa.table({"image": [jpg, jpg[:300]], "caption": ["a", "b"]}), tmp_path / "d.parquet")
    with pytest.raises(BadInput, match=r"d\.parquet row 1: not a readable image"):
        open_dataset(str(tmp_path / "d.parquet"), resolution=16)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("0.png", png), ("0.txt", b"a"), ("1.jpg", jpg[:-100]), ("1.txt", b"b")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BadInput, match=r"s\.tar:1\.jpg: not a readable image \(image file is truncated"):
        open_dataset(str(tmp_path / "s.tar"), resolution=16)


def test_unreadable_preference_images_keep_their_policy(tmp_path, caplog):
    """Pairs: with --strict the first unreadable image is refused when the data opens (it stopped the run when
    its batch came); without, its pair stays, to be masked out of the loss as before, and is counted now."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtk.data.preferences import open_preferences

    png = image_bytes()
    rows = {"caption": ["a", "b", "c"], "jpg_0": [png, png, png], "jpg_1": [png, png[:200], png],
            "label_0": [1.0, 0.0, 1.0]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    with pytest.raises(BadInput, match=r"p\.parquet row 1 \(preferred image\): not a readable image .*\(--strict\)$"):
        open_preferences(str(tmp_path / "p.parquet"), resolution=16, strict=True)
    with caplog.at_level("WARNING", logger="dtk"):
        data = open_preferences(str(tmp_path / "p.parquet"), resolution=16)
    assert len(data) == 3 and data.counts["unreadable_pairs"] == 1 and data[1]["valid"] is False
    assert "1 of 3 pair(s) have an image that cannot be read" in caplog.text
    # a datasets directory: memory-mapped, its cells checked where they lie
    ds = tmp_path / "ds"
    ds.mkdir()
    table = pa.table({**rows, "jpg_1": [{"bytes": b} for b in rows["jpg_1"]]})
    with pa.OSFile(str(ds / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    with pytest.raises(BadInput, match=r"data\.arrow row 1 \(preferred image\)"):
        open_preferences(str(ds), resolution=16, strict=True)
    assert open_preferences(str(ds), resolution=16).counts["unreadable_pairs"] == 1


def test_a_corrupt_training_image_is_found_before_the_model_loads(tiny_sd, tmp_path, monkeypatch):
    import dtk.train.engine as engine
    import dtk.train.setup as setup
    from dtk.methods.reflow import RectifiedDiffusion
    from dtk.train.config import TrainConfig

    folder = tmp_path / "images"
    folder.mkdir()
    png = image_bytes()
    for name, data in (("a", png), ("b", png[: len(png) // 2])):
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"caption {name}")

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(setup, "load_model", no_load)
    config = TrainConfig(out=str(tmp_path / "run"), model=str(tiny_sd), data=str(folder), max_steps=1, device="cpu")
    with pytest.raises(BadInput, match=r"b\.png: not a readable image"):
        engine.train(RectifiedDiffusion(phased=2), config)


@pytest.mark.parametrize("index, says", [
    ({"_class_name": "CogVideoXPipeline", "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
      "vae": ["diffusers", "AutoencoderKLCogVideoX"], "text_encoder": ["transformers", "T5EncoderModel"]},
     "CogVideoXPipeline denoises with a transformer, not a UNet"),
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"]},
     "StableDiffusion3Pipeline denoises with a transformer"),
    ({"_class_name": "AnimateDiffPipeline", "unet": ["diffusers", "UNetMotionModel"],
      "motion_adapter": ["diffusers", "MotionAdapter"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"]}, "AnimateDiffPipeline is a video model")])
def test_pipelines_dtk_cannot_load_yet_are_named(run_dtk, tmp_path, index, says):
    """A transformer or video pipeline is not taken for an SD one (it has a vae and a text encoder too)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps(index))
    refused(run_dtk("sample", "--model", model, "--out", tmp_path / "o", "x"), says)
    assert not (tmp_path / "o").exists()


def test_a_motion_lora_on_an_image_model_is_refused(run_dtk, tmp_path):
    """diffusers would load an AnimateDiff motion LoRA's spatial keys into an SD UNet and drop the rest."""
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "motion.safetensors"
    save_file({"unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)},
              str(lora))
    refused(run_dtk("sample", "--lora", lora, "--steps", 2, "--out", tmp_path / "o", "x"),
            "a motion LoRA (AnimateDiff motion modules")
