"""Pure arithmetic: layer groups, rank from budget, whole-model <-> MLP budget."""
from __future__ import annotations

import math
from typing import Sequence

from .errors import FipsError


def consecutive_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """Consecutive groups of ``group_size``; the last group takes the remainder (30/4 -> 7x4 + 1x2)."""
    if group_size < 1:
        raise FipsError(f"group size must be >= 1 (got {group_size}).")
    if group_size > n_layers:
        raise FipsError(f"group size {group_size} is larger than the model's {n_layers} layers.")
    return [list(range(s, min(s + group_size, n_layers))) for s in range(0, n_layers, group_size)]


def check_groups(groups: Sequence[Sequence[int]], n_layers: int) -> list[list[int]]:
    """Validate explicit groups: each layer exactly once, indices in range, each group non-empty."""
    seen: set[int] = set()
    out = []
    for g in groups:
        g = [int(i) for i in g]
        if not g:
            raise FipsError("an explicit group is empty.")
        for i in g:
            if not 0 <= i < n_layers:
                raise FipsError(f"layer {i} in the groups is outside 0..{n_layers - 1}.")
            if i in seen:
                raise FipsError(f"layer {i} appears in two groups.")
            seen.add(i)
        out.append(g)
    return out


def rank_for_budget(budget: float, d: int, d_ff: int, n_linears: int, sparsity: float) -> int:
    """Largest rank r whose kept parameters d*r + (1-s)*r*cols fit in budget * n_linears*d*d_ff.

    ``n_linears`` = F*n (linears per MLP times MLPs in the group); cols = n_linears * d_ff.
    r = floor(p * F n d d_ff / (d + F n d_ff (1 - s))), then lowered while the integer count of kept
    V entries (floor((1-s) * r * cols)) would exceed the budget.
    """
    if not 0.0 < budget <= 1.0:
        raise FipsError(f"budget must lie in (0, 1] (got {budget}).")
    cols = n_linears * d_ff
    allowed = budget * n_linears * d * d_ff
    r = int(math.floor(allowed / (d + cols * (1.0 - sparsity)) + 1e-9))
    while r > 0 and kept_params(r, d, cols, sparsity) > allowed + 1e-6:
        r -= 1
    if r < 1:
        raise FipsError(f"budget {budget} leaves no rank for this group (d={d}, d_ff={d_ff}).")
    return r


def kept_nnz(r: int, cols: int, sparsity: float) -> int:
    """Kept entries of an r x cols V at the given sparsity."""
    return int(math.floor((1.0 - sparsity) * r * cols + 1e-9))


def kept_params(r: int, d: int, cols: int, sparsity: float) -> int:
    return d * r + kept_nnz(r, cols, sparsity)


def mlp_budget_from_model_budget(model_budget: float, params_total: int, params_mlp: int) -> float:
    """Fraction of MLP parameters to keep so that the whole model keeps ``model_budget``."""
    other = params_total - params_mlp
    p = (model_budget * params_total - other) / params_mlp
    if not 0.0 < p < 1.0:
        lo = other / params_total
        raise FipsError(
            f"model budget {model_budget} is not reachable by compressing MLPs alone: "
            f"it must lie between {lo:.3f} and 1 for this model.")
    return p
