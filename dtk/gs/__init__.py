"""Gaussian splatting for ``dtk render-gs``: EWA projection and a vectorised CPU rasteriser (gsplat on CUDA)."""
