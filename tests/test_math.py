"""Pure math: groups, rank solver, sparse format, schedules, masks, shared init."""
import numpy as np
import pytest
import torch

from fips_rt.budget import (consecutive_groups, check_groups, kept_params, mlp_budget_from_model_budget,
                            rank_for_budget)
from fips_rt.decompose import diag_scale, normalized_cov, shared_svd_init, whitening_factor
from fips_rt.errors import FipsError
from fips_rt.sparse_format import pack, stored_bytes, transpose_packed, unpack, unpack_mask
from fips_rt.sparsity import (global_magnitude_masks, gmp_sparsity, nm_mask, rigl_drop_fraction, rigl_update)


def test_consecutive_groups_remainder():
    g = consecutive_groups(30, 4)
    assert [len(x) for x in g] == [4] * 7 + [2]
    assert sum(g, []) == list(range(30))
    with pytest.raises(FipsError):
        consecutive_groups(3, 4)


def test_check_groups():
    assert check_groups([[0, 1], [2]], 3) == [[0, 1], [2]]
    for bad in ([[0, 0]], [[0, 5]], [[]]):
        with pytest.raises(FipsError):
            check_groups(bad, 3)


def test_rank_solver_smollm2_numbers():
    # d=576, d_ff=1536, F=3: groups of 4 -> 1024, the group of 2 -> 921 (anchors.md, method-fips.md)
    assert rank_for_budget(0.5, 576, 1536, 12, 0.75) == 1024
    assert rank_for_budget(0.5, 576, 1536, 6, 0.75) == 921
    # DeiT-B, n=4, p=0.5, s=0.75 -> 1365 (method-fips.md; d_ff = 4d, F=2)
    assert rank_for_budget(0.5, 768, 3072, 8, 0.75) == 1365


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("shape", [(576, 1536, 12), (576, 1536, 6), (64, 128, 3), (384, 1536, 8)])
def test_rank_solver_never_exceeds_budget(p, s, shape):
    d, d_ff, n = shape
    r = rank_for_budget(p, d, d_ff, n, s)
    assert kept_params(r, d, n * d_ff, s) <= p * n * d * d_ff
    assert kept_params(r + 1, d, n * d_ff, s) > p * n * d * d_ff  # and it is the largest such rank


def test_model_budget_conversion():
    assert mlp_budget_from_model_budget(0.8, 100, 50) == pytest.approx(0.6)
    with pytest.raises(FipsError):
        mlp_budget_from_model_budget(0.3, 100, 50)


def test_sparse_format_roundtrip_odd_shape():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((37, 45)).astype(np.float32)
    mask = rng.random((37, 45)) < 0.3
    values, packed = pack(V, mask)
    assert packed.dtype == np.uint8 and packed.size == (37 * 45 + 7) // 8
    assert values.size == mask.sum()
    assert np.array_equal(unpack_mask(packed, V.shape), mask)
    assert np.array_equal(unpack(values, packed, V.shape), V * mask)
    # bit order: little-endian within each byte, row-major flat index
    m = np.zeros((1, 16), bool); m[0, 1] = m[0, 9] = True
    assert list(pack(np.ones((1, 16), np.float32), m)[1]) == [2, 2]
    assert stored_bytes(10, (4, 4)) == 42


def test_transpose_packed_is_the_packed_transpose():
    rng = np.random.default_rng(1)
    V = rng.standard_normal((37, 45)).astype(np.float32)
    mask = rng.random((37, 45)) < 0.4
    values, packed = pack(V, mask)
    vt, mt = transpose_packed(values, packed, V.shape)
    want_v, want_m = pack(np.ascontiguousarray(V.T), np.ascontiguousarray(mask.T))
    assert np.array_equal(vt, want_v) and np.array_equal(mt, want_m)
    assert np.array_equal(unpack(vt, mt, (45, 37)), (V * mask).T)
    back_v, back_m = transpose_packed(vt, mt, (45, 37))
    assert np.array_equal(back_v, values) and np.array_equal(back_m, packed)


