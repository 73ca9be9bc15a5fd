"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from pathlib import Path


def refused(r, *needles, out=None):
    """Exit 2 with one error line holding every needle, nothing on stdout, and nothing written at ``out``."""
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr
    assert "unexpected" not in lines[0] and r.stdout == ""
    assert out is None or not out.exists() or not any(out.iterdir())
    return lines[0]


def pixels(directory: Path) -> dict[str, bytes]:
    """The decoded pixels of every numbered PNG in ``directory``."""
    from PIL import Image

    return {p.name: Image.open(p).tobytes() for p in sorted(Path(directory).glob("0*.png"))}


def png_files(directory: Path) -> dict[str, bytes]:
    """The bytes of every image PNG in ``directory`` (not the contact sheet)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.png")) if not p.name.startswith("grid")}


def solid_png(color, size: int = 32) -> bytes:
    """A PNG of one colour."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()
