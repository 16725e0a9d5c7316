"""Closed-form refits (fips_rt.refit): never increase their quadratic, exact at full rank / density."""
import pytest
import torch

from fips_rt.refit import Quadratic, objective, refit_u, refit_v, weight_space, weighted_total


def _spd(n, g, k=None):
    X = torch.randn(k or 3 * n, n, generator=g, dtype=torch.float64)
    return X.T @ X


def _problem(orientation, d=6, d_ff=10, r=8, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_ff, generator=g, dtype=torch.float64)
    U = torch.randn(d, r, generator=g, dtype=torch.float64)
    V = torch.randn(r, d_ff, generator=g, dtype=torch.float64)
    mask = torch.rand(r, d_ff, generator=g) < density
    q = weight_space(W, CL=_spd(d, g)) if orientation == "in" else weight_space(W, CR=_spd(d_ff, g))
    return q, W, U, V * mask, mask


@pytest.mark.parametrize("orientation", ["in", "out"])
@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("iters", [1, 3, 50])
def test_refit_v_never_increases_objective(orientation, ridge, iters):
    q, W, U, V, mask = _problem(orientation)
    V1 = refit_v(q, U, V, mask, ridge=ridge, iters=iters)
    assert objective(q, U, V1) <= objective(q, U, V) + 1e-9
    assert not torch.any(V1[~mask])  # the mask holds


@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("iters", [1, 3, 50])
def test_refit_u_never_increases_objective(ridge, iters):
    qi, W1, U, V1, m1 = _problem("in", seed=1)
    g = torch.Generator().manual_seed(7)
    qo = weight_space(torch.randn(6, 10, generator=g, dtype=torch.float64), CR=_spd(10, g))
    V2 = torch.randn(8, 10, generator=g, dtype=torch.float64)
    qs, Vs = [qi, qo], [V1, V2]
    U1 = refit_u(qs, U, Vs, ridge=ridge, iters=iters)
    assert weighted_total(qs, U1, Vs) <= weighted_total(qs, U, Vs) + 1e-12


@pytest.mark.parametrize("orientation", ["in", "out"])
def test_refit_v_exact_at_full_rank_and_density(orientation):
    d, d_ff = 6, 10
    q, W, U, V, _ = _problem(orientation, d=d, d_ff=d_ff, r=d)  # r = d: U square, invertible
    full = torch.ones(d, d_ff, dtype=torch.bool)
    V1 = refit_v(q, U, V, full, iters=200)
    torch.testing.assert_close(U @ V1, W, rtol=1e-6, atol=1e-6)
    assert objective(q, U, V1) == pytest.approx(0.0, abs=1e-6 * q.const)


def test_refit_v_per_column_equals_masked_least_squares():
    q, W, U, V, mask = _problem("in", r=8, density=0.4)
    V1 = refit_v(q, U, V, mask, iters=60)
    C = q.CL
    for j in range(W.shape[1]):
        S = torch.nonzero(mask[:, j]).reshape(-1)
        if S.numel() == 0:
            continue
        US = U[:, S]
        v = torch.linalg.solve(US.T @ C @ US, US.T @ C @ W[:, j])
        torch.testing.assert_close(V1[S, j], v, rtol=1e-6, atol=1e-6)


def test_refit_u_exact_when_v_square():
    # V square and invertible: U = W V^-1 gives zero error for a single linear
    g = torch.Generator().manual_seed(3)
    d, r = 5, 7
    W = torch.randn(d, r, generator=g, dtype=torch.float64)
    V = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    q = weight_space(W, CL=_spd(d, g))
    U = refit_u([q], torch.zeros(d, r, dtype=torch.float64), [V], iters=300)
    torch.testing.assert_close(U @ V, W, rtol=1e-6, atol=1e-6)


def test_ridge_keeps_refit_near_current_value():
    q, W, U, V, mask = _problem("out")
    far = refit_v(q, U, V, mask, ridge=0.0, iters=50)
    near = refit_v(q, U, V, mask, ridge=100.0, iters=50)
    assert (near - V).norm() < (far - V).norm()


def test_target_space_quadratic_matches_output_error():
    g = torch.Generator().manual_seed(5)
    H = torch.randn(40, 10, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 6, generator=g, dtype=torch.float64)
    U = torch.randn(6, 8, generator=g, dtype=torch.float64)
    V = torch.randn(8, 10, generator=g, dtype=torch.float64)
    q = Quadratic(CL=None, CR=H.T @ H, R=Y.T @ H, const=float(Y.pow(2).sum()))
    assert objective(q, U, V) == pytest.approx(float((Y - H @ (U @ V).T).pow(2).sum()), rel=1e-9)
