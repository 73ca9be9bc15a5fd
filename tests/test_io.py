"""Atomic files, JSON Lines, output dirs, seeds and shards."""

import json

import pytest

from dtk.errors import BadInput
from dtk.io import Replacing, atomic_write, prepare_out_dir, read_jsonl, write_json
from dtk.seeds import default_shard, derive_seed, parse_shard, shard_indices


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_read_jsonl_names_the_bad_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(BadInput, match=r"m.jsonl:3: expected a JSON object"):
        list(read_jsonl(str(f)))
    f.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(BadInput, match=r"m.jsonl:2: not valid JSON"):
        list(read_jsonl(str(f)))


def test_prepare_out_dir(tmp_path):
    out = tmp_path / "o"
    assert prepare_out_dir(out, overwrite=False) == out and not out.exists()  # nothing created yet
    write_json(out / "dtk.json", {"files": ["a.png", "../outside.png"]})
    (out / "a.png").write_bytes(b"old")
    (out / "keep.png").write_bytes(b"other shard")
    (tmp_path / "outside.png").write_bytes(b"not ours")
    with pytest.raises(BadInput, match="--overwrite"):
        prepare_out_dir(out, overwrite=False)
    assert (out / "a.png").exists()
    prepare_out_dir(out, overwrite=True)   # accepted, and nothing removed yet: the command may still refuse
    assert (out / "dtk.json").exists() and (out / "a.png").exists()
    with pytest.raises(RuntimeError):
        with Replacing(out):   # the command's first write
            assert not (out / "dtk.json").exists()  # an interrupted overwrite is not "finished"
            assert not (out / "a.png").exists()  # the old result's files go with it
            (out / "a.png").write_bytes(b"half new")
            raise RuntimeError("the run fails")
    assert (out / "a.png").read_bytes() == b"old" and (out / "dtk.json").exists()   # put back as it was
    assert not list(out.glob(".replaced*"))
    with Replacing(out):
        (out / "b.png").write_bytes(b"new")
    assert not (out / "a.png").exists() and not (out / "dtk.json").exists() and not list(out.glob(".replaced*"))
    assert (out / "keep.png").exists() and (tmp_path / "outside.png").exists()
    # shards of one output replace theirs side by side
    for k in (0, 1):
        write_json(out / f"dtk.s{k}of2.json", {"files": [f"{k}.png"]})
        (out / f"{k}.png").write_bytes(b"old")
    zero, one = Replacing(out, "dtk.s0of2.json").set_aside(), Replacing(out, "dtk.s1of2.json").set_aside()
    zero.restore()
    one.drop()
    assert (out / "0.png").exists() and not (out / "1.png").exists() and not list(out.glob(".replaced*"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        prepare_out_dir(tmp_path / "file", overwrite=True)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 0) == derive_seed(0, 0)
    seeds = {derive_seed(s, i) for s in range(20) for i in range(500)}
    assert len(seeds) == 20 * 500
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 0) == 7120306904099482837  # pinned: changing it changes every image


def test_shards():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("3/2", "2/2", "-1/2", "1/0", "x", "1/2/3"):
        with pytest.raises(BadInput):
            parse_shard(bad)
    parts = [shard_indices(10, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and parts[0] == [0, 3, 6, 9]
    assert default_shard({}) == (0, 1)
    assert default_shard({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    stepped = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "6"}
    assert [default_shard({**stepped, "SLURM_ARRAY_TASK_ID": str(i)}) for i in (0, 4, 10)] == [(0, 6), (2, 6), (5, 6)]
    with pytest.raises(BadInput, match="shard 9 of 4"):   # --array=0,9: a gap
        default_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert default_shard({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert default_shard({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert default_shard({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1)


def test_a_sample_manifest_reads_from_any_directory(tmp_path, monkeypatch):
    """`dtk sample --out s` records "s/000000.png" (relative to where it ran); read from elsewhere, the image
    beside the manifest is found."""
    from dtk.io import read_manifest

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "000000.png").write_bytes(b"png")
    (tmp_path / "s" / "samples.jsonl").write_text('{"path": "s/000000.png", "prompt": "a"}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (row,) = read_manifest("../s/samples.jsonl")
    assert row["_file"].resolve() == (tmp_path / "s" / "000000.png").resolve()
    (tmp_path / "s" / "other.jsonl").write_text('{"path": "t/000000.png", "prompt": "a"}\n')
    with pytest.raises(BadInput, match="image t/000000.png: no such file"):   # another folder's name: not guessed
        read_manifest("../s/other.jsonl")


def test_a_result_set_aside_by_a_killed_run_comes_back(tmp_path):
    """SIGKILL while --overwrite held the old result aside: the next run in that folder puts it back first
    (and then needs --overwrite again); beside a new finished result, the set-aside one goes."""
    from dtk.io import recover_set_aside

    out = tmp_path / "o"
    write_json(out / "dtk.json", {"files": ["a.png"]})
    (out / "a.png").write_bytes(b"old")
    Replacing(out).set_aside()   # ... and the process dies here
    (out / "a.png").write_bytes(b"half new")
    assert not (out / "dtk.json").exists()
    with pytest.raises(BadInput, match="--overwrite"):
        prepare_out_dir(out, overwrite=False)
    assert (out / "a.png").read_bytes() == b"old" and not list(out.glob(".replaced*"))
    Replacing(out).set_aside()
    write_json(out / "dtk.json", {"files": ["b.png"]})   # the new result finished, the drop did not happen
    recover_set_aside(out)
    assert json.loads((out / "dtk.json").read_text())["files"] == ["b.png"] and not list(out.glob(".replaced*"))
