"""dtk.gs: EWA projection against gsplat's reference maths, the rasteriser against closed forms and a per-pixel loop."""

import math

import pytest
import torch

from dtk.gs.render import covariances, project, quat_to_rotmat, rasterize, render


def random_gaussians(n, seed=0, depth=(2.0, 6.0)):
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([torch.rand(n, 2, generator=g) * 4 - 2,
                       torch.rand(n, 1, generator=g) * (depth[1] - depth[0]) + depth[0]], 1).double()
    quats = torch.randn(n, 4, generator=g).double()
    scales = (torch.rand(n, 3, generator=g) * 0.15 + 0.01).double()
    opacities = torch.rand(n, generator=g).double()
    colors = torch.rand(n, 3, generator=g).double()
    return means, quats, scales, opacities, colors


def cameras(width, height, seed=1):
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(4, dtype=torch.float64)
    turned = eye.clone()
    turned[:3, :3] = quat_to_rotmat(torch.tensor([1.0, 0.05, -0.1, 0.02], dtype=torch.float64))
    turned[:3, 3] = (torch.rand(3, generator=g).double() - 0.5) * 0.4
    K = torch.tensor([[1.2 * width, 0, width / 2], [0, 1.2 * width, height / 2], [0, 0, 1]], dtype=torch.float64)
    return torch.stack([eye, turned]), torch.stack([K, K * torch.tensor([[0.8], [0.8], [1.0]], dtype=torch.float64)])


def test_projection_equals_gsplat_reference():
    ref = pytest.importorskip("gsplat.cuda._torch_impl")
    means, quats, scales, _, _ = random_gaussians(500)
    viewmats, Ks = cameras(64, 48)
    covars = covariances(quats, scales)
    radii, means2d, depths, conics, _ = ref._fully_fused_projection(means, covars, viewmats, Ks, 64, 48)
    ours = project(means, covars, viewmats, Ks, 64, 48)
    assert torch.equal(ours.radii, radii)
    shown = (radii > 0).all(-1)
    assert shown.sum() > 200
    assert torch.allclose(ours.means2d[shown], means2d[shown], atol=1e-9)
    assert torch.allclose(ours.conics[shown], conics[shown], rtol=1e-9, atol=1e-9)
    assert torch.allclose(ours.depths, depths)
    assert torch.allclose(covars, ref._quat_scale_to_covar_preci(quats, scales, compute_preci=False)[0])
    # isotropic Gaussians take a shortcut (Σ = s² I whatever the rotation): the same matrices
    iso = scales[:, :1].expand(-1, 3).contiguous()
    assert torch.allclose(covariances(quats, iso), ref._quat_scale_to_covar_preci(quats, iso, compute_preci=False)[0])


