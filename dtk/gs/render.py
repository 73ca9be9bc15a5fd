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
that would take T to 1e-4 or below ends the pixel (as gsplat does).

Colour c is the Gaussian's own, or with SH coefficients (a 3DGS scene) its
view-dependent colour for each camera, max(0, SH(normalize(μ − centre)) + 0.5)
(``dtk.gs.sh``), computed before rasterising as gsplat does.

How it is vectorised (no Python loop per Gaussian or per pixel): α ≥ 1/255 ⟺
σ ≤ ln(255·o), an ellipse, so each Gaussian only visits its ellipse's bounding
box (inside the radii box). Gaussians with boxes of one size are evaluated
together on a dense [n, h, w] grid by broadcasting (no gathers); the pairs that
pass are compacted to one int key per (pixel, depth rank), sorted once, and
each pixel's transmittance is an exclusive cumulative sum of log(1 − α) within
its run of keys; the weighted sums of colours are one sparse (pixel × Gaussian)
CSR matrix times the colours. The image is cut into horizontal bands, which bounds the
memory per band, keeps the keys within int32 (half the sorting time of int64)
and lets the bands run on the intra-op threads at once.

Memory: a frame allocates and frees a few hundred MB of 1–30 MB arrays. glibc's
defaults hand such blocks back to the kernel on free, so every band faults its
pages in afresh (a fifth of the frame time). On glibc, the first CPU render
asks malloc to keep up to 1 GB of freed memory for reuse instead (mallopt:
M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD 1 GB, M_TOP_PAD 256 MB); the
process's resident memory then stays near its peak.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS2D = 0.3
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
_INT32_MAX = 2**31 - 1
_BAND_ELEMENTS = 8_000_000   # dense grid elements per band at most (memory: ~20 bytes each)
BANDS_PER_THREAD = 2        # bands per intra-op thread: evens out the work between threads
_FAR = 1e15                  # a pixel offset that gives α = 0: marks grid cells outside a Gaussian's box


with warnings.catch_warnings():  # torch warns once per process that sparse CSR (used by _band) is "beta"
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                            size=(0, 0), check_invariants=False)


