"""Second-order (OBS) selection of V's kept entries: the saliency math and the engine option."""
import pytest
import torch

from fips_rt.config import FipsConfig
from fips_rt.decompose import diag_scale, obs_saliency, obs_scale
from fips_rt.errors import FipsError


def _spd(n, seed=0, corr=0.8):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    C = corr * (A @ A.T) / n + (1 - corr) * torch.eye(n, dtype=torch.float64)
    return C


def _increase_after_resolve(v, C, j):
    """min over w with w_j = 0 of (w - v)^T C (w - v), by solving for the free entries."""
    n = v.numel()
    free = [i for i in range(n) if i != j]
    Cff = C[free][:, free]
    # w_free = v_free + delta, w_j - v_j = -v_j: minimize d^T Cff d - 2 v_j d^T C[free, j] + v_j^2 C_jj
    b = C[free, j] * v[j]
    d = torch.linalg.solve(Cff, b)
    w = v.clone()
    w[free] = v[free] + d
    w[j] = 0.0
    e = w - v
    return float(e @ C @ e)


def test_obs_saliency_is_the_least_increase_after_the_resolve():
    C = _spd(12)
    v = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sal = obs_saliency(v, C)
    for j in range(12):
        assert sal[j].item() == pytest.approx(_increase_after_resolve(v, C, j), rel=1e-8)
        # without the re-solve the increase is v_j^2 C_jj, never smaller
        assert (v[j] ** 2 * C[j, j]).item() >= sal[j].item() - 1e-12


def test_obs_equals_diagonal_weighting_for_a_diagonal_covariance():
    d = torch.rand(10, dtype=torch.float64) + 0.1
    C = torch.diag(d)
    v = torch.randn(10, dtype=torch.float64)
    assert torch.allclose(obs_saliency(v, C), v ** 2 * d)
    # obs_scale of H^T H = n diag(d): same as diag_scale of E[h^2] up to the ridge
    n = 50
    s = obs_scale(n * C, n, ridge=0.0)
    assert torch.allclose(s, diag_scale(d), rtol=1e-9)


def test_obs_scale_ranks_entries_by_saliency_and_keeps_unit_rms():
    n = 16
    C = _spd(n, seed=3)
    s = obs_scale(C * 100, 100, ridge=0.0)
    assert s.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-9)
    v = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    from fips_rt.decompose import normalized_cov
    sal = obs_saliency(v, normalized_cov(C * 100, 100))
    assert torch.equal(torch.argsort((v.abs() * s) ** 2), torch.argsort(sal))


def test_config_checks_selection():
    assert FipsConfig(selection="obs").selection == "obs"
    with pytest.raises(FipsError, match="selection must be one of"):
        FipsConfig(selection="hessian")
    with pytest.raises(FipsError, match="needs the whitened init"):
        FipsConfig(selection="obs", init="svd")


def _calib(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(2)]


def _masks(model):
    from fips_rt.modules import FipsLinear
    return {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, FipsLinear)}


def test_obs_selection_end_to_end_same_budget_other_down_masks():
    from fips_rt.fips import compress_fips
    from fips_rt.testing import tiny_model
    out = {}
    for sel in ("magnitude", "obs"):
        lm = tiny_model("llama", layers=4)
        cfg = FipsConfig(group_size=2, steps=0, sparsity=0.6, refit="after", refit_iters=3, selection=sel)
        rep = compress_fips(lm.model, lm.adapter, cfg, _calib(), device=torch.device("cpu"), log=lambda m: None)
        out[sel] = (_masks(lm.model), sum(g["nnz"] for g in rep["groups"]))
    (m_mag, nnz_mag), (m_obs, nnz_obs) = out["magnitude"], out["obs"]
    assert nnz_mag == nnz_obs  # the same number of kept entries: one global threshold over the same count
    downs = [n for n in m_mag if n.endswith("down_proj")]
    assert downs and any(not torch.equal(m_mag[n], m_obs[n]) for n in downs)


def test_streamed_engine_refuses_obs_selection(tmp_path):
    from fips_rt.streamed import compress_streamed
    with pytest.raises(FipsError, match="not supported by block-by-block onloading"):
        compress_streamed(str(tmp_path), FipsConfig(selection="obs"), None, sk=object(), device=torch.device("cpu"),
                          state_dir=tmp_path / "state")
