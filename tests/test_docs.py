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
