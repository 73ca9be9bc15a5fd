import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from threads, and oversubscribed OpenMP threads are
# very slow when another process loads the cores; subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets its own thread count (the demo's builds use 2) leaves the next ones as they were:
    bit-for-bit comparisons of a batch-2 and two batch-1 UNet calls (NPO with zero weights against plain
    CFG) hold at one thread, not at two, where the kernels split the work differently."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-sd", tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("models") / "tiny-cogvideox")


@pytest.fixture(scope="session")
def tiny_animatediff(tiny_sd, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_animatediff

    return build_tiny_animatediff(tmp_path_factory.mktemp("models") / "tiny-animatediff", tiny_sd)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd_lora(tiny_sd, tmp_path_factory) -> Path:
    from tiny_models import make_tiny_lora

    return make_tiny_lora(tiny_sd, tmp_path_factory.mktemp("lora-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_lora(tiny_sdxl, tmp_path_factory) -> Path:
    from tiny_models import make_tiny_lora

    return make_tiny_lora(tiny_sdxl, tmp_path_factory.mktemp("lora-sdxl"), family="sdxl")


@pytest.fixture
def run_dtk():
    """Invoke the CLI in-process through click's CliRunner; stdout and stderr kept apart."""
    from click.testing import CliRunner

    from dtk.cli import cli

    def run(*args, input=None, env=None):
        return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env, catch_exceptions=False)

    return run


def dtk_subprocess(*args, input=None, env=None, timeout=300, cwd=None):
    """Run the installed ``dtk`` as a real process (python -m dtk, same interpreter)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dtk", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_pixel_pipeline

    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("models") / "tiny-pixel")


@pytest.fixture(scope="session")
def tiny_pixel_classes(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_pixel_pipeline

    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("models") / "tiny-pixel-classes", num_classes=4)
