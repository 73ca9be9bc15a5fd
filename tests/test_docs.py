"""Generated completions and man pages match the code; README covers every command; the docs' references and
links resolve."""

import ast
import re
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


# ---------------------------------------------------------------------------
# The Markdown documentation: code references, links, length, one page per command

def _doc_files() -> list[Path]:
    """README.md, docs/*.md, benchmarks/README.md and dtk/demo/README.md (those that exist; the first two must)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
             ROOT / "dtk" / "demo" / "README.md"]
    return [f for f in files if f.is_file()]


# `dtk/methods/reflow.py:pair_loss`: a file under one of the project's source folders and a name it defines
CODE_REF = re.compile(r"(?<![\w./-])((?:dtk|scripts|benchmarks|tests)/[\w/]+\.py):(\w+)")


def _defined_names(path: Path) -> set[str]:
    """Functions and classes defined anywhere in the file (methods included), and module-level assignments."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for n in ast.walk(target):
                if isinstance(n, ast.Name):
                    names.add(n.id)
    return names


def test_docs_code_references_resolve():
    """Every `path.py:name` in the docs names a file that exists and defines that name (a function, a class or a
    method, or a module-level variable): a renamed or moved function shows up here, not in a reader's search."""
    cache: dict[Path, set[str]] = {}
    stale, found = [], 0
    for doc in _doc_files():
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for m in CODE_REF.finditer(line):
                found += 1
                path, name = ROOT / m.group(1), m.group(2)
                where = f"{doc.relative_to(ROOT)}:{lineno}: {m.group(0)}"
                if not path.is_file():
                    stale.append(f"{where} (no such file)")
                    continue
                if path not in cache:
                    cache[path] = _defined_names(path)
                if name not in cache[path]:
                    stale.append(f"{where} (no {name} defined there)")
    assert found >= 50, f"only {found} code references found: has the pattern or docs/methods.md changed?"
    assert not stale, "stale code references in the docs:\n" + "\n".join(stale)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked (their brackets are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    out, seen = set(), {}
    for line in _without_code(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_docs_relative_links_point_to_existing_files():
    """Every relative link in the docs reaches a file (or folder) of the repository, and its #anchor, if any, a
    heading of the Markdown file it points to."""
    broken, found = [], 0
    for doc in _doc_files():
        for m in LINK.finditer(_without_code(doc.read_text())):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                continue   # http:, https:, mailto:
            found += 1
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not path.exists() or ROOT not in (path, *path.parents):
                broken.append(f"{where} (no such file in the repository)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{where} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert found >= 50, f"only {found} relative links found"
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


def test_readme_is_short():
    """The README is the front page; usage lives in docs/, measurements in benchmarks/README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines (at most 220)"


def test_every_command_has_its_page():
    from dtk.cli import COMMANDS

    missing = [name for name in COMMANDS if not (ROOT / "docs" / f"{name}.md").is_file()]
    assert not missing, f"no docs/<command>.md for: {', '.join(missing)}"
    for name in COMMANDS:
        assert (ROOT / "docs" / f"{name}.md").read_text().startswith(f"# dtk {name}\n"), name


def test_the_code_cites_documents_that_exist():
    """Every docs page (with its section, when one is quoted) cited in the code or the tests exists."""
    import re

    cited = []
    for path in [*sorted((ROOT / "dtk").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]:
        if path.name == "test_docs.py":
            continue
        for m in re.finditer(r'(docs/[\w-]+\.md)(?:,\s*(?:section\s*)?"([^"]+)")?', path.read_text()):
            cited.append((path.relative_to(ROOT), m.group(1), m.group(2)))
    assert len(cited) >= 5
    for where, doc, section in cited:
        assert (ROOT / doc).is_file(), f"{where}: {doc} does not exist"
        if section:
            headings = {line.lstrip("#").strip() for line in (ROOT / doc).read_text().splitlines()
                        if line.startswith("#")}
            assert section in headings, f"{where}: {doc} has no section {section!r}"
    assert not [p for p in (ROOT / "dtk").rglob("*.py") if "METHODS.md" in p.read_text()]
