"""docs/python-api.md's examples run as they stand."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_examples():
    assert len(examples()) == 3


@pytest.mark.slow
def test_the_python_api_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for code in examples():
        exec(compile(code, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 2 and (tmp_path / "py-samples" / "000001.png").exists()
    assert (tmp_path / "py-reflow" / "dtk.json").exists()