@functools.cache   # once per process
def _keep_freed_memory() -> None:
    """Ask glibc's malloc to reuse freed blocks up to 32 MB (not to unmap them) and to keep up to 1 GB of free
    memory: most of a frame's arrays are that size. A no-op where libc has no mallopt (musl, macOS, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):   # TypeError: Windows has no CDLL(None)
        return
    mallopt(-3, 32 << 20)    # M_MMAP_THRESHOLD
    mallopt(-1, 1 << 30)     # M_TRIM_THRESHOLD
    mallopt(-2, 256 << 20)   # M_TOP_PAD


def _rotation_entries(quats: torch.Tensor) -> list[torch.Tensor]:
    """The nine entries R_00, R_01, … R_22 (row-major) of the rotations of quaternions (w, x, y, z) [..., 4]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z) [..., 4] → rotation matrices [..., 3, 3]."""
    return torch.stack(_rotation_entries(quats), -1).view(*quats.shape[:-1], 3, 3)


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ = R S Sᵀ Rᵀ [N, 3, 3] from quaternions [N, 4] and scales [N, 3]: Σ_ij = Σ_k R_ik R_jk s_k², written
    out on [N] columns (batched 3×3 products are several times slower on the CPU)."""
    if bool((scales[:, 1:] == scales[:, :1]).all()):   # isotropic (fields from tracks): Σ = s² I, any rotation
        return torch.diag_embed((scales * scales).to(torch.result_type(quats, scales)))
    r = _rotation_entries(quats)
    s2 = (scales * scales).T.contiguous()

    def entry(i: int, j: int) -> torch.Tensor:
        return sum(r[3 * i + k] * r[3 * j + k] * s2[k] for k in range(3))

    xx, xy, xz, yy, yz, zz = entry(0, 0), entry(0, 1), entry(0, 2), entry(1, 1), entry(1, 2), entry(2, 2)
    return torch.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], -1).view(-1, 3, 3)


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
    # vec(R Σ Rᵀ) = (R ⊗ R) vec(Σ): one matrix product per camera instead of N small ones
    kron = torch.einsum("cij,ckl->cikjl", R, R).reshape(-1, 9, 9)
    cov_c = (covars.reshape(1, -1, 9) @ kron.transpose(-1, -2)).view(len(R), -1, 3, 3)
    x, y, z = t.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # the Jacobian is taken at a point clamped to a little beyond the view, so that off-screen
    # Gaussians do not blow up to huge footprints
    margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    xc = z * torch.clamp(x / z, -(cx / fx + margin_x), (width - cx) / fx + margin_x)
    yc = z * torch.clamp(y / z, -(cy / fy + margin_y), (height - cy) / fy + margin_y)
    # Σ' = J Σ_c Jᵀ written out: J has zeros at (0, 1) and (1, 0)
    j00, j02, j11, j12 = fx / z, -fx * xc / z**2, fy / z, -fy * yc / z**2
    s00, s01, s02 = cov_c[..., 0, 0], cov_c[..., 0, 1], cov_c[..., 0, 2]
    s11, s12, s22 = cov_c[..., 1, 1], cov_c[..., 1, 2], cov_c[..., 2, 2]
    a = j00 * j00 * s00 + 2 * j00 * j02 * s02 + j02 * j02 * s22 + eps2d
    b = j00 * j11 * s01 + j00 * j12 * s02 + j02 * j11 * s12 + j02 * j12 * s22
    c = j11 * j11 * s11 + 2 * j11 * j12 * s12 + j12 * j12 * s22 + eps2d
    det = a * c - b * b
    conics = torch.stack([c, -b, a], -1) / det.clamp(min=1e-10)[..., None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    radii = torch.stack([torch.ceil(3.33 * a.clamp(min=0).sqrt()), torch.ceil(3.33 * c.clamp(min=0).sqrt())], -1)
    drawn = (det > 0) & (z > near_plane)
    drawn &= (means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
    drawn &= (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height)
    radii = torch.where(drawn[..., None], radii, torch.zeros_like(radii)).int()
    return Projection(means2d, conics, radii, z)


def _grid_size(n: torch.Tensor) -> torch.Tensor:
    """Box sides rounded up (exact to 7, then in steps of a quarter of the power of two below): few
    distinct grid shapes, at most 25% wasted cells per axis."""
    q = torch.pow(2, (torch.log2(n.clamp(min=1).double()).floor() - 2).clamp(min=0)).long()
    return (n + q - 1) // q * q


def _boxes(table: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Inclusive pixel boxes [N, 4] (x0, x1, y0, y1) of the ellipses σ ≤ s = ln(255·o), within the radii (table
    columns: mean x, y, conic a, b, c, s); an empty box (y1 < y0) for Gaussians that touch no pixel centre."""
    mx, my, a, b, c, s = table[:, :6].unbind(1)
    det = a * c - b * b
    # the ellipse ½dᵀQd ≤ s has half-extents √(2s·(Q⁻¹)_xx) and √(2s·(Q⁻¹)_yy); widened by a hair, since
    # every pair is tested again on σ
    ex = torch.sqrt((2 * s * c / det).clamp(min=0)) * (1 + 1e-6) + 1e-6
    ey = torch.sqrt((2 * s * a / det).clamp(min=0)) * (1 + 1e-6) + 1e-6
    ex, ey = torch.minimum(ex, radii[:, 0].to(ex.dtype)), torch.minimum(ey, radii[:, 1].to(ey.dtype))
    box = torch.stack([torch.ceil(mx - ex - 0.5).clamp(0, width), torch.floor(mx + ex - 0.5).clamp(-1, width - 1),
                       torch.ceil(my - ey - 0.5).clamp(0, height), torch.floor(my + ey - 0.5).clamp(-1, height - 1)],
                      1).long()
    empty = (s <= 0) | (box[:, 1] < box[:, 0]) | (box[:, 3] < box[:, 2])
    box[:, 3] = torch.where(empty, -1, box[:, 3])
    return box


def _band(table: torch.Tensor, values: torch.Tensor, boxes: torch.Tensor, y_start: int, y_stop: int,
          width: int) -> torch.Tensor:
    """Composite rows [y_start, y_stop): table rows (mean x, y, conic a, b, c, σ bound, opacity) in depth order,
    the values to accumulate per Gaussian [N, D], boxes [N, 4] → [(y_stop − y_start)·width, D] sums of
    weight·values."""
    inside = ((boxes[:, 2] < y_stop) & (boxes[:, 3] >= y_start)).nonzero().squeeze(1)   # depth order kept
    n, n_pix = len(inside), (y_stop - y_start) * width
    if n == 0:
        return values.new_zeros(n_pix, values.shape[1])
    key_type = torch.int32 if n * n_pix <= _INT32_MAX else torch.long
    rows = table.index_select(0, inside)
    opacity = rows[:, 6]
    params = torch.cat([rows[:, :6], boxes.index_select(0, inside).to(table.dtype)], 1)
    params[:, 8].clamp_(min=y_start)
    params[:, 9].clamp_(max=y_stop - 1)
    box = params[:, 6:].long()
    w, h = box[:, 1] - box[:, 0] + 1, box[:, 3] - box[:, 2] + 1
    grid_w, grid_h = _grid_size(w), _grid_size(h)
    base = int(grid_h.max()) + 1          # (grid_w, grid_h) packed into one integer
    shape_id = grid_w * base + grid_h
    keys, sigmas = [], []
    shape_id, by_shape = torch.sort(shape_id, stable=True)
    shapes, per_shape = torch.unique_consecutive(shape_id, return_counts=True)
    for shape, members in zip(shapes.tolist(), torch.split(by_shape, per_shape.tolist())):
        gw, gh = divmod(shape, base)      # a few grid shapes, each evaluated for all its Gaussians
        mx, my, a, b, c, s_max, x0, _, y0, _ = params.index_select(0, members).unbind(1)
        jx, jy = torch.arange(gw, dtype=table.dtype), torch.arange(gh, dtype=table.dtype)
        dx = (mx - x0 - 0.5)[:, None] - jx          # mean minus pixel centre, per column and row of the grid
        dy = (my - y0 - 0.5)[:, None] - jy
        # grid cells beyond a Gaussian's own box: an offset so large that σ > any bound (conics are positive
        # definite, eigenvalues ≥ 1/(λ_max + 0.3)), so they never pass the test below
        dx.masked_fill_(jx >= w.index_select(0, members)[:, None], _FAR)
        dy.masked_fill_(jy >= h.index_select(0, members)[:, None], _FAR)
        sigma = (0.5 * c[:, None] * dy * dy)[:, :, None] + (0.5 * a[:, None] * dx * dx)[:, None, :]
        sigma.addcmul_((b[:, None] * dy)[:, :, None], dx[:, None, :])
        hit = (sigma <= s_max[:, None, None]).view(-1).nonzero().squeeze(1)   # ⟺ o·e^{−σ} ≥ 1/255
        row = ((y0.long()[:, None] - y_start + jy.long()) * (width * n) + members[:, None]).to(key_type)
        col = ((x0.long()[:, None] + jx.long()) * n).to(key_type)
        keys.append((row[:, :, None] + col[:, None, :]).view(-1).index_select(0, hit))
        sigmas.append(sigma.view(-1).index_select(0, hit))
    key, order = torch.sort(torch.cat(keys))      # keys are unique: by pixel, then front to back
    if len(key) == 0:
        return values.new_zeros(n_pix, values.shape[1])
    pixel = torch.div(key, n, rounding_mode="floor")
    rank = key - pixel * n
    # σ < 0 only from rounding (conics are positive definite): counted as σ = 0
    alpha = torch.cat(sigmas).index_select(0, order).clamp_(min=0).neg_().exp_()
    alpha = alpha.mul_(opacity.index_select(0, rank)).clamp_(max=ALPHA_MAX)
    # each pixel's run of pairs: row pointers over all the band's pixels (empty runs included)
    counts = torch.bincount(pixel, minlength=n_pix)
    row_start = torch.cumsum(counts, 0).sub_(counts)
    log_keep = torch.log1p(-alpha)
    # transmittance before each pair: an exclusive cumulative sum of log(1 − α) within its pixel's run; in
    # double, since the sum runs over the whole band, then each run's own start subtracted
    before = torch.cumsum(log_keep, 0, dtype=torch.float64).sub_(log_keep)
    run_start = before.index_select(0, row_start.clamp(max=len(key) - 1))
    before = before.sub_(run_start.index_select(0, pixel)).to(alpha.dtype)
    stopped = (before + log_keep) <= math.log(T_MIN)                # gsplat's early stop
    weight = torch.exp(before).mul_(alpha).masked_fill_(stopped, 0)
    # Σ over each pixel's pairs of weight · values[rank]: a sparse (pixel × Gaussian) matrix times the values
    rows = torch.cat([row_start, counts.sum().view(1)]).to(key.dtype)   # CSR indices share the keys' type
    values = values.index_select(0, inside)
    mixing = torch.sparse_csr_tensor(rows, rank, weight.to(values.dtype), size=(n_pix, n),
                                     check_invariants=False)
    return mixing @ values


_pool: tuple[int, int, ThreadPoolExecutor] | None = None   # (process id, threads, pool): a forked child makes its own
_pool_lock = threading.Lock()


def _run_bands(work, bands: int) -> list:
    """Bands on the intra-op threads at once, or in turn. While they run, torch's (process-wide) intra-op
    thread count is 1, so that each band's ops stay on its own thread."""
    global _pool
    threads = torch.get_num_threads()
    if threads == 1 or bands == 1:
        return [work(i) for i in range(bands)]
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), threads):
            _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="dtk-gs"))
        pool = _pool[2]
        torch.set_num_threads(1)
        try:
            return list(pool.map(work, range(bands)))
        finally:
            torch.set_num_threads(threads)


