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


def obs_saliency(v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Optimal-brain-surgeon saliency of each entry of v under f(w) = (w - v)^T C (w - v): the least increase
    of f when entry j is forced to 0 and every other entry is re-solved, v_j^2 / [C^-1]_jj (float64).
    Magnitude with a diagonal weighting, v_j^2 C_jj, is the same without the re-solve (exact when C is
    diagonal)."""
    cinv = torch.linalg.inv(C.double())
    return v.double().pow(2) / torch.diagonal(cinv)


def obs_scale(h_t_h: torch.Tensor, n: int, ridge: float = 1e-2) -> torch.Tensor:
    """The d_ff-side pruning weights of a d_ff -> d linear from the full second moment of its input:
    sqrt(1 / [C^-1]_cc) with C = normalized_cov(H^T H, n) + ridge I, normalized to unit RMS like
    diag_scale (which is sqrt(C_cc)), so |V| * scale ranks entries by their OBS saliency (obs_saliency)
    within a row while the overall scale against the other linears of the group stays diag_scale's."""
    c = normalized_cov(h_t_h, n)
    c = c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    s = torch.diagonal(torch.linalg.inv(c)).clamp_min(1e-30).reciprocal().sqrt()
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
    col_scale: list[torch.Tensor]  # per weight, the d_ff-side scaling used (ones where none)

    @property
    def scores(self) -> list[torch.Tensor]:
        """|V_k| in the weighted space (|V_k| * D_k), for magnitude pruning; computed on demand, one
        tensor per weight, so the init never holds a second copy of V."""
        return [score_of(v, c) for v, c in zip(self.V, self.col_scale)]


def score_of(V: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """The pruning score of one V: |V| times its d_ff-side scaling (float32)."""
    return V.abs().float().mul_(col_scale.to(V.device, torch.float32)[None, :])


def shared_svd_init(weights: Sequence[torch.Tensor], rank: int, *, d_factor: torch.Tensor | None = None,
                    col_scales: Sequence[torch.Tensor | None] | None = None, tau: float = 32.0) -> SharedInit:
    """Shared basis for a group of weights (each d x d_ff_k).

    M' = L^T [W_1 D_1 | W_2 D_2 | ...] (L: Cholesky factor of the input covariance on the d side, D_k:
    diagonal d_ff-side scaling; both optional), truncated SVD M' = P S Q^T, U' = P_r, V' = S_r Q_r^T.
    Overcomplete (rank > rank(M)): U' gets zero columns, V' copies of its top rows divided by tau.
    Undo: U = L^{-T} U', V_k = V'_k D_k^{-1}. At full rank U V_k = W_k exactly.

    Memory: M' is never formed. Its Gram matrix M' M'^T = L^T (sum_k W_k D_k^2 W_k^T) L is accumulated
    one weight at a time (float32 products, float64 sum), P comes from its float64 eigendecomposition
    (d x d), and V_k = (L P_r)^T W_k (the D_k of V' and of the undo cancel) is one float32 matmul per
    weight. Float64 stays where it is cheap and matters: the d x d Gram sum, the eigendecomposition,
    the Cholesky factor and U's triangular solve; the d x d_ff work is float32. Working set: the
    output V plus one weight, never a concatenation of the group.
    """
    d = weights[0].shape[0]
    scales = [None] * len(weights) if col_scales is None else list(col_scales)
    cols = [w.shape[1] for w in weights]
    L = None if d_factor is None else d_factor.double().cpu()
    if d > sum(cols):  # taller than wide (never for an MLP group): the plain SVD of the small M'
        M = torch.cat([w.detach().double().cpu() * (1.0 if s is None else s.double().cpu()[None, :])
                       for w, s in zip(weights, scales)], dim=1)
        P = torch.linalg.svd(M if L is None else L.T @ M, full_matrices=False)[0]
    else:
        H = torch.zeros(d, d, dtype=torch.float64)
        for w, s in zip(weights, scales):
            ws = w.detach().float().cpu()
            if s is not None:
                ws = ws * s.float().cpu()[None, :]
            H += (ws @ ws.T).double()
            del ws
        G = H if L is None else L.T @ H @ L
        P = torch.linalg.eigh(G)[1].flip(-1)
    k = min(rank, P.shape[1])
    Up = P[:, :k]
    A = (Up if L is None else L @ Up).T.float().contiguous()  # k x d: V'_k D_k^{-1} = A W_k
    extra = rank - k
    rep = torch.arange(extra) % k if extra > 0 else None
    Vs, col_scale = [], []
    for w, s, c in zip(weights, scales, cols):
        v = A @ w.detach().float().cpu()
        if rep is not None:  # overcomplete: scaled copies of the top rows of V'
            v = torch.cat([v, v[rep] / tau], dim=0)
        Vs.append(v)
        col_scale.append(torch.ones(c, dtype=torch.float32) if s is None else s.float().cpu())
    if extra > 0:
        Up = torch.cat([Up, torch.zeros(d, extra, dtype=Up.dtype)], dim=1)
    U = Up if L is None else torch.linalg.solve_triangular(L.T, Up, upper=True)
    return SharedInit(U=U.float(), V=Vs, col_scale=col_scale)
