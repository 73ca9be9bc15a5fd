"""The CLI frame: lazy loading, error boundary, config files and environment variables."""

import json
import subprocess
import sys

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