def test_gmp_schedule_cubic():
    assert gmp_sparsity(0, 100, 0.5, 0.75) == 0.5
    assert gmp_sparsity(75, 100, 0.5, 0.75) == 0.75
    assert gmp_sparsity(100, 100, 0.5, 0.75) == 0.75
    mid = gmp_sparsity(37, 100, 0.5, 0.75)
    frac = 37 / 75
    assert mid == pytest.approx(0.75 + (0.5 - 0.75) * (1 - frac) ** 3)
    seq = [gmp_sparsity(t, 100, 0.0, 0.9) for t in range(101)]
    assert all(b >= a for a, b in zip(seq, seq[1:]))  # monotone
    # cubic: pruning is fast early, slow late
    assert seq[10] - seq[0] > seq[70] - seq[60]


def test_global_pruning_across_layers():
    # one threshold over all tensors: a layer of large weights keeps more than a layer of small ones
    a = torch.full((10, 10), 1.0) + torch.rand(10, 10) * 0.01
    b = torch.full((10, 10), 0.1) + torch.rand(10, 10) * 0.01
    ma, mb = global_magnitude_masks([a, b], 120)
    assert int(ma.sum()) + int(mb.sum()) == 120
    assert int(ma.sum()) == 100 and int(mb.sum()) == 20


def test_nm_mask():
    s = torch.rand(8, 16)
    m = nm_mask(s, 2, 4)
    assert m.view(8, 4, 4).sum(-1).eq(2).all()
    m2 = nm_mask(torch.rand(3, 10), 1, 4)  # tail of 2 columns still gets 1 kept
    assert m2.shape == (3, 10)


def test_rigl_keeps_nnz_and_regrows_by_gradient():
    w = torch.randn(20, 20)
    mask = torch.rand(20, 20) < 0.3
    w = w * mask
    g = torch.randn(20, 20)
    new = rigl_update(w, g, mask, 0.2)
    assert int(new.sum()) == int(mask.sum())
    assert rigl_drop_fraction(0, 100, 0.1) == pytest.approx(0.1)
    assert rigl_drop_fraction(80, 100, 0.1) == 0.0


@pytest.mark.parametrize("whiten", [False, True])
def test_shared_init_exact_at_full_rank(whiten):
    torch.manual_seed(0)
    d = 16
    Ws = [torch.randn(d, 24), torch.randn(d, 24), torch.randn(d, 24)]
    L = None
    scales = None
    if whiten:
        X = torch.randn(200, d) @ torch.randn(d, d)
        L = whitening_factor(normalized_cov(X.T @ X, 200))
        scales = [None, None, diag_scale(torch.rand(24) + 0.1)]
    ini = shared_svd_init(Ws, d, d_factor=L, col_scales=scales)
    for W, V in zip(Ws, ini.V):
        assert torch.allclose(ini.U @ V, W, atol=1e-4)


def test_overcomplete_padding():
    torch.manual_seed(0)
    Ws = [torch.randn(8, 20), torch.randn(8, 20)]
    ini = shared_svd_init(Ws, 12, tau=32.0)  # rank 12 > d = 8
    assert ini.U.shape == (8, 12) and ini.V[0].shape == (12, 20)
    assert torch.all(ini.U[:, 8:] == 0)
    assert torch.allclose(ini.V[0][8:12], ini.V[0][0:4] / 32.0)
    for W, V in zip(Ws, ini.V):  # zero basis columns: the product is still exact
        assert torch.allclose(ini.U @ V, W, atol=1e-4)


def test_whitened_init_beats_plain_on_activation_error():
    torch.manual_seed(0)
    d, n = 32, 2000
    A = torch.randn(d, d) * torch.logspace(0, -2, d)  # strongly anisotropic inputs
    X = torch.randn(n, d) @ A
    Ws = [torch.randn(d, 64) for _ in range(2)]
    L = whitening_factor(normalized_cov(X.T @ X, n), 1e-4)
    plain = shared_svd_init(Ws, 8)
    white = shared_svd_init(Ws, 8, d_factor=L)
    err = lambda ini: sum(float((X @ (W - ini.U @ V)).pow(2).sum()) for W, V in zip(Ws, ini.V))  # noqa: E731
    assert err(white) < err(plain)
