"""Exact rescaling of FiPS factors so that the basis products quantize well (``--weights int8|int4``).

A group's layers share U [d, r]. Gate/up compute ``(x·U)·V`` and down computes ``(x·Vᵀ)·Uᵀ``. For any
positive ``s`` [r], ``U·diag(s)`` with every V's rows divided by ``s`` is the same function: column j of U
and row j of each V trade a factor. The choice matters once the basis products go through MatMulNBits at
accuracy level 4, which quantizes its *input* to int8 per block of 32 values: for down that input is
``t = x·Vᵀ``, whose coordinates have very different ranges (measured on the `fips demo` checkpoint,
8 x 512 wiki validation tokens: 8-bit U and 8-bit activations cost 1.032x perplexity, of which the
activations of t·Uᵀ alone 1.027x, the 8-bit weights of U alone 1.008x).

``s_j = a_j^alpha / w_j^(1 - alpha)`` (SmoothQuant's rule) with ``w_j`` the largest |U[:, j]| and ``a_j``
the largest |V[j, :]| over the group's down projections, a data-free stand-in for the range of t_j,
moves range from t into U's columns (the exporter multiplies the U it writes and divides the V's): with alpha = 0.5 both sides end with the range ``sqrt(a_j w_j)``.
Measured, same windows: 8-bit U + activations 0.998x the fp32 export's perplexity after balancing (alpha
0.7: 1.001x; calibration maxima of t instead of the V proxy: 0.998x). The int8 V codes keep one scale per
row, so dividing V's rows leaves their quantization error unchanged; x·U's blocks run down each column
of U, which a per-column factor does not change either.
"""
from __future__ import annotations

import numpy as np

DEFAULT_ALPHA = 0.5


def balance_scales(u_col_max: np.ndarray, t_range: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Per-direction factors ``s`` (U's columns times s, V's rows divided by s).

    u_col_max: max |U[:, j]| per direction; t_range: the range of t_j (max |V[j, :]| over the down
    projections). Directions where either is zero or not finite get s = 1 (nothing to balance)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (got {alpha})")
    w = np.asarray(u_col_max, np.float64)
    a = np.asarray(t_range, np.float64)
    if w.shape != a.shape or w.ndim != 1:
        raise ValueError(f"u_col_max and t_range must be vectors of one length (got {w.shape}, {a.shape})")
    ok = (w > 0) & (a > 0) & np.isfinite(w) & np.isfinite(a)
    s = np.ones_like(w)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s


def basis_scales(model, alpha: float = DEFAULT_ALPHA) -> dict[int, np.ndarray | None]:
    """Per shared basis of ``model`` (keyed by ``id(basis.weight)``, as exporter/layers.py keys them): the
    factors of :func:`balance_scales` over all r directions, or None for a basis without a down projection
    (no t·Uᵀ product). Reads the model only; the exporter applies the factors to the arrays it writes."""
    import torch
    from fips_rt.modules import FipsLinear
    groups: dict[int, list] = {}
    for m in model.modules():
        if isinstance(m, FipsLinear):
            groups.setdefault(id(m.basis.weight), []).append(m)
    out: dict[int, np.ndarray | None] = {}
    with torch.no_grad():
        for key, mods in groups.items():
            downs = [m for m in mods if m.orientation == "out"]
            if not downs:
                out[key] = None
                continue
            w = mods[0].basis.weight.detach().float().abs().amax(0).double().cpu().numpy()
            a = torch.stack([(m.V.detach().float() * m.mask).abs().amax(1) for m in downs]).amax(0)
            out[key] = balance_scales(w, a.double().cpu().numpy(), alpha)
    return out
