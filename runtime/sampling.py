"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling, and option checks."""
from __future__ import annotations


import numpy as np

from .session import FipsRuntimeError

__all__ = ["sample_next_token", "check_sampling"]


def sample_next_token(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      rng: np.random.Generator | None = None) -> int:
    """Pick the next token from a 1-D logits vector.

    ``temperature <= 0`` (or ``top_k == 1``) is greedy (argmax, first index on ties). Otherwise logits are
    divided by the temperature, restricted to the ``top_k`` largest (0 = all) and to the smallest set whose
    probability reaches ``top_p`` (nucleus; the most likely token is always kept), and one token is drawn
    with ``rng`` (``numpy.random.Generator``; a seeded one makes sampling reproducible).
    """
    logits = np.asarray(logits).reshape(-1)
    if temperature is None or temperature <= 0 or top_k == 1:
        return int(np.argmax(logits))
    if rng is None:
        rng = np.random.default_rng()
    x = logits.astype(np.float64) / float(temperature)
    x[~np.isfinite(x)] = -np.inf
    n = x.shape[0]
    if top_k and 0 < top_k < n:
        idx = np.argpartition(-x, top_k - 1)[:top_k]
    else:
        idx = np.arange(n)
    # order candidates by descending logit (stable: lower id first on ties) so the result is deterministic
    order = idx[np.lexsort((idx, -x[idx]))]
    z = x[order]
    z = z - z[0]
    p = np.exp(z)
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        c = np.cumsum(p)
        keep = int(np.searchsorted(c, float(top_p), side="left")) + 1  # smallest prefix with mass >= top_p
        keep = max(1, min(keep, len(order)))
        order, p = order[:keep], p[:keep]
        p = p / p.sum()
    c = np.cumsum(p)
    u = rng.random() * c[-1]
    j = int(np.searchsorted(c, u, side="right"))
    return int(order[min(j, len(order) - 1)])


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise FipsRuntimeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature is None or not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise FipsRuntimeError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise FipsRuntimeError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise FipsRuntimeError(f"top_p must be in (0, 1], got {top_p!r}")
