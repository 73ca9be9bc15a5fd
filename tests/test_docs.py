"""Generated completions and man pages match the code; README covers every command."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_completions_and_man_pages_are_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import generate_docs

    assert generate_docs.stale() == [], "run: python scripts/generate_docs.py"


def test_readme_and_changelog_cover_every_command():
    from dtk.cli import COMMANDS

    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"dtk {name}" in readme, name
    assert "## [" in (ROOT / "CHANGELOG.md").read_text()


def test_readme_test_command_is_what_ci_runs():
    """.ci/run extracts the README's test command; it must install torch 2.13.0 before dtk."""
    ci = (ROOT / ".ci" / "run").read_text()
    awk = ci.split("cmd=$(")[1].split(")\n")[0]
    cmd = subprocess.run(["bash", "-c", awk], capture_output=True, text=True, cwd=ROOT).stdout
    assert "pip install torch==2.13.0" in cmd and 'pip install -e ".[test]"' in cmd and "python -m pytest" in cmd
    assert cmd.index("torch==2.13.0") < cmd.index('pip install -e ".[test]"') < cmd.index("pytest")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_pages_render():
    for page in sorted((ROOT / "man").glob("*.1")):
        r = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr.lower(), (page, r.stderr)


def test_man_pages_list_the_exit_codes_that_occur():
    """75 where a command trains (SIGTERM saves a checkpoint), 143 where it does not; 141 everywhere."""
    from dtk.cli import TRAINING_COMMANDS

    for page in sorted((ROOT / "man").glob("dtk-*.1")):
        text = page.read_text()
        name = page.stem[len("dtk-"):]
        assert ".B 141" in text, page
        assert (".B 75" in text) == (name in TRAINING_COMMANDS), page
        assert (".B 143" in text) == (name not in TRAINING_COMMANDS), page


def test_packaging_has_a_name_of_its_own_and_its_license():
    tomllib = pytest.importorskip("tomllib")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "dtk"   # PyPI's "dtk" is an unrelated package that also imports as dtk
    assert project["scripts"] == {"dtk": "dtk.cli:main"}
    assert project["license-files"] == ["LICENSE"] and "Apache License" in (ROOT / "LICENSE").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {project['name']}" in readme or "pip install -e ." in readme


def test_demo_scripts_name_themselves():
    for module in ("dtk.demo.tracks", "dtk.demo.shapes", "dtk.demo.build"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m {module}"), r.stdout[:80]
