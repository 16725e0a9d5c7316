"""Pure sparsity math: GMP schedule, global magnitude masks, N:M masks, RigL updates (torch tensors)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def gmp_sparsity(step: int, total_steps: int, s_init: float, s_final: float,
                 begin: float = 0.0, end: float = 0.75) -> float:
    """Cubic GMP schedule (Zhu & Gupta): hold s_init, ramp to s_final by ``end`` of training, then hold.

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3 for t0 <= t <= t1.
    """
    if total_steps <= 0:
        return s_final
    t0, t1 = begin * total_steps, end * total_steps
    if step <= t0:
        return s_init
    if step >= t1 or t1 <= t0:
        return s_final
    frac = (step - t0) / (t1 - t0)
    return s_final + (s_init - s_final) * (1.0 - frac) ** 3


def global_magnitude_masks(scores: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """One threshold over all tensors: keep exactly ``keep`` largest scores in total.

    Linear-time selection (no full sort; fine for 10^8 entries); ties at the threshold are kept in
    flat order until the count is exact."""
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    keep = max(0, min(int(keep), total))
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    if keep == 0:
        mask = torch.zeros(total, dtype=torch.bool)
    elif keep == total:
        mask = torch.ones(total, dtype=torch.bool)
    else:
        arr = flat.numpy()
        thr = float(np.partition(arr, total - keep)[total - keep])  # the keep-th largest value
        mask = flat > thr
        short = keep - int(mask.sum())
        if short > 0:
            ties = torch.nonzero(flat == thr).reshape(-1)[:short]
            mask[ties] = True
    devs = [s.device for s in scores]
    return [m.view_as(s).to(d) for m, s, d in zip(torch.split(mask, sizes), scores, devs)]


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every run of M consecutive entries of a row (row-major), keep the N largest."""
    rows, cols = score.shape
    pad = (-cols) % m
    s = torch.nn.functional.pad(score.detach().float(), (0, pad), value=-1.0)
    s = s.reshape(rows, -1, m)
    idx = torch.topk(s, n, dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, -1)[:, :cols].contiguous()


def rigl_drop_fraction(step: int, total_steps: int, initial: float, end: float = 0.75) -> float:
    """Cosine-decayed drop fraction, zero after ``end`` of training."""
    t1 = end * total_steps
    if total_steps <= 0 or step >= t1:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / t1))


def rigl_update(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, drop: float) -> torch.Tensor:
    """Drop the ``drop`` fraction of active weights with the smallest magnitude; regrow as many inactive
    ones with the largest gradient magnitude (a dropped weight is not regrown at once). Keeps nnz fixed."""
    active = int(mask.sum())
    k = int(drop * active)
    if k == 0:
        return mask
    w = weight.detach().abs().reshape(-1).float()
    g = grad.detach().abs().reshape(-1).float()
    m = mask.reshape(-1).clone()
    w_active = torch.where(m, w, torch.full_like(w, float("inf")))
    drop_idx = torch.topk(w_active, k, largest=False).indices
    g_inactive = torch.where(m, torch.full_like(g, -1.0), g)
    grow_idx = torch.topk(g_inactive, k).indices
    m[drop_idx] = False
    m[grow_idx] = True
    return m.view_as(mask)