def test_single_gaussian_closed_form():
    # an isotropic Gaussian on the optical axis: J = diag(f/z), Σ' = ((f s/z)² + 0.3) I
    f, z, s, o, w, h = 40.0, 4.0, 0.05, 0.8, 32, 32
    means = torch.tensor([[0.0, 0.0, z]], dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = torch.tensor([[[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]], dtype=torch.float64)
    rgb, alpha, depth = render(means, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                               torch.full((1, 3), s, dtype=torch.float64), torch.tensor([o], dtype=torch.float64),
                               torch.tensor([[0.2, 0.5, 1.0]], dtype=torch.float64), viewmats, Ks, w, h)
    var = (f * s / z) ** 2 + 0.3
    radius = math.ceil(3.33 * math.sqrt(var))
    expected = torch.zeros(h, w, dtype=torch.float64)
    for py in range(h):
        for px in range(w):
            dx, dy = w / 2 - (px + 0.5), h / 2 - (py + 0.5)
            if abs(px + 0.5 - w / 2) > radius + 1 or abs(py + 0.5 - h / 2) > radius + 1:
                continue
            a = min(0.99, o * math.exp(-0.5 * (dx * dx + dy * dy) / var))
            expected[py, px] = a if a >= 1 / 255 else 0.0
    assert torch.allclose(alpha[0, ..., 0], expected, atol=1e-12)
    assert torch.allclose(rgb[0, ..., 1], 0.5 * expected, atol=1e-12)
    assert torch.allclose(depth[0, ..., 0][expected > 0], torch.full_like(expected[expected > 0], z))


def loop_rasterize(proj, colors, opacities, width, height, cam=0):
    """The straightforward reference: per pixel, Gaussians sorted by depth, composited one by one."""
    order = sorted(range(len(opacities)), key=lambda i: float(proj.depths[cam, i]))
    image = torch.zeros(height, width, colors.shape[1], dtype=colors.dtype)
    acc = torch.zeros(height, width, dtype=colors.dtype)
    for py in range(height):
        for px in range(width):
            T = 1.0
            for i in order:
                rx, ry = proj.radii[cam, i].tolist()
                mx, my = proj.means2d[cam, i].tolist()
                if rx == 0 or ry == 0 or not (mx - rx - 1 <= px <= mx + rx and my - ry - 1 <= py <= my + ry):
                    continue
                a_, b_, c_ = proj.conics[cam, i].tolist()
                dx, dy = mx - (px + 0.5), my - (py + 0.5)
                sigma = 0.5 * (a_ * dx * dx + c_ * dy * dy) + b_ * dx * dy
                alpha = min(0.99, float(opacities[i]) * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                image[py, px] += colors[i] * alpha * T
                T *= 1 - alpha
            acc[py, px] = 1 - T
    return image, acc


def test_rasteriser_equals_a_per_pixel_loop():
    means, quats, scales, opacities, colors = random_gaussians(60, seed=3)
    opacities = opacities * 0.5 + 0.5
    viewmats, Ks = cameras(24, 20)
    proj = project(means, covariances(quats, scales), viewmats, Ks, 24, 20)
    rgb, alpha, _ = rasterize(proj, colors, opacities, 24, 20)
    for cam in range(2):
        image, acc = loop_rasterize(proj, colors, opacities, 24, 20, cam)
        assert acc.max() > 0.9  # overlapping, opaque: the early stop and the order matter
        assert torch.allclose(rgb[cam], image, atol=1e-9)
        assert torch.allclose(alpha[cam, ..., 0], acc, atol=1e-9)
    # float32 geometry with float64 colours: the images come out in the colours' type
    proj32 = project(means.float(), covariances(quats, scales).float(), viewmats.float(), Ks.float(), 24, 20)
    rgb32, _, _ = rasterize(proj32, colors, opacities.float(), 24, 20)
    assert rgb32.dtype == torch.float64 and torch.allclose(rgb32, rgb, atol=1e-4)


def test_bands_threads_and_key_widths_give_the_same_image(monkeypatch):
    """The image does not depend on how it is cut into bands, on threads, or on int32/int64 keys."""
    import dtk.gs.render as gs_render

    means, quats, scales, opacities, colors = random_gaussians(80, seed=5)
    viewmats, Ks = cameras(31, 23)
    proj = project(means, covariances(quats, scales), viewmats, Ks, 31, 23)
    expected = rasterize(proj, colors, opacities, 31, 23)
    threads = torch.get_num_threads()
    for band_elements, int32_max, n_threads in ((10, 2**31 - 1, 2), (8_000_000, 100, 1), (50, 100, 3)):
        monkeypatch.setattr(gs_render, "_BAND_ELEMENTS", band_elements)
        monkeypatch.setattr(gs_render, "_INT32_MAX", int32_max)
        torch.set_num_threads(n_threads)
        try:
            got = rasterize(proj, colors, opacities, 31, 23)
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-12)


def test_gaussians_larger_than_a_band():
    """Gaussians whose boxes span several bands (and round up past a band's height) are drawn on every row."""
    means, quats, scales, opacities, colors = random_gaussians(6, seed=7, depth=(2.5, 3.0))
    scales = scales * 6 + 0.3                    # footprints of most of the frame
    means[:, :2] *= 0.2
    viewmats, Ks = cameras(40, 36)
    proj = project(means, covariances(quats, scales), viewmats[:1], Ks[:1], 40, 36)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                     # 4 bands of 9 rows: boxes of 9 rows round up to grids of 10
    try:
        rgb, alpha, _ = rasterize(proj, colors, opacities * 0.5 + 0.5, 40, 36)
    finally:
        torch.set_num_threads(threads)
    image, acc = loop_rasterize(proj, colors, opacities * 0.5 + 0.5, 40, 36)
    assert acc.min() > 0.5
    assert torch.allclose(alpha[0, ..., 0], acc, atol=1e-9) and torch.allclose(rgb[0], image, atol=1e-9)


def _rasterize_in_child(proj, colors, opacities, queue):
    queue.put(float(rasterize(proj, colors, opacities, 24, 20)[1].sum()))


def test_rasterizing_in_a_forked_child_after_the_parent():
    """The band thread pool of the parent does not survive fork(): the child makes its own. (Only the
    rasteriser runs in the child: torch's BLAS thread pool itself hangs in a forked child.)"""
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        means, quats, scales, opacities, colors = random_gaussians(30)
        viewmats, Ks = cameras(24, 20)
        proj = project(means, covariances(quats, scales), viewmats, Ks, 24, 20)
        expected = float(rasterize(proj, colors, opacities, 24, 20)[1].sum())
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_rasterize_in_child, args=(proj, colors, opacities, queue))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            pytest.fail("the forked child hung")
        assert child.exitcode == 0 and queue.get(timeout=5) == pytest.approx(expected)
    finally:
        torch.set_num_threads(threads)


def test_background_and_nothing_drawn():
    means, quats, scales, opacities, colors = random_gaussians(5)
    viewmats, Ks = cameras(16, 12)
    viewmats = viewmats.clone()
    viewmats[:, 2, 3] = -100.0  # everything behind the camera
    rgb, alpha, depth = render(means, quats, scales, opacities, colors, viewmats, Ks, 16, 12,
                               background=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert alpha.abs().max() == 0 and depth.abs().max() == 0
    assert torch.allclose(rgb, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).expand_as(rgb))
