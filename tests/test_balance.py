"""exporter/balance.py: the exact rescaling of FiPS factors before 8-bit basis products."""
from __future__ import annotations

import numpy as np
import pytest

from test_runtime_helpers import needs_exporter

pytestmark = needs_exporter


def test_scales_equalize_ranges_at_half_alpha():
    from fips_rt.exporter.balance import balance_scales
    rng = np.random.default_rng(0)
    w = rng.uniform(0.01, 3.0, 64)
    a = rng.uniform(0.001, 50.0, 64)
    s = balance_scales(w, a, 0.5)
    np.testing.assert_allclose(a / s, w * s, rtol=1e-12)  # both become sqrt(a * w)
    np.testing.assert_allclose(balance_scales(w, a, 0.0), 1 / w)
    np.testing.assert_allclose(balance_scales(w, a, 1.0), a)


def test_scales_leave_empty_directions_alone_and_refuse_bad_input():
    from fips_rt.exporter.balance import balance_scales
    s = balance_scales(np.array([0.0, 2.0, np.inf, 1.0]), np.array([1.0, 0.0, 1.0, 4.0]))
    np.testing.assert_array_equal(s[:3], 1.0)
    assert s[3] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="alpha"):
        balance_scales(np.ones(3), np.ones(3), 1.5)
    with pytest.raises(ValueError, match="one length"):
        balance_scales(np.ones(3), np.ones(4))


def _int8_blocks(x: np.ndarray, block: int = 32) -> np.ndarray:
    """Symmetric int8 per block of ``block`` values along the last axis (what MatMulNBits at accuracy level
    4 does to its input)."""
    k = x.shape[-1]
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (-k) % block)]).reshape(*x.shape[:-1], -1, block)
    sc = np.abs(pad).max(-1, keepdims=True) / 127
    sc[sc == 0] = 1
    return (np.round(pad / sc) * sc).reshape(*x.shape[:-1], -1)[..., :k]


def test_rescaling_is_exact_and_protects_the_quantized_activations():
    """U·diag(s) with V's rows / s is the same product, and with t's coordinates of very different ranges
    (rows of V of different scales) the int8 activations of t·Uᵀ lose far less after it."""
    from fips_rt.exporter.balance import balance_scales
    rng = np.random.default_rng(1)
    d, r, n = 48, 64, 96
    U = rng.standard_normal((d, r))
    V = rng.standard_normal((r, n)) * np.exp(rng.uniform(-4, 4, r))[:, None]  # outlier directions
    V *= rng.random((r, n)) < 0.5
    s = balance_scales(np.abs(U).max(0), np.abs(V).max(1))
    Ub, Vb = U * s[None, :], V / s[:, None]
    np.testing.assert_allclose(Ub @ Vb, U @ V, rtol=1e-10, atol=1e-12)
    x = rng.standard_normal((16, n))
    ref = (x @ V.T) @ U.T
    plain = _int8_blocks(x @ V.T) @ U.T
    balanced = _int8_blocks(x @ Vb.T) @ Ub.T
    err = lambda y: np.linalg.norm(y - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(balanced) < 0.5 * err(plain), (err(balanced), err(plain))


def test_basis_scales_cover_groups_with_a_down_projection_only():
    import torch
    from fips_rt.exporter.balance import basis_scales
    from fips_rt.modules import FipsLinear, SharedBasis
    g = torch.Generator().manual_seed(0)
    U = SharedBasis(torch.randn(8, 6, generator=g))
    mask = torch.rand(6, 10, generator=g) < 0.6
    down = FipsLinear(U, torch.randn(6, 10, generator=g), mask, "out")
    up = FipsLinear(U, torch.randn(6, 10, generator=g), mask, "in")
    only_up = FipsLinear(SharedBasis(torch.randn(8, 6, generator=g)), torch.randn(6, 10, generator=g), mask, "in")
    model = torch.nn.ModuleList([down, up, only_up])
    before = [p.detach().clone() for p in model.parameters()]
    scales = basis_scales(model)
    assert scales[id(only_up.basis.weight)] is None
    s = scales[id(U.weight)]
    assert s.shape == (6,) and np.all(s > 0)
    a = (down.V.detach() * down.mask).abs().amax(1).double().numpy()
    np.testing.assert_allclose(a / s, U.weight.detach().abs().amax(0).double().numpy() * s, rtol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the model is only read
