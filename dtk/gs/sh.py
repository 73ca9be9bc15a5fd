"""View-dependent colour of 3D Gaussians: real spherical harmonics up to degree 3, as 3DGS evaluates them.

Kerbl et al. 2023, "3D Gaussian Splatting for Real-Time Radiance Field
Rendering" (graphdeco-inria/gaussian-splatting, ``utils/sh_utils.eval_sh`` and
the CUDA forward pass's ``computeColorFromSH``): a Gaussian holds K = (d + 1)²
RGB coefficients (the DC term first); seen from a camera at centre c its
colour is

    max(0, Σ_k Y_k(v) · coeff_k + 0.5),   v = normalize(mean − c),

with the basis Y_k below (the real SH with the Condon–Shortley sign, in the
order and signs of ``eval_sh``; gsplat's ``spherical_harmonics`` uses the same).
The constants are the normalisations √((2l+1)/4π · (l−|m|)!/(l+|m|)!) (×√2 for
m ≠ 0), written out from their closed forms.

In a 3DGS PLY the DC term is ``f_dc_0..2`` (R, G, B) and the higher ones
``f_rest_*`` channel-major: the K − 1 coefficients of R, then those of G, then
of B (``GaussianModel.save_ply`` writes ``features_rest`` [N, K−1, 3]
transposed to [N, 3, K−1] and flattened); see ``dtk.gs.field``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_DEGREE = 3
_PI = math.pi
C0 = 0.5 / math.sqrt(_PI)                        # 0.28209479…
C1 = math.sqrt(3 / (4 * _PI))                    # 0.48860251…
C2_XY = 0.5 * math.sqrt(15 / _PI)                # 1.09254843… (xy, yz, xz)
C2_ZZ = 0.25 * math.sqrt(5 / _PI)                # 0.31539157… (2z² − x² − y²)
C2_XX = 0.25 * math.sqrt(15 / _PI)               # 0.54627422… (x² − y²)
C3_CUBE = 0.25 * math.sqrt(35 / (2 * _PI))       # 0.59004359… (y(3x² − y²), x(x² − 3y²))
C3_XYZ = 0.5 * math.sqrt(105 / _PI)              # 2.89061144…
C3_ZZ = 0.25 * math.sqrt(21 / (2 * _PI))         # 0.45704580… (y(4z² − x² − y²), x(…))
C3_Z = 0.25 * math.sqrt(7 / _PI)                 # 0.37317633… (z(2z² − 3x² − 3y²))
C3_XX = 0.25 * math.sqrt(105 / _PI)              # 1.44530572… (z(x² − y²))


def degree_of(k: int) -> int:
    """The SH degree of K = (d + 1)² coefficients; ValueError for other counts or degrees above 3."""
    d = math.isqrt(k) - 1
    if k < 1 or (d + 1) ** 2 != k or d > MAX_DEGREE:
        raise ValueError(f"{k} SH coefficients per channel: want 1, 4, 9 or 16 (degree 0–{MAX_DEGREE})")
    return d


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """The basis Y_0 … Y_{K−1} [..., K] at unit directions [..., 3], K = (degree + 1)²."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"SH degree {degree}: 0–{MAX_DEGREE} supported")
    x, y, z = dirs.unbind(-1)
    terms = [torch.full_like(x, C0)]
    if degree >= 1:
        terms += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        terms += [C2_XY * x * y, -C2_XY * y * z, C2_ZZ * (2 * zz - xx - yy), -C2_XY * x * z, C2_XX * (xx - yy)]
    if degree >= 3:
        around = 4 * zz - xx - yy   # shared by the two m = ±1 terms
        terms += [-C3_CUBE * y * (3 * xx - yy), C3_XYZ * x * y * z, -C3_ZZ * y * around,
                  C3_Z * z * (2 * zz - 3 * xx - 3 * yy), -C3_ZZ * x * around, C3_XX * z * (xx - yy),
                  -C3_CUBE * x * (xx - 3 * yy)]
    return torch.stack(terms, -1)


def camera_centres(viewmats: torch.Tensor) -> torch.Tensor:
    """World positions [C, 3] of cameras given as world-to-camera matrices [C, 4, 4]: c = −R⁻¹ t."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3:]
    return -torch.linalg.solve(R, t)[..., 0]


def sh_colors(coeffs: torch.Tensor, means: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Colours [C, N, 3] of N Gaussians (SH coefficients [N, K, 3], means [N, 3]) seen by C cameras (world-to-camera
    matrices [C, 4, 4]): max(0, SH(normalize(mean − camera centre)) + 0.5), as 3DGS and gsplat compute them."""
    degree = degree_of(coeffs.shape[-2])
    centres = camera_centres(viewmats.to(means.dtype))
    if degree == 0:   # no direction needed
        rgb = (C0 * coeffs[:, 0]).expand(len(centres), -1, -1)
    else:
        dirs = F.normalize(means[None] - centres[:, None], dim=-1)
        rgb = torch.einsum("cnk,nkd->cnd", sh_basis(dirs, degree).to(coeffs.dtype), coeffs)
    return (rgb + 0.5).clamp(min=0)
