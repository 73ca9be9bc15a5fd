"""dtk: a command-line toolkit for post-training diffusion models.

The library never imports click; ``dtk.cli`` is a thin face on it.
"""

__version__ = "0.1.0"
