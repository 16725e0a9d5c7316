"""Exact global top-k selection over many large score tensors without concatenating them.

``global_magnitude_masks`` (fips_rt.sparsity) keeps the ``keep`` largest scores over a list of
tensors: one threshold, ties at the threshold kept in flat order (tensor by tensor, row-major) until
the count is exact. This module computes the same masks with memory of one tensor plus two 65,536-bin
histograms: float32 scores map to order-preserving 32-bit keys; one pass histograms the upper 16 bits,
a second pass the lower 16 bits inside the chosen upper bin, which fixes the exact threshold key; a
third (the caller's) builds each mask from the threshold and its share of the ties. The tensors are
produced on demand by a callback (from memory, from disk, or on another rank: ``reduce`` sums the
histograms and counts over ranks, so every rank gets the same threshold as one process would).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

_CHUNK = 1 << 22  # entries per chunk: the int64 keys and their temporaries stay near 170 MB


def sortable_keys(score: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2^32) with the same order (negative values included)."""
    bits = score.detach().reshape(-1).float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def _chunks(score: torch.Tensor):
    flat = score.detach().reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield sortable_keys(flat[i:i + _CHUNK])


@dataclass
class Threshold:
    key: int | None  # the keep-th largest key; None: keep nothing (keep == 0) or everything (key < 0)
    all: bool = False
    quotas: list[int] | None = None  # ties at ``key`` kept per tensor (global flat order)
    kept: list[int] | None = None  # entries kept per tensor

    def mask(self, index: int, score: torch.Tensor) -> torch.Tensor:
        if self.all:
            return torch.ones_like(score, dtype=torch.bool)
        if self.key is None:
            return torch.zeros_like(score, dtype=torch.bool)
        m = torch.empty(score.numel(), dtype=torch.bool)
        q, seen, i = self.quotas[index], 0, 0
        for k in _chunks(score):
            part = k > self.key
            if q > seen:
                eq = k == self.key
                order = torch.cumsum(eq.to(torch.int64), 0) + seen
                seen = int(order[-1]) if order.numel() else seen
                part |= eq & (order <= q)
            m[i:i + k.numel()] = part.cpu()
            i += k.numel()
        return m.view(score.shape).to(score.device)


def _hist(score: torch.Tensor, shift: int, select: int | None) -> torch.Tensor:
    out = torch.zeros(1 << 16, dtype=torch.int64)
    for k in _chunks(score):
        if select is not None:
            k = k[(k >> 16) == select]
        out += torch.bincount(((k >> shift) & 0xFFFF), minlength=1 << 16).cpu()
    return out


def hi_histogram(score: torch.Tensor) -> torch.Tensor:
    """Pass 1 for one tensor: counts of the upper 16 key bits (int64 [65536])."""
    return _hist(score, 16, None)


def lo_histogram(score: torch.Tensor, upper: int) -> torch.Tensor:
    """Pass 2 for one tensor: counts of the lower 16 key bits among keys whose upper bits are ``upper``."""
    return _hist(score, 0, upper)


def _from_top(h: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # [b] = count of bins >= b


def upper_bin(hi_rows: torch.Tensor, keep: int) -> tuple[int | None, Threshold | None]:
    """From the per-tensor pass-1 histograms ([n, 65536], all tensors): the upper bin that holds the
    keep-th largest key, or a final Threshold when ``keep`` is 0 or everything."""
    total = int(hi_rows.sum())
    keep = max(0, min(int(keep), total))
    if keep == 0:
        return None, Threshold(None, kept=[0] * hi_rows.shape[0])
    if keep == total:
        return None, Threshold(None, all=True, kept=[int(v) for v in hi_rows.sum(1)])
    above = _from_top(hi_rows.sum(0))
    return int((above >= keep).nonzero().max()), None


def finish(hi_rows: torch.Tensor, lo_rows: torch.Tensor, upper: int, keep: int) -> Threshold:
    """The exact threshold key and every tensor's share of the ties, from both passes' histograms."""
    keep = max(0, min(int(keep), int(hi_rows.sum())))
    above_hi = _from_top(hi_rows.sum(0))
    need = keep - (int(above_hi[upper + 1]) if upper + 1 < (1 << 16) else 0)
    c = int((_from_top(lo_rows.sum(0)) >= need).nonzero().max())
    key = (upper << 16) | c
    gt = hi_rows[:, upper + 1:].sum(1) + lo_rows[:, c + 1:].sum(1)
    eq = lo_rows[:, c]
    left = keep - int(gt.sum())
    quotas = []
    for i in range(hi_rows.shape[0]):
        q = max(0, min(int(eq[i]), left))
        quotas.append(q)
        left -= q
    return Threshold(key, quotas=quotas, kept=[int(g) + q for g, q in zip(gt, quotas)])


def select(n_tensors: int, for_each: Callable[[Callable[[int, torch.Tensor], None]], None], keep: int,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Threshold:
    """The threshold that keeps exactly ``keep`` entries of ``n_tensors`` score tensors.

    ``for_each(visit)`` calls ``visit(index, score)`` for every tensor this process holds (any order;
    indices give the global flat order for ties); it is called twice. ``reduce`` sums an int64 tensor
    over processes (each process fills only the rows of its own tensors)."""
    red = reduce or (lambda t: t)
    hi = torch.zeros(n_tensors, 1 << 16, dtype=torch.int64)

    def v1(i, s):
        hi[i] = hi_histogram(s)
    for_each(v1)
    hi = red(hi)
    upper, done = upper_bin(hi, keep)
    if done is not None:
        return done
    lo = torch.zeros(n_tensors, 1 << 16, dtype=torch.int64)

    def v2(i, s):
        lo[i] = lo_histogram(s, upper)
    for_each(v2)
    return finish(hi, red(lo), upper, keep)


def magnitude_masks(scores: Iterable[torch.Tensor] | list, keep: int) -> list[torch.Tensor]:
    """``global_magnitude_masks`` for tensors already in memory, without their concatenation."""
    scores = list(scores)

    def for_each(visit):
        for i, s in enumerate(scores):
            visit(i, s)
    th = select(len(scores), for_each, keep)
    return [th.mask(i, s) for i, s in enumerate(scores)]
