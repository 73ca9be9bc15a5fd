"""Logging to stderr, and keeping third-party libraries quiet by default."""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("dtk")


def quiet_libraries() -> None:
    """Keep diffusers/transformers from printing bars and advisories into our stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module in ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft"):
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    quiet_libraries()
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    if verbose >= 2:
        os.environ["TRANSFORMERS_VERBOSITY"] = "info"
        os.environ["DIFFUSERS_VERBOSITY"] = "info"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    STATE["quiet"], STATE["verbose"] = quiet, verbose


# Per-invocation switches set by the top-level options (not os.environ, which
# would leak between invocations in one process, e.g. in tests).
STATE: dict = {"quiet": False, "verbose": 0, "threads": None}


def progress_enabled() -> bool:
    return not STATE["quiet"]