def rasterize(proj: Projection, colors: torch.Tensor, opacities: torch.Tensor, width: int, height: int,
              background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite each camera's image: colours [N, D] or [C, N, D], opacities [N] → (colour [C, H, W, D],
    alpha [C, H, W, 1], depth [C, H, W, 1]: the α-weighted depth over alpha, 0 where nothing is drawn)."""
    _keep_freed_memory()
    cams = proj.means2d.shape[0]
    out_rgb, out_alpha, out_depth = [], [], []
    for cam in range(cams):  # cameras are few; everything inside is vectorised
        col = colors[cam] if colors.dim() == 3 else colors
        drawn = (proj.radii[cam] > 0).all(-1).nonzero().squeeze(1)
        # front to back; positive floats' bit patterns sort like the floats, and an integer sort is an order
        # of magnitude faster (project() draws only depths beyond the near plane)
        sort_key = proj.depths[cam, drawn].contiguous()
        if len(sort_key) and sort_key.min() > 0:
            sort_key = sort_key.view({2: torch.int16, 4: torch.int32, 8: torch.long}[sort_key.element_size()])
        order = drawn[torch.argsort(sort_key, stable=True)]
        opacity = opacities[:, None].to(col.dtype)
        sigma_bound = torch.log(opacity.clamp(min=1e-30) / ALPHA_MIN)            # α ≥ 1/255 ⟺ σ ≤ this
        # every per-Gaussian column in one table, put in depth order by one gather: mean x, y, conic a, b, c,
        # σ bound, opacity | radii x, y | the values accumulated per pixel: colour, depth and 1 (→ alpha)
        rows = torch.cat([proj.means2d[cam], proj.conics[cam], sigma_bound, opacity, proj.radii[cam].to(col.dtype),
                          col, proj.depths[cam, :, None], torch.ones_like(opacity)], 1).index_select(0, order)
        table, values = rows[:, :7], rows[:, 9:]
        boxes = _boxes(table, rows[:, 7:9], width, height)
        # bands: at least BANDS_PER_THREAD per thread; a bounded dense grid per band; and a guess at enough of
        # them for int32 keys (N/bands Gaussians per band; _band checks and falls back to int64)
        cells = ((boxes[:, 1] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 2] + 1)).clamp(min=0).sum().item()
        bands = max(BANDS_PER_THREAD * torch.get_num_threads(), math.ceil(1.5 * cells / _BAND_ELEMENTS))
        while bands < height and (height // bands + 1) * width * len(order) / bands > _INT32_MAX:
            bands *= 2
        bands = min(bands, height)
        edges = [height * i // bands for i in range(bands + 1)]
        parts = _run_bands(lambda i: _band(table, values, boxes, edges[i], edges[i + 1], width), bands)
        out = torch.cat(parts)
        rgb, depth, acc = out[:, :-2], out[:, -2], out[:, -1]
        if background is not None:
            rgb = rgb + (1 - acc)[:, None] * background
        out_rgb.append(rgb.reshape(height, width, -1))
        out_alpha.append(acc.reshape(height, width, 1))
        out_depth.append((depth / acc.clamp(min=1e-10)).reshape(height, width, 1))
    return torch.stack(out_rgb), torch.stack(out_alpha), torch.stack(out_depth)


def render(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
           background: torch.Tensor | None = None, backend: str = "auto", sh_degree: int | None = None):
    """RGB [C, H, W, D], alpha [C, H, W, 1] and depth [C, H, W, 1] of N Gaussians seen by C cameras.

    ``colors``: [N, D] or [C, N, D] colours; with ``sh_degree`` (as gsplat's ``rasterization``), SH coefficients
    [N, K, 3] (K = (sh_degree + 1)², DC first), coloured per camera as 3DGS does (``dtk.gs.sh``).
    ``backend``: "torch" (this module, CPU tensors), "gsplat" (CUDA, needs gsplat), "auto" (gsplat when the
    tensors are on CUDA and gsplat's kernels load, else torch)."""
    if sh_degree is not None:
        from dtk.gs.sh import degree_of

        if colors.dim() != 3 or colors.shape[-1] != 3 or degree_of(colors.shape[1]) != sh_degree:
            raise ValueError(f"SH colours {tuple(colors.shape)} for degree {sh_degree}: want [N, "
                             f"{(sh_degree + 1) ** 2}, 3]")
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and _has_gsplat() else "torch"
    if backend == "gsplat":
        from gsplat import rasterization

        # gsplat evaluates the SH itself, from the same camera centres and with the same + 0.5, clamp at 0
        out, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                      render_mode="RGB+ED", sh_degree=sh_degree,
                                      backgrounds=None if background is None else
                                      background.expand(len(viewmats), -1))
        return out[..., :-1], alpha, out[..., -1:]
    if sh_degree is not None:
        from dtk.gs.sh import sh_colors

        colors = sh_colors(colors, means, viewmats)
    proj = project(means, covariances(quats, scales), viewmats, Ks, width, height)
    return rasterize(proj, colors, opacities, width, height, background)


# bytes per output pixel a CPU render allocates (measured at 1–16 Mpixels, 1–8 threads: 105–150 for one camera,
# 200–210 for two): ~80 per camera (each band's sums of colour, depth and alpha, the concatenated frame, the
# images, their stacking), ~70 shared (the band transients, the threads' malloc arenas); per Gaussian and
# camera, ~1 KB (projection, conics, depth order, SH colours); per thread, a band's dense grid
# (_BAND_ELEMENTS elements, ~20 bytes each)
_PIXEL_BYTES, _PIXEL_BYTES_SHARED, _GAUSSIAN_BYTES = 80, 70, 1024


def render_memory(gaussians: int, cameras: int, width: int, height: int, backend: str = "torch",
                  threads: int | None = None) -> int:
    """About the peak bytes one ``render`` call allocates (what ``dtk render-gs`` checks against the free
    memory before it renders): on the CPU ("torch"), the terms above; with gsplat (CUDA memory), its float32
    outputs (RGB + depth, alpha: 20 bytes per pixel and camera, twice over with its intermediates) and its
    per-Gaussian arrays."""
    pixels = width * height
    if backend == "gsplat":
        return cameras * (40 * pixels + 256 * gaussians)
    threads = threads or torch.get_num_threads()
    return (pixels * (_PIXEL_BYTES * cameras + _PIXEL_BYTES_SHARED) + gaussians * cameras * _GAUSSIAN_BYTES
            + threads * _BAND_ELEMENTS * 20)


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
