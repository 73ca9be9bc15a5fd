"""EWA splatting of 3D Gaussians (the maths of 3DGS and gsplat), vectorised for the CPU.

Projection, per camera (world → camera by the 4×4 ``viewmat``, pinhole ``K``):
t = Rμ + T; Σ = R_q S Sᵀ R_qᵀ, Σ_c = R Σ Rᵀ; x/z and y/z clamped to 1.3× the
field of view for the Jacobian J = [[fx/z, 0, −fx·x/z²], [0, fy/z, −fy·y/z²]];
Σ' = J Σ_c Jᵀ + 0.3·I (the low-pass filter); image mean (fx x/z + cx, fy y/z + cy)
(unclamped); conic = Σ'⁻¹; radii ⌈3.33 √Σ'_ii⌉ per axis; Gaussians behind the
near plane or off the image get radius 0.

Rasterisation: for every pixel centre p, front to back by depth,
σ = ½(a dx² + c dy²) + b dx dy with d = μ' − p, α = min(0.99, o·e^{−σ}), skipped
below 1/255 (α capped at 0.99 as in the original 3DGS; gsplat caps at 0.999, so
the two differ for opacities above 0.99); C += c·α·T, T ← T(1 − α); a Gaussian
that would take T to 1e-4 or below ends the pixel (as gsplat does). Instead of a loop per pixel, every
(Gaussian, pixel) pair inside the radii is one row: rows are made in depth
order, stably sorted by pixel, and each pixel's transmittance is an exclusive
cumulative sum of log(1 − α) within its segment — no Python loop per Gaussian
or per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS2D = 0.3
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z) [..., 4] → rotation matrices [..., 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, -1).view(*quats.shape[:-1], 3, 3)


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ = R S Sᵀ Rᵀ [N, 3, 3] from quaternions [N, 4] and scales [N, 3]."""
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(-1, -2)


@dataclass
class Projection:
    means2d: torch.Tensor   # [C, N, 2] pixels
    conics: torch.Tensor    # [C, N, 3] (a, b, c) of Σ'⁻¹ = [[a, b], [b, c]]
    radii: torch.Tensor     # [C, N, 2] int, 0 = not drawn
    depths: torch.Tensor    # [C, N] camera z


