"""dtk.gs.sh: view-dependent SH colour against gsplat's pure-torch reference and closed forms; the PLY layout of
f_rest_* (channel-major, as graphdeco-inria/gaussian-splatting's save_ply writes it); gsplat gets the SH."""

import math

import numpy as np
import pytest
import torch

from dtk.errors import BadInput
from dtk.gs.cameras import pose, rotation
from dtk.gs.field import Gaussians, ply_bytes_per_gaussian, read_ply, write_ply
from dtk.gs.render import render
from dtk.gs.sh import C0, C1, camera_centres, degree_of, sh_colors


def random_cameras(seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [pose(rotation(*(torch.rand(3, generator=g) * 2 - 1).tolist()),
                  (torch.rand(3, generator=g) * 4 - 2).double()) for _ in range(3)]
    return torch.stack(views)


def looking_at_origin(side):
    """A camera 2 m from the origin on the ``side`` axis ("-x", "+x", "-z", "+z"), looking at it."""
    yaw = {"-z": 0.0, "+z": math.pi, "-x": math.pi / 2, "+x": -math.pi / 2}[side]
    R = rotation(yaw, 0.0, 0.0)
    return pose(R, -2.0 * R[:, 2])   # the camera's z axis (R's third column) points at the origin


def test_sh_colours_equal_gsplats_reference():
    ref = pytest.importorskip("gsplat.cuda._torch_impl")
    g = torch.Generator().manual_seed(1)
    means = torch.randn(400, 3, generator=g, dtype=torch.float64) * 3
    viewmats = random_cameras()
    centres = torch.linalg.inv(viewmats)[:, :3, 3]        # gsplat's way to the camera centres
    assert torch.allclose(camera_centres(viewmats), centres, atol=1e-12)
    for degree in range(4):
        k = (degree + 1) ** 2
        coeffs = torch.randn(400, k, 3, generator=g, dtype=torch.float64)
        ours = sh_colors(coeffs, means, viewmats)
        assert ours.shape == (3, 400, 3)
        for c in range(3):
            dirs = means - centres[c]
            expected = (ref._spherical_harmonics(degree, dirs, coeffs) + 0.5).clamp(min=0)
            assert torch.allclose(ours[c], expected, atol=1e-12), degree
        assert (ours == 0).any() and (ours > 1).any()   # clamped at 0 only, as 3DGS does
        if degree:   # the direction matters: the same coefficients give other colours from another camera
            assert (ours[0] - ours[1]).abs().max() > 0.1


def test_degree_zero_is_c0_times_dc_plus_half():
    assert C0 == pytest.approx(0.28209479177387814, abs=1e-16)
    assert C1 == pytest.approx(0.4886025119029199, abs=1e-16)
    dc = torch.tensor([[[0.5, -1.0, -3.0]], [[2.0, 0.0, 1.0]]], dtype=torch.float64)
    got = sh_colors(dc, torch.randn(2, 3, dtype=torch.float64), random_cameras())
    expected = (C0 * dc[:, 0] + 0.5).clamp(min=0)
    assert torch.allclose(got, expected.expand(3, -1, -1), atol=1e-15)
    assert got[0, 0, 2] == 0 and got[0, 0, 0] == pytest.approx(0.5 + 0.5 * C0)


def test_degree_one_signs_and_the_viewing_direction():
    """3DGS: Y_1 = C1·(−y, z, −x) at v = normalize(mean − camera centre). A Gaussian at the origin seen from −x has
    v = +x; from +x, v = −x; from −z, v = +z."""
    coeffs = torch.zeros(1, 4, 3, dtype=torch.float64)
    coeffs[0, 3, 0] = 0.4   # red on the x term
    coeffs[0, 2, 1] = 0.3   # green on the z term
    coeffs[0, 1, 2] = 0.2   # blue on the y term
    views = torch.stack([looking_at_origin(s) for s in ("-x", "+x", "-z")])
    assert torch.allclose(camera_centres(views), torch.tensor([[-2.0, 0, 0], [2.0, 0, 0], [0, 0, -2.0]],
                                                              dtype=torch.float64), atol=1e-12)
    got = sh_colors(coeffs, torch.zeros(1, 3, dtype=torch.float64), views)[:, 0]
    expected = torch.tensor([[0.5 - C1 * 0.4, 0.5, 0.5], [0.5 + C1 * 0.4, 0.5, 0.5], [0.5, 0.5 + C1 * 0.3, 0.5]],
                            dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-12)


def test_degree_of():
    assert [degree_of(k) for k in (1, 4, 9, 16)] == [0, 1, 2, 3]
    for k in (0, 2, 25):
        with pytest.raises(ValueError):
            degree_of(k)


def write_raw_ply(path, columns: dict):
    """A binary float32 PLY with the given vertex properties, in order (as any 3DGS trainer writes it)."""
    n = len(next(iter(columns.values())))
    table = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, values in columns.items():
        table[name] = values
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n" + \
        "".join(f"property float {name}\n" for name in columns) + "end_header\n"
    path.write_bytes(header.encode() + table.tobytes())


def scene_columns(n, rest, seed=0):
    rng = np.random.default_rng(seed)
    columns = {"x": rng.normal(size=n), "y": rng.normal(size=n), "z": rng.uniform(2, 3, n),
               "nx": np.zeros(n), "ny": np.zeros(n), "nz": np.zeros(n),
               "f_dc_0": rng.normal(size=n), "f_dc_1": rng.normal(size=n), "f_dc_2": rng.normal(size=n)}
    columns.update({f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])})
    columns.update({"opacity": rng.normal(size=n), "scale_0": np.full(n, -3.0), "scale_1": np.full(n, -3.5),
                    "scale_2": np.full(n, -4.0), "rot_0": np.ones(n), "rot_1": rng.normal(size=n) * 0.1,
                    "rot_2": np.zeros(n), "rot_3": np.zeros(n)})
    return columns


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_ply_f_rest_are_channel_major(tmp_path, degree):
    """f_rest_i with i = c·(K−1) + j is coefficient j + 1 of channel c (R's first, then G's, then B's)."""
    k = (degree + 1) ** 2
    rest = np.tile(np.arange(3 * (k - 1), dtype=np.float64) + 1, (5, 1)) * np.arange(1, 6)[:, None]
    write_raw_ply(tmp_path / "s.ply", scene_columns(5, rest))
    g = read_ply(str(tmp_path / "s.ply"))
    assert g.sh.shape == (5, k, 3) and g.sh_degree == degree
    for c in range(3):
        for j in range(k - 1):
            assert torch.equal(g.sh[:, 1 + j, c], torch.arange(1, 6, dtype=torch.float64) * (c * (k - 1) + j + 1))
    assert torch.allclose(g.sh[:, 0], torch.from_numpy(np.stack([scene_columns(5, rest)[f"f_dc_{c}"]
                                                                  for c in range(3)], 1)).float().double())


