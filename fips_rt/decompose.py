"""Pure decomposition math: activation-aware whitening and the shared (overcomplete) SVD init.

Orientation: every weight is given as W_k of shape d x d_ff (d -> d_ff linears transposed), and a
group's weights are concatenated along d_ff: M = [W_1 | W_2 | ...]. The init returns U (d x r), shared,
and V_k (r x d_ff) per weight with W_k ~= U V_k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def normalized_cov(x_t_x: torch.Tensor, n: int) -> torch.Tensor:
    """Second-moment matrix X^T X / n scaled to unit mean eigenvalue (trace / d = 1)."""
    c = x_t_x.double() / max(n, 1)
    tr = torch.trace(c) / c.shape[0]
    return c / tr.clamp_min(1e-30)


def whitening_factor(cov: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Lower Cholesky factor L of cov + ridge*I (cov = L L^T), float64. Retries with a larger ridge."""
    c = cov.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    r = ridge
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(c + r * eye)
        if int(info) == 0:
            return L
        r *= 10.0
    raise RuntimeError("covariance is not positive definite even with a large ridge")


def diag_scale(second_moment: torch.Tensor) -> torch.Tensor:
    """Diagonal weighting sqrt(E[h^2]) normalized to unit RMS (keeps V's sparsity pattern when undone)."""
    s = second_moment.double().clamp_min(0).sqrt()
    rms = s.pow(2).mean().sqrt().clamp_min(1e-30)
    return (s / rms).clamp_min(1e-6)


def left_singular_vectors(M: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of a wide matrix, by decreasing singular value (float64).

    Uses the eigendecomposition of the Gram matrix M M^T (d x d): one matmul plus a small eigh, far
    faster than a full SVD of d x (n*F*d_ff) on a CPU, and exact at full rank since P P^T = I."""
    if M.shape[0] > M.shape[1]:
        return torch.linalg.svd(M, full_matrices=False)[0]
    evals, P = torch.linalg.eigh(M @ M.T)
    return P.flip(-1)


@dataclass
class SharedInit:
    U: torch.Tensor  # d x r
    V: list[torch.Tensor]  # each r x d_ff_k
    scores: list[torch.Tensor]  # |V_k| in the weighted space, for magnitude pruning (same shapes as V)
    col_scale: list[torch.Tensor]  # per weight, the d_ff-side scaling used (ones where none)


def shared_svd_init(weights: Sequence[torch.Tensor], rank: int, *, d_factor: torch.Tensor | None = None,
                    col_scales: Sequence[torch.Tensor | None] | None = None, tau: float = 32.0) -> SharedInit:
    """Shared basis for a group of weights (each d x d_ff_k).

    M' = L^T [W_1 D_1 | W_2 D_2 | ...] (L: Cholesky factor of the input covariance on the d side, D_k:
    diagonal d_ff-side scaling; both optional), truncated SVD M' = P S Q^T, U' = P_r, V' = S_r Q_r^T.
    Overcomplete (rank > rank(M)): U' gets zero columns, V' copies of its top rows divided by tau.
    Undo: U = L^{-T} U', V_k = V'_k D_k^{-1}. At full rank U V_k = W_k exactly.
    """
    ws = [w.detach().double().cpu() for w in weights]
    d = ws[0].shape[0]
    scales = [None] * len(ws) if col_scales is None else list(col_scales)
    cols = [w.shape[1] for w in ws]
    scaled = [w if s is None else w * s.double().cpu()[None, :] for w, s in zip(ws, scales)]
    M = torch.cat(scaled, dim=1)
    L = None if d_factor is None else d_factor.double().cpu()
    if L is not None:
        M = L.T @ M
    P = left_singular_vectors(M)
    k = min(rank, P.shape[1])
    Up = P[:, :k]
    Vp = Up.T @ M  # = S_k Q_k^T: singular values folded into V'
    if rank > k:  # overcomplete: zero basis columns, scaled copies of the top rows of V'
        extra = rank - k
        Up = torch.cat([Up, torch.zeros(d, extra, dtype=Up.dtype)], dim=1)
        rep = Vp[torch.arange(extra) % k] / tau
        Vp = torch.cat([Vp, rep], dim=0)
    U = Up if L is None else torch.linalg.solve_triangular(L.T, Up, upper=True)
    Vps = list(torch.split(Vp, cols, dim=1))
    Vs, col_scale = [], []
    for vp, s, c in zip(Vps, scales, cols):
        if s is None:
            Vs.append(vp.clone())
            col_scale.append(torch.ones(c, dtype=torch.float64))
        else:
            Vs.append(vp / s.double().cpu()[None, :])
            col_scale.append(s.double().cpu())
    return SharedInit(U=U.float(), V=[v.float() for v in Vs], scores=[vp.abs().float() for vp in Vps],
                      col_scale=[c.float() for c in col_scale])