def project(means: torch.Tensor, covars: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int,
            height: int, eps2d: float = EPS2D, near_plane: float = 0.01) -> Projection:
    """Project N Gaussians (means [N, 3], covariances [N, 3, 3]) into C cameras (viewmats [C, 4, 4], Ks [C, 3, 3])."""
    R, T = viewmats[:, :3, :3], viewmats[:, :3, 3]
    t = torch.einsum("cij,nj->cni", R, means) + T[:, None, :]
    cov_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)
    x, y, z = t.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # the Jacobian is taken at a point clamped to a little beyond the view, so that off-screen
    # Gaussians do not blow up to huge footprints
    margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    xc = z * torch.clamp(x / z, -(cx / fx + margin_x), (width - cx) / fx + margin_x)
    yc = z * torch.clamp(y / z, -(cy / fy + margin_y), (height - cy) / fy + margin_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * xc / z**2, zero, fy / z, -fy * yc / z**2], -1).view(*z.shape, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    conics = torch.stack([c, -b, a], -1) / det.clamp(min=1e-10)[..., None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    radii = torch.stack([torch.ceil(3.33 * a.clamp(min=0).sqrt()), torch.ceil(3.33 * c.clamp(min=0).sqrt())], -1)
    drawn = (det > 0) & (z > near_plane)
    drawn &= (means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
    drawn &= (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height)
    radii = torch.where(drawn[..., None], radii, torch.zeros_like(radii)).int()
    return Projection(means2d, conics, radii, z)


def _pairs(mean2d, radii, width: int, height: int):
    """Every (Gaussian, pixel) whose pixel centre lies inside the Gaussian's radii box and the image,
    Gaussians in the given order: (Gaussian index, pixel x, pixel y)."""
    x0 = torch.ceil(mean2d[:, 0] - radii[:, 0] - 0.5).clamp(0, width - 1).long()
    x1 = torch.floor(mean2d[:, 0] + radii[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(mean2d[:, 1] - radii[:, 1] - 0.5).clamp(0, height - 1).long()
    y1 = torch.floor(mean2d[:, 1] + radii[:, 1] - 0.5).clamp(-1, height - 1).long()
    w, h = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    counts = w * h
    gauss = torch.repeat_interleave(torch.arange(len(counts)), counts)
    # (index_select: much faster than advanced indexing for long index vectors on the CPU)
    local = torch.arange(len(gauss)) - (torch.cumsum(counts, 0) - counts).index_select(0, gauss)
    wg = w.index_select(0, gauss)
    return gauss, x0.index_select(0, gauss) + local % wg, y0.index_select(0, gauss) + local // wg


def rasterize(proj: Projection, colors: torch.Tensor, opacities: torch.Tensor, width: int, height: int,
              background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite each camera's image: colours [N, D] or [C, N, D], opacities [N] → (colour [C, H, W, D],
    alpha [C, H, W, 1], depth [C, H, W, 1]: the α-weighted depth over alpha, 0 where nothing is drawn)."""
    cams = proj.means2d.shape[0]
    out_rgb, out_alpha, out_depth = [], [], []
    for cam in range(cams):  # cameras are few; everything inside is vectorised
        col = colors[cam] if colors.dim() == 3 else colors
        drawn = (proj.radii[cam] > 0).all(-1).nonzero().squeeze(1)
        order = drawn[torch.argsort(proj.depths[cam, drawn], stable=True)]       # front to back
        # one row per drawn Gaussian, gathered once: mean (2), conic (3), opacity, depth, colour (D)
        table = torch.cat([proj.means2d[cam, order], proj.conics[cam, order], opacities[order, None],
                           proj.depths[cam, order, None], col[order]], 1)
        gauss, px, py = _pairs(table[:, :2], proj.radii[cam, order], width, height)
        rows = table.index_select(0, gauss)
        dx = rows[:, 0] - (px.to(table.dtype) + 0.5)
        dy = rows[:, 1] - (py.to(table.dtype) + 0.5)
        sigma = 0.5 * (rows[:, 2] * dx * dx + rows[:, 4] * dy * dy) + rows[:, 3] * dx * dy
        alpha = torch.clamp(rows[:, 5] * torch.exp(-sigma), max=ALPHA_MAX)
        keep = ((sigma >= 0) & (alpha >= ALPHA_MIN)).nonzero().squeeze(1)
        pixel = (py * width + px).index_select(0, keep)
        pixel, by_pixel = torch.sort(pixel, stable=True)                           # depth order kept per pixel
        keep = keep.index_select(0, by_pixel)
        alpha, rows = alpha.index_select(0, keep), rows.index_select(0, keep)
        log_keep = torch.log1p(-alpha)
        csum = torch.cumsum(log_keep.double(), 0)
        first = torch.ones_like(pixel, dtype=torch.bool)
        first[1:] = pixel[1:] != pixel[:-1]
        seg_start = torch.cummax(torch.where(first, torch.arange(len(pixel)), torch.zeros_like(pixel)), 0).values
        before = (csum - log_keep.double()) - (csum - log_keep.double()).index_select(0, seg_start)
        T = torch.exp(before).to(alpha.dtype)                                       # transmittance in front
        live = torch.exp(before + log_keep.double()) > T_MIN                       # gsplat's early stop
        weight = torch.where(live, alpha * T, torch.zeros_like(alpha))
        n_pix = width * height
        rgb = torch.zeros(n_pix, col.shape[-1], dtype=col.dtype).index_add_(0, pixel, weight[:, None] * rows[:, 7:])
        acc = torch.zeros(n_pix, dtype=alpha.dtype).index_add_(0, pixel, weight)
        depth = torch.zeros(n_pix, dtype=alpha.dtype).index_add_(0, pixel, weight * rows[:, 6])
        if background is not None:
            rgb = rgb + (1 - acc)[:, None] * background
        out_rgb.append(rgb.view(height, width, -1))
        out_alpha.append(acc.view(height, width, 1))
        out_depth.append((depth / acc.clamp(min=1e-10)).view(height, width, 1))
    return torch.stack(out_rgb), torch.stack(out_alpha), torch.stack(out_depth)


def render(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
           background: torch.Tensor | None = None, backend: str = "auto"):
    """RGB [C, H, W, D], alpha [C, H, W, 1] and depth [C, H, W, 1] of N Gaussians seen by C cameras.

    ``backend``: "torch" (this module, CPU tensors), "gsplat" (CUDA, needs gsplat), "auto" (gsplat when the
    tensors are on CUDA and gsplat's kernels load, else torch)."""
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and _has_gsplat() else "torch"
    if backend == "gsplat":
        from gsplat import rasterization

        out, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                      render_mode="RGB+ED", backgrounds=None if background is None else
                                      background.expand(len(viewmats), -1))
        return out[..., :-1], alpha, out[..., -1:]
    proj = project(means, covariances(quats, scales), viewmats, Ks, width, height)
    return rasterize(proj, colors, opacities, width, height, background)


def _has_gsplat() -> bool:
    """gsplat importable with its CUDA kernels (built, or buildable: it compiles them on first use)."""
    import importlib.util

    if importlib.util.find_spec("gsplat") is None:
        return False
    try:
        from gsplat.cuda._backend import _C
    except Exception:  # noqa: BLE001 - any failure to load the kernels means: not available
        return False
    return _C is not None
