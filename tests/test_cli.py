"""The CLI frame: lazy loading, error boundary, config files and environment variables."""

import json
import subprocess
import sys

import pytest

from conftest import dtk_subprocess


def test_help_and_completion_do_not_import_torch():
    code = (
        "import sys\n"
        "from dtk.cli import cli\n"
        "for args in (['--help'], ['sample', '--help']):\n"
        "    try:\n"
        "        cli.main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; from dtk.cli import cli; cli.main([])\n"],
                       capture_output=True, text=True,
                       env={"_DTK_COMPLETE": "bash_complete", "COMP_WORDS": "dtk sa", "COMP_CWORD": "1",
                            "PATH": "/usr/bin:/bin"})
    assert "sample" in r.stdout


def test_version_and_python_m(run_dtk):
    from dtk import __version__

    r = run_dtk("--version")
    assert r.exit_code == 0 and __version__ in r.stdout
    p = dtk_subprocess("--version")
    assert p.returncode == 0 and __version__ in p.stdout


def test_usage_errors_are_one_line_exit_2(run_dtk):
    r = run_dtk("no-such-command")
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr
    r = run_dtk("sample", "--steps", "0", "x")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("dtk sample: error:") and "--steps" in lines[0]
    assert r.stdout == ""


def test_unknown_config_key_is_named(run_dtk, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 4\nstepz = 4\n')   # after a known key, the error still names --config
    r = run_dtk("sample", "--config", cfg, "x")
    assert r.exit_code == 2
    assert "unknown key 'stepz'" in r.stderr and str(cfg) in r.stderr and "'--config'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_env_and_flag_precedence(run_dtk, tmp_path, tiny_sd):
    cfg = tmp_path / "run.toml"
    # top-level keys, and a [sample] table that wins over them
    cfg.write_text(f'model = "{tiny_sd}"\nsteps = 5\nguidance = 3.0\n'
                   '[sample]\nsteps = 2\nscheduler = "euler"\n')
    out = tmp_path / "o1"
    r = run_dtk("sample", "--config", cfg, "--out", out, "a")
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    assert (rec["steps"], rec["guidance"], rec["scheduler"]) == (2, 3.0, "euler")
    # environment beats the config file, a flag beats both
    r = run_dtk("sample", "--config", cfg, "--out", tmp_path / "o2", "--guidance", "2", "a",
                env={"DTK_SAMPLE_STEPS": "3", "DTK_SAMPLE_GUIDANCE": "9"})
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    assert (rec["steps"], rec["guidance"]) == (3, 2.0)


def test_bad_toml_and_missing_config(run_dtk, tmp_path):
    r = run_dtk("sample", "--config", tmp_path / "nope.toml", "x")
    assert r.exit_code == 2 and "no such file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    r = run_dtk("sample", "--config", bad, "x")
    assert r.exit_code == 2 and "not valid TOML" in r.stderr


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    p = dtk_subprocess("sample", "--model", tmp_path / "missing", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("dtk sample: error: --model")
    p = dtk_subprocess("--debug", "sample", "--model", tmp_path / "missing", "x")
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_variables_are_named_after_the_long_option(run_dtk, tmp_path, monkeypatch):
    """DTK_<COMMAND>_<OPTION> from the option's name (--self, not click's internal self_npo); a repeatable
    text option takes one value per line; a TOML string serves a repeatable option; bad values are refused."""
    import click

    from dtk.cli import cli

    def parse(name, args):   # in a context like the real one (click caches the help option it makes)
        root = click.Context(cli, info_name="dtk", **cli.context_settings)
        return cli.get_command(root, name).make_context(name, args, parent=root).params

    monkeypatch.setenv("DTK_TRAIN_NPO_SELF", "1")
    monkeypatch.setenv("DTK_TRAIN_NPO_VALIDATION_PROMPT", "a red circle\na small blue star\n")   # trailing newline
    params = parse("train-npo", ["--data", "d", "--out", "o"])
    assert params["self_npo"] is True and params["validation_prompts"] == ("a red circle", "a small blue star")
    monkeypatch.delenv("DTK_TRAIN_NPO_VALIDATION_PROMPT")
    cfg = tmp_path / "c.toml"
    cfg.write_text('validation_prompt = "a red circle"\n')
    params = parse("dpo", ["--config", str(cfg), "--data", "d", "--out", "o"])
    assert params["validation_prompts"] == ("a red circle",)
    cfg.write_text("max_steps = 2.5\n")
    r = run_dtk("dpo", "--config", cfg, "--data", "d", "--out", "o")
    assert r.exit_code == 2 and "'max_steps' = 2.5: want a whole number" in r.stderr
    r = run_dtk("sample", "x", env={"DTK_PROGRESS_INTERVAL": "abc"})
    assert r.exit_code == 2 and "DTK_PROGRESS_INTERVAL=abc" in r.stderr
    for command in (["sample", "x"], ["dpo", "--data", "d"]):   # --out "$OUT" with OUT unset
        r = run_dtk(*command, "--out", "")
        assert r.exit_code == 2 and "--out '': empty" in r.stderr, r.stderr


# ------------------------------------------------------------------ a new user's first minutes


def test_bare_dtk_prints_the_help(run_dtk):
    r = run_dtk()
    assert r.exit_code == 0 and r.stdout.startswith("Usage: dtk") and "Commands:" in r.stdout
    assert len(r.stdout.splitlines()) > 10 and "error" not in r.stderr


@pytest.mark.slow
def test_global_options_after_the_command(run_dtk, tmp_path):
    """-q / -v / --debug / --threads work before or after the command name."""
    missing = tmp_path / "missing.jsonl"
    for args in (["-q", "score", "--data", missing], ["score", "--data", missing, "-q"]):
        r = run_dtk(*args)
        assert r.exit_code == 2 and r.stderr.strip() == f"dtk score: error: {missing}: no such file", r.stderr
    r = run_dtk("score", "-v", "--threads", "1", "--data", missing)
    assert r.exit_code == 2 and "dtk: 1 CPU thread" not in r.stderr   # said when work starts; this is an error
    p = dtk_subprocess("score", "--data", missing, "--debug")
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_a_bad_value_names_its_variable_or_config_file(run_dtk, tmp_path):
    r = run_dtk("sample", "x", env={"DTK_SAMPLE_STEPS": "abc"})
    assert r.exit_code == 2 and r.stderr.startswith("dtk sample: error: DTK_SAMPLE_STEPS=abc:"), r.stderr
    r = run_dtk("score", env={"DTK_THREADS": "0"})
    assert r.exit_code == 2 and "DTK_THREADS=0:" in r.stderr
    cfg = tmp_path / "run.toml"
    cfg.write_text("[sample]\nsteps = 'abc'\n")
    r = run_dtk("sample", "--config", cfg, "x")
    assert r.exit_code == 2 and f"--config {cfg}:" in r.stderr and "'--steps'" in r.stderr


def test_one_config_file_serves_a_pipeline(run_dtk, tmp_path):
    """Top-level keys apply where the command has the option and are skipped elsewhere; a key no command
    has, or a wrong key in the command's own table, is refused."""
    import click

    from dtk.cli import cli

    def params(name, cfg):
        root = click.Context(cli, info_name="dtk", **cli.context_settings)
        return cli.get_command(root, name).make_context(name, ["--config", str(cfg)], parent=root).params

    cfg = tmp_path / "run.toml"
    cfg.write_text("seed = 3\nbatch_size = 8\n[sample]\nsteps = 2\n[score]\nbatch_size = 5\n")
    assert params("sample", cfg)["seed"] == 3 and params("sample", cfg)["steps"] == 2
    assert params("score", cfg)["batch_size"] == 5   # seed: not a score option, skipped
    cfg.write_text("sed = 3\n")
    r = run_dtk("score", "--config", cfg, "--data", tmp_path / "x.jsonl")
    assert r.exit_code == 2 and "unknown key 'sed'" in r.stderr and "no dtk command has that option" in r.stderr
    cfg.write_text("[score]\nseed = 3\n")
    r = run_dtk("score", "--config", cfg, "--data", tmp_path / "x.jsonl")
    assert r.exit_code == 2 and "unknown key 'seed' in its [score] table" in r.stderr


def test_sigusr1_outside_training_says_so(caplog):
    import signal

    from dtk import signals

    signals.TRAINING[0] = False
    signals.note(signal.SIGUSR1, None)
    assert "carrying on" in caplog.text and "checkpoint" not in caplog.text
    signals.TRAINING[0] = True
    signals.note(signal.SIGUSR1, None)
    assert "with a checkpoint once it trains) and exits 75" in caplog.text
    signals.TRAINING[0] = False


# ------------------------------------------------------------------ CPU threads


def test_threads_from_cpus_quota_and_load(tmp_path):
    from dtk.errors import BadInput
    from dtk.threads import auto_threads, cgroup_cpus, choose_threads

    # a shared 2-core machine with one other busy process: 1 thread (2 made sampling 15x slower)
    assert auto_threads(2, busy=1.0, confined=False) == 1
    assert auto_threads(2, busy=0.0, confined=False) == 2
    assert auto_threads(2, busy=5.0, confined=False) == 1   # never below one
    assert auto_threads(16, busy=3.0, confined=False, local_processes=2) == 6   # torchrun: shared per node
    assert auto_threads(4, busy=100.0, confined=True) == 4   # Slurm's allotted CPUs are its own
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v1) == 2.0
    # precedence: --threads / DTK_THREADS, then OMP_NUM_THREADS, then automatic
    assert choose_threads(3, env={"OMP_NUM_THREADS": "1"}) == (3, "as asked")
    assert choose_threads(None, env={"OMP_NUM_THREADS": "2"}) == (2, "from OMP_NUM_THREADS")
    n, why = choose_threads(None, env={})
    assert n >= 1 and "CPU(s)" in why
    with pytest.raises(BadInput, match="OMP_NUM_THREADS=x"):
        choose_threads(None, env={"OMP_NUM_THREADS": "x"})


def test_threads_are_applied_and_said(run_dtk, tiny_sd, tmp_path):
    import torch

    r = run_dtk("--threads", "2", "sample", "--model", tiny_sd, "--steps", "1", "--out", tmp_path / "o", "x")
    assert r.exit_code == 0 and "dtk: 2 CPU threads (as asked)" in r.stderr, r.stderr
    assert torch.get_num_threads() == 2   # conftest set 1 before


# ------------------------------------------------------------------ shell completion

PATH_OPTIONS = {   # command → options that take a path (TAB must offer file names)
    "sample": ["--prompts", "--model", "--lora", "--npo", "--guide-with", "--out", "--model-config"],
    "reflow-pairs": ["--prompts", "--model", "--out"],
    "train-reflow": ["--data", "--model", "--out", "--resume"],
    "distill-pcm": ["--data", "--teacher", "--out"],
    "tune-sct": ["--data", "--model", "--guide-with"],
    "dpo": ["--data", "--model"],
    "train-npo": ["--data", "--model"],
    "track3d": ["--depth", "--out", "--queries", "--eval"],
    "render-gs": ["--tracks", "--video", "--ply", "--out"],
    "score": ["--data", "--out", "--pairs-out"],
    "eval": ["--model", "--teacher", "--baseline", "--prompts", "--real-dir", "--out"],
}


@pytest.mark.parametrize("command", list(PATH_OPTIONS))
def test_completion_offers_file_names_for_paths(command):
    from click.shell_completion import BashComplete

    from dtk.cli import cli

    complete = BashComplete(cli, {}, "dtk", "_DTK_COMPLETE")
    for option in PATH_OPTIONS[command]:
        items = complete.get_completions([command, option], "")
        assert [i.type for i in items] in (["file"], ["dir"]), (command, option, items)
    if command == "track3d":   # the positional VIDEO
        assert [i.type for i in complete.get_completions([command], "")] == ["file"]
    if command == "sample":    # a PROMPT is text, not a file
        assert [i.type for i in complete.get_completions([command], "")] == []


def test_fish_descriptions_keep_their_commas():
    from click.shell_completion import get_completion_class

    from dtk.cli import cli

    fish = get_completion_class("fish")(cli, {}, "dtk", "_DTK_COMPLETE")
    assert 'string split -m 1 "," $completion' in fish.source()
    line = fish.format_completion(fish.get_completions(["sample"], "--sched")[0])
    assert line.split(",", 1)[1] == "--scheduler\tSampler [model's, else dpm++2m]."