def test_ply_bad_f_rest(tmp_path):
    write_raw_ply(tmp_path / "s.ply", scene_columns(3, np.ones((3, 10))))
    with pytest.raises(BadInput, match="10 f_rest_"):
        read_ply(str(tmp_path / "s.ply"))
    columns = scene_columns(3, np.ones((3, 9)))
    columns["f_rest_9"] = columns.pop("f_rest_8")   # a gap: f_rest_0..7, 9
    write_raw_ply(tmp_path / "gap.ply", columns)
    with pytest.raises(BadInput, match="f_rest_0..N-1"):
        read_ply(str(tmp_path / "gap.ply"))


def sh_scene(n, degree, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.randn(n, 3, generator=g, dtype=torch.float64) + torch.tensor([0, 0, 3.0]),
                     quats=torch.randn(n, 4, generator=g, dtype=torch.float64),
                     scales=torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.1 + 0.01,
                     opacities=torch.rand(n, generator=g, dtype=torch.float64),
                     colors=torch.rand(n, 3, generator=g, dtype=torch.float64),
                     sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_write_ply_keeps_the_sh(tmp_path, degree):
    g0 = sh_scene(50, degree)
    for fmt, rest in (("full", 45), ("compact", 3 * ((degree + 1) ** 2 - 1))):
        write_ply(tmp_path / f"{fmt}.ply", g0, fmt)
        raw = (tmp_path / f"{fmt}.ply").read_bytes()
        header = raw.split(b"end_header\n")[0].decode()
        names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
        assert sum(name.startswith("f_rest_") for name in names) == rest
        assert ("nx" in names) == (fmt == "full")
        assert len(raw) - len(header) - len("end_header\n") == 50 * ply_bytes_per_gaussian(fmt, degree)
        g1 = read_ply(str(tmp_path / f"{fmt}.ply"))
        # the zero bands "full" pads with are dropped on reading: the same degree comes back
        assert g1.sh_degree == degree and torch.allclose(g1.sh, g0.sh, atol=1e-6, rtol=1e-6), fmt
    assert ply_bytes_per_gaussian("full") == 248 and ply_bytes_per_gaussian("compact", 0) == 56


def test_render_with_sh_from_opposite_sides():
    """One opaque Gaussian at the origin, its red on the x term: seen from −x and +x its centre pixel takes the two
    colours of the closed form (α = opacity at the centre), through the whole render path."""
    coeffs = torch.zeros(1, 4, 3, dtype=torch.float64)
    coeffs[0, 0] = 0.4
    coeffs[0, 3, 0] = 0.5
    views = torch.stack([looking_at_origin("-x"), looking_at_origin("+x")])
    K = torch.tensor([[40.0, 0, 16], [0, 40, 16], [0, 0, 1]], dtype=torch.float64).expand(2, 3, 3)
    args = (torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
            torch.full((1, 3), 0.3, dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    rgb, alpha, _ = render(*args, coeffs, views, K, 32, 32, sh_degree=1)
    base = 0.5 + C0 * 0.4
    for cam, red in ((0, base - C1 * 0.5), (1, base + C1 * 0.5)):
        centre = rgb[cam, 15:17, 15:17].reshape(-1, 3)
        a = alpha[cam, 15:17, 15:17].reshape(-1, 1)
        assert torch.allclose(centre, a * torch.tensor([red, base, base], dtype=torch.float64), atol=1e-12)
    assert float(rgb[1, 16, 16, 0] - rgb[0, 16, 16, 0]) > 0.3
    with pytest.raises(ValueError, match="degree 2"):
        render(*args, coeffs, views, K, 32, 32, sh_degree=2)


def test_gsplat_backend_gets_the_sh(monkeypatch):
    """On CUDA gsplat evaluates the SH itself: it must get the coefficients [N, K, 3] and the degree."""
    gsplat = pytest.importorskip("gsplat")
    seen = {}

    def fake(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw):
        seen.update(colors=colors, **kw)
        return torch.zeros(len(viewmats), height, width, 4), torch.zeros(len(viewmats), height, width, 1), {}

    monkeypatch.setattr(gsplat, "rasterization", fake)
    g = sh_scene(7, 2)
    render(g.means, g.quats, g.scales, g.opacities, g.sh, random_cameras(), torch.eye(3).expand(3, 3, 3), 8, 6,
           backend="gsplat", sh_degree=2)
    assert seen["sh_degree"] == 2 and seen["colors"] is g.sh
    render(g.means, g.quats, g.scales, g.opacities, g.colors, random_cameras(), torch.eye(3).expand(3, 3, 3), 8, 6,
           backend="gsplat")
    assert seen["sh_degree"] is None and seen["colors"] is g.colors
