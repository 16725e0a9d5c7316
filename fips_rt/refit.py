"""Pure math: closed-form refits of FiPS factors in the activation-weighted space (torch tensors).

Each compressed linear k of a group (oriented d x d_ff, W_k ~= U V_k, V_k masked) has a quadratic error

    f_k(U, V_k) = tr(C_L U V_k C_R V_k^T U^T) - 2 tr(U V_k R^T) + c

* d -> d_ff linears ("in", gate/up): C_L = X^T X of the MLP input, C_R = I, R = C_L W_k
  (the dense weight on the same input), i.e. f = ||X (W_k - U V_k)||^2;
* d_ff -> d linears ("out", down): C_L = I, C_R = H^T H of the linear's input, R = W_k C_R (weight
  space) or Y^T H (fit straight to the dense MLP output Y, which also absorbs the gate/up error).

``refit_v`` minimizes w f_k + lam ||V_k - V_k^0||^2 over V_k's kept entries (ridge toward the current
value), ``refit_u`` minimizes sum_k w_k f_k + lam ||U - U^0||^2 over the shared U. Both run conjugate
gradient from the current value: each iterate lowers the regularized objective, hence also f itself
(f(V_t) <= f(V_0) - lam ||V_t - V_0||^2). For C_R = I the columns of V decouple and each column gets its
own CG step sizes (exact per-column masked least squares after |S_j| iterations); otherwise one CG runs
over all kept entries (columns couple through C_R, as for down_proj).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Quadratic:
    """One linear's error as a quadratic in (U, V): C_L (d x d) or None for I, C_R (d_ff x d_ff) or None
    for I, R (d x d_ff), ``const`` = the error at U V = 0 (so f >= 0), ``weight`` its weight in a sum."""
    CL: torch.Tensor | None
    CR: torch.Tensor | None
    R: torch.Tensor
    const: float = 0.0
    weight: float = 1.0


def weight_space(W: torch.Tensor, CL: torch.Tensor | None = None, CR: torch.Tensor | None = None,
                 weight: float | None = None) -> Quadratic:
    """f = tr(C_L (W - UV) C_R (W - UV)^T); weight defaults to 1 / f(0) (a relative error)."""
    CLW = W if CL is None else CL @ W
    R = CLW if CR is None else CLW @ CR
    const = float((R * W).sum())
    return Quadratic(CL, CR, R, const, (1.0 / max(const, 1e-30)) if weight is None else weight)


def _left(q: Quadratic, M: torch.Tensor) -> torch.Tensor:
    return M if q.CL is None else q.CL @ M


def _right(q: Quadratic, M: torch.Tensor) -> torch.Tensor:
    return M if q.CR is None else M @ q.CR


def objective(q: Quadratic, U: torch.Tensor, V: torch.Tensor) -> float:
    """f(U, V) = tr(C_L U V C_R V^T U^T) - 2 tr(U V R^T) + const (unweighted)."""
    UV = U @ V
    return float((_right(q, _left(q, UV)) * UV).sum() - 2 * (UV * q.R).sum() + q.const)


def _hess_v(q: Quadratic, G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    return _right(q, G @ P)  # U^T C_L U P C_R, with G = U^T C_L U


def refit_v(q: Quadratic, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor, *, ridge: float = 0.0,
            iters: int = 25) -> torch.Tensor:
    """V's kept entries by (ridge-regularized) masked least squares with U fixed; a new tensor.

    ``ridge`` is relative: lam = ridge * the mean diagonal of the Hessian over V. Columns are solved
    independently when C_R = I (per-column CG), jointly otherwise."""
    dt = V.dtype
    m = mask.to(dt)
    G = U.T @ _left(q, U)
    diag = torch.diagonal(G).mean() * (1.0 if q.CR is None else torch.diagonal(q.CR).mean())
    lam = float(ridge) * float(diag)
    B = U.T @ q.R  # the linear term: grad f = 2 (H V - B)
    X = V * m
    r = (B - _hess_v(q, G, X)) * m  # minus half the gradient at V^0 (the ridge term is zero there)
    p = r.clone()
    per_col = q.CR is None
    rr = (r * r).sum(0) if per_col else (r * r).sum()
    for _ in range(iters):
        Hp = (_hess_v(q, G, p) + lam * p) * m
        pHp = (p * Hp).sum(0) if per_col else (p * Hp).sum()
        alpha = torch.where(pHp > 0, rr / pHp.clamp_min(1e-300), torch.zeros_like(pHp))
        X = X + alpha * p
        r = r - alpha * Hp
        rr_new = (r * r).sum(0) if per_col else (r * r).sum()
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
        if float(rr.max() if per_col else rr) == 0.0:
            break
    return X * m


def refit_u(qs: Sequence[Quadratic], U: torch.Tensor, Vs: Sequence[torch.Tensor], *, ridge: float = 0.0,
            iters: int = 25) -> torch.Tensor:
    """The shared U by the normal equations of sum_k w_k f_k with every V_k fixed (CG); a new tensor.

    Normal equations: sum_k w_k C_Lk U (V_k C_Rk V_k^T) = sum_k w_k R_k V_k^T (+ ridge toward U^0).
    Terms with the same C_L (gate and up of one layer; every down) are merged."""
    terms: dict[int, list] = {}
    rhs = torch.zeros_like(U)
    for q, V in zip(qs, Vs):
        A = q.weight * (_right(q, V) @ V.T)  # r x r
        key = id(q.CL) if q.CL is not None else 0
        if key in terms:
            terms[key][1] = terms[key][1] + A
        else:
            terms[key] = [q.CL, A]
        rhs = rhs + q.weight * (q.R @ V.T)
    ops = list(terms.values())

    def H(P: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(P)
        for CL, A in ops:
            out = out + ((P if CL is None else CL @ P) @ A)
        return out

    d = U.shape[0]
    diag = sum(float(torch.diagonal(A).sum()) * (float(torch.trace(CL)) / d if CL is not None else 1.0)
               for CL, A in ops) / U.shape[1]
    lam = float(ridge) * diag
    X = U.clone()
    r = rhs - H(X)
    p = r.clone()
    rr = float((r * r).sum())
    for _ in range(iters):
        if rr == 0.0:
            break
        Hp = H(p) + lam * p
        pHp = float((p * Hp).sum())
        if pHp <= 0:
            break
        alpha = rr / pHp
        X = X + alpha * p
        r = r - alpha * Hp
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    return X


def weighted_total(qs: Sequence[Quadratic], U: torch.Tensor, Vs: Sequence[torch.Tensor]) -> float:
    return sum(q.weight * objective(q, U, V) for q, V in zip(qs, Vs))
