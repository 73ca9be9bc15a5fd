"""The bundled demo: a procedural "shapes" data set, a tiny Stable-Diffusion-style
pipeline trained on it, and an attribute classifier that judges its samples.

Nothing here imports torch at import time.

* ``dtk.demo.shapes``     - captioned procedural images (numpy/PIL only)
* ``dtk.demo.classifier`` - attribute classifier + Frechet features (torch)
* ``dtk.demo.pixel``      - a class-conditional pixel-space DDPM on the shapes (``--model demo-pixel``)
* ``dtk.demo.build``      - ``python -m dtk.demo.build [--pixel]`` regenerates everything
"""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_PIXEL_DIR = DEMO_DIR / "pixel-model"   # class-conditional pixel-space DDPM (--model demo-pixel)
CLASSIFIER_DIR = DEMO_DIR / "classifier"

__all__ = ["DEMO_DIR", "DEMO_MODEL_DIR", "DEMO_PIXEL_DIR", "CLASSIFIER_DIR"]
