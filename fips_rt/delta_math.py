"""Pure functions of DeltaLLM and of the block-drop baseline (no hooks, no loops over data).

Orientation: a linear's weight W is ``out x in`` (nn.Linear). A delta block reuses its anchor's W_a and
adds A B (A: out x r, B: r x in), so W_l ~= W_a + A B. Activation weighting: S (in x in, lower
triangular) with S S^T = E[x x^T] (normalized, plus a ridge) of the *follower's* input, so that
||(W_l - W_a - A B) S||_F^2 is the expected squared output error of that linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import FipsError

LAYOUTS = ("sequential", "alternating")  # consecutive units; "influence" plans come from influence_plan

Unit = tuple[int, tuple[int, ...]]  # (anchor layer, follower layers that reuse the anchor's weights)
Shape = tuple[int, int]  # (out, in) of one shareable linear of a block


# --------------------------------------------------------------------------- sharing pattern
def sharing_units(n_layers: int, keep_first: int, keep_last: int, share_size: int, layout: str) -> list[Unit]:
    """Units of ``share_size`` consecutive blocks between the kept first/last blocks.

    sequential:  anchor = first block of the unit (A D D D | A D D D ...).
    alternating: anchor = middle block of the unit, deltas on both sides (D A D | D A D ...); for
                 share_size 2 this is A D A D, i.e. the same as sequential.
    A trailing remainder forms a smaller unit; a unit of one block is an anchor without followers.
    """
    if layout not in LAYOUTS:
        raise FipsError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r}).")
    if share_size < 2:
        raise FipsError(f"share_size must be >= 2 (got {share_size}).")
    lo, hi = keep_first, n_layers - keep_last
    if hi - lo < 2:
        raise FipsError(f"keep_first={keep_first} and keep_last={keep_last} leave fewer than 2 of the "
                        f"{n_layers} blocks to share.")
    units: list[Unit] = []
    for s in range(lo, hi, share_size):
        members = list(range(s, min(s + share_size, hi)))
        a = members[0] if layout == "sequential" else members[(len(members) - 1) // 2]
        units.append((a, tuple(m for m in members if m != a)))
    return units


def delta_blocks(units: Sequence[Unit]) -> list[int]:
    return sorted(f for _, fs in units for f in fs)


def delta_cost(shapes: Sequence[Shape], rank: int) -> int:
    """Parameters of one delta block's A, B (rank capped at min(out, in) per linear: exact there)."""
    return sum(min(rank, o, i) * (o + i) for o, i in shapes)


def plan_params(params_dense: int, n_delta_blocks: int, shapes: Sequence[Shape], rank: int) -> int:
    """Whole-model parameters after sharing: each delta block drops its dense shareable weights
    (the anchor's are stored once) and adds its A, B."""
    dense_block = sum(o * i for o, i in shapes)
    return params_dense - n_delta_blocks * dense_block + n_delta_blocks * delta_cost(shapes, rank)


def max_rank(shapes: Sequence[Shape]) -> int:
    return max(min(o, i) for o, i in shapes)


def rank_for_target(params_dense: int, n_delta_blocks: int, shapes: Sequence[Shape], target_params: float) -> int:
    """Largest rank r >= 0 with plan_params(r) <= target_params (-1: not even r = 0 fits)."""
    if n_delta_blocks == 0 or plan_params(params_dense, n_delta_blocks, shapes, 0) > target_params:
        return -1
    lo, hi = 0, max_rank(shapes)
    while lo < hi:  # plan_params is non-decreasing in r
        mid = (lo + hi + 1) // 2
        if plan_params(params_dense, n_delta_blocks, shapes, mid) <= target_params:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fill_rank(params_dense: int, followers: Sequence[int], shapes: Sequence[Shape],
              target_params: float) -> tuple[int, int, tuple[int, ...]]:
    """(rank, params, bumped): the largest uniform rank that fits ``target_params`` (< 1: none does), then rank + 1
    on as many of the followers (the first ones) as still fit."""
    n_d = len(followers)
    r = rank_for_target(params_dense, n_d, shapes, target_params)
    if r < 1:
        return r, 0, ()
    p = plan_params(params_dense, n_d, shapes, r)
    inc = delta_cost(shapes, r + 1) - delta_cost(shapes, r)
    extra = 0 if inc <= 0 else min(n_d - 1, int((target_params - p) // inc))
    return r, p + extra * max(inc, 0), tuple(followers[:extra])


@dataclass(frozen=True)
class SharingPlan:
    """Units, a base rank, and the delta blocks that get rank + 1 to fill the budget's remainder."""

    units: tuple[Unit, ...]
    share_size: int
    rank: int
    params: int
    params_dense: int
    bumped: tuple[int, ...] = ()  # follower layers whose deltas use rank + 1
    error: float | None = None  # sum over delta linears of the relative (weighted) truncation error

    @property
    def ratio(self) -> float:
        return self.params / self.params_dense

    @property
    def delta_layers(self) -> list[int]:
        return delta_blocks(self.units)

    @property
    def anchor_of(self) -> dict[int, int]:
        return {f: a for a, fs in self.units for f in fs}

    def rank_of(self, layer: int) -> int:
        return self.rank + (1 if layer in self.bumped else 0)

    def to_dict(self) -> dict:
        return {"units": [[a, list(fs)] for a, fs in self.units], "share_size": self.share_size, "rank": self.rank,
                "bumped": list(self.bumped), "params": self.params, "params_dense": self.params_dense,
                "ratio": self.ratio, "error": self.error}


def candidate_plans(n_layers: int, shapes: Sequence[Shape], params_dense: int, *, budget: float | None,
                    keep_first: int, keep_last: int, layout: str, share_size: int | None = None,
                    rank: int | None = None, max_share_size: int = 8, tol: float = 0.005) -> list[SharingPlan]:
    """Every (share size, rank) plan that meets ``budget`` (params / params_dense in [budget - tol, budget]).

    rank None: for each share size the largest uniform rank r that fits, then as many delta blocks as
    still fit get rank r + 1 (the first ones here; choose_plan moves them to where they help most).
    rank given: only share sizes for which that rank lands within tolerance. share_size given: only that
    size. Both given: the one plan, any ratio.
    """
    m = n_layers - keep_first - keep_last
    sizes = [share_size] if share_size is not None else list(range(2, max(2, min(max_share_size, m)) + 1))
    target = None if budget is None else budget * params_dense
    out = []
    for k in sizes:
        units = tuple(sharing_units(n_layers, keep_first, keep_last, k, layout))
        followers = delta_blocks(units)
        n_d = len(followers)
        if n_d == 0:
            continue
        bumped: tuple[int, ...] = ()
        if rank is not None:
            r = rank
            p = plan_params(params_dense, n_d, shapes, r)
        elif target is None:
            raise FipsError("Give a budget or a delta rank.")
        else:
            r, p, bumped = fill_rank(params_dense, followers, shapes, target)
            if r < 1:
                continue
        if target is not None and not (share_size is not None and rank is not None):
            if p > target + tol * params_dense or p < target - tol * params_dense:
                continue
        out.append(SharingPlan(units, k, r, p, params_dense, bumped))
    return out


def influence_units(cosines: Sequence[float], n_followers: int, keep_first: int, keep_last: int) -> list[Unit]:
    """The ``n_followers`` blocks of least influence (highest input/output cosine, ShortGPT's criterion: the
    blocks block drop removes first), outside the kept first/last blocks, each following the nearest block
    that is not a follower (ties: the earlier one). Units sorted by anchor, followers ascending."""
    n = len(cosines)
    free = [i for i in range(keep_first, n - keep_last)]
    if not 1 <= n_followers < n or n_followers > len(free):
        raise FipsError(f"{n_followers} followers do not fit {n} blocks with keep_first={keep_first}, "
                        f"keep_last={keep_last}.")
    followers = sorted(sorted(free, key=lambda i: (-cosines[i], i))[:n_followers])
    others = [i for i in range(n) if i not in set(followers)]
    anchor = {f: min(others, key=lambda a: (abs(a - f), a)) for f in followers}
    return [(a, tuple(f for f in followers if anchor[f] == a)) for a in sorted(set(anchor.values()))]


def influence_plan(cosines: Sequence[float], shapes: Sequence[Shape], params_dense: int, *, budget: float | None,
                   keep_first: int, keep_last: int, rank: int | None = None, n_followers: int | None = None,
                   tol: float = 0.005) -> SharingPlan:
    """A plan whose followers are the least influential blocks (``influence_units``).

    Without ``n_followers``: the fewest followers for which rank ``rank`` (or 1) meets the budget, i.e.
    the blocks block drop would remove at the budget less the deltas' cost; then the largest rank
    that fits (unless ``rank`` is given), with rank + 1 on as many followers as still fit."""
    n = len(cosines)
    target = None if budget is None else budget * params_dense
    if n_followers is None:
        if target is None:
            raise FipsError("Give a budget or the number of followers.")
        n_followers = next((k for k in range(1, n - keep_first - keep_last + 1)
                            if plan_params(params_dense, k, shapes, rank or 1) <= target), None)
        if n_followers is None:
            raise FipsError(f"No number of delta blocks reaches the budget {budget:.3f}.")
    units = tuple(influence_units(cosines, n_followers, keep_first, keep_last))
    followers = delta_blocks(units)
    share_size = max(len(fs) + 1 for _, fs in units)
    bumped: tuple[int, ...] = ()
    if rank is None:
        if target is None:
            raise FipsError("Give a budget or a delta rank.")
        rank, p, bumped = fill_rank(params_dense, followers, shapes, target)
        if rank < 1:
            raise FipsError(f"{len(followers)} delta blocks leave no room for rank 1 within the budget {budget:.3f}.")
    else:
        p = plan_params(params_dense, len(followers), shapes, rank)
    if target is not None and not (target - tol * params_dense <= p <= target + tol * params_dense):
        raise FipsError(f"{len(followers)} delta blocks at rank {rank} give {p / params_dense:.4f} of the dense "
                        f"parameters, not within {tol} of the budget {budget:.3f}.")
    return SharingPlan(units, share_size, rank, p, params_dense, bumped)


def plan_error(plan: SharingPlan, spectra: Mapping[tuple[int, int, int], tuple[torch.Tensor, float]],
               n_linears: int) -> float:
    """Sum over delta linears of tail(rank) / ||W_l S||^2 (spectra: (anchor, follower, linear) ->
    (descending eigenvalues of the weighted delta's Gram matrix, ||W_l S||_F^2))."""
    err = 0.0
    for a, fs in plan.units:
        for f in fs:
            r = plan.rank_of(f)
            for j in range(n_linears):
                ev, norm2 = spectra[(a, f, j)]
                err += float(ev[r:].clamp_min(0).sum()) / max(norm2, 1e-30)
    return err


def _place_bumps(plan: SharingPlan, spectra, n_linears: int) -> SharingPlan:
    """Give the rank + 1 slots to the delta blocks whose next singular value removes the most error."""
    if not plan.bumped:
        return plan
    gain = {}
    for a, fs in plan.units:
        for f in fs:
            g = 0.0
            for j in range(n_linears):
                ev, norm2 = spectra[(a, f, j)]
                g += (float(ev[plan.rank]) if plan.rank < ev.numel() else 0.0) / max(norm2, 1e-30)
            gain[f] = g
    best = tuple(sorted(sorted(gain, key=lambda f: (-gain[f], f))[:len(plan.bumped)]))
    return SharingPlan(plan.units, plan.share_size, plan.rank, plan.params, plan.params_dense, best)


def choose_plan(cands: Sequence[SharingPlan], spectra, n_linears: int) -> SharingPlan:
    """The candidate with the smallest summed relative truncation error (ties: smaller share size)."""
    if not cands:
        raise FipsError("No sharing plan meets this budget.")
    scored = []
    for c in cands:
        c = _place_bumps(c, spectra, n_linears)
        scored.append(SharingPlan(c.units, c.share_size, c.rank, c.params, c.params_dense, c.bumped,
                                  plan_error(c, spectra, n_linears)))
    return min(scored, key=lambda c: (c.error, c.share_size))


def spectrum_pairs(cands: Sequence[SharingPlan]) -> list[tuple[int, int]]:
    """(anchor, follower) pairs whose delta spectra the candidates need, in a stable order."""
    return sorted({(a, f) for c in cands for a, fs in c.units for f in fs})


# --------------------------------------------------------------------------- delta init
def covariance_factor(x_t_x: torch.Tensor, n: int, ridge: float = 1e-2) -> torch.Tensor:
    """Lower Cholesky factor S of C + ridge*I, C = X^T X / n scaled to unit mean eigenvalue (float64)."""
    from .decompose import normalized_cov, whitening_factor
    try:
        return whitening_factor(normalized_cov(x_t_x, n), ridge)
    except RuntimeError:
        raise FipsError("an input covariance is not positive definite even with a large ridge.") from None


def _gram(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Gram matrix on the smaller side; True when it is M^T M (right side)."""
    return (m.T @ m, True) if m.shape[1] <= m.shape[0] else (m @ m.T, False)


def weighted_spectrum(delta: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor | None):
    """(descending squared singular values of delta S, ||W S||_F^2); S = factor (None: identity)."""
    d = delta.float()
    w = weight.float()
    if factor is not None:  # float32 products (fast); the eigenvalues in float64
        f = factor.float()
        d, w = d @ f, w @ f
    g, _ = _gram(d)
    ev = torch.linalg.eigvalsh(g.double()).flip(0).clamp_min(0)
    return ev, float(w.double().pow(2).sum())


def anchor_scale(weight: torch.Tensor, anchor: torch.Tensor, factor: torch.Tensor | None = None) -> float:
    """The s minimizing ||(W_f - s W_a) S||_F (S = factor, None: identity): <W_f S, W_a S> / ||W_a S||^2.

    Consecutive blocks of a trained LLM are close to uncorrelated (SmolLM2-135M: |s| < 0.02), where
    DeltaLLM's s = 1 leaves a delta with twice W_f's energy and s ~ 0 one with W_f's own."""
    f, a = weight.double(), anchor.double()
    if factor is not None:
        f, a = f @ factor.double(), a @ factor.double()
    den = float(a.pow(2).sum())
    return 0.0 if den <= 0.0 else float((f * a).sum()) / den


def lowrank_delta(delta: torch.Tensor, rank: int, factor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out x r), B (r x in) with A B = the best rank-r approximation of delta in the S-weighted norm.

    M = delta S; the top-r eigenvectors of M's smaller Gram matrix give the projector: A B S = M Q Q^T
    (right side) or Q Q^T M (left side). Both factors carry sqrt(sigma) (balanced, clamped away from 0),
    so at rank = min(out, in) the product is exactly delta (up to float64 rounding)."""
    d = delta.double()
    m = d @ factor if factor is not None else d
    r = min(rank, *m.shape)
    g, right = _gram(m)
    ev, vec = torch.linalg.eigh(g)
    ev, vec = ev.flip(0)[:r].clamp_min(0), vec.flip(1)[:, :r]
    s = ev.sqrt()
    scale = s.clamp_min(max(float(s[0]) if r else 1.0, 1e-12) * 1e-6).sqrt() if r else s
    if right:  # M ~= (M Q) Q^T
        A = (m @ vec) / scale[None, :]
        Bw = scale[:, None] * vec.T
    else:  # M ~= Q (Q^T M)
        A = vec * scale[None, :]
        Bw = (vec.T @ m) / scale[:, None]
    B = Bw if factor is None else torch.linalg.solve_triangular(factor.double(), Bw, upper=False, left=False)
    if rank > r:  # asked for more than full rank: pad with zeros (exact already)
        A = torch.cat([A, torch.zeros(A.shape[0], rank - r, dtype=A.dtype)], 1)
        B = torch.cat([B, torch.zeros(rank - r, B.shape[1], dtype=B.dtype)], 0)
    return A.float(), B.float()


# --------------------------------------------------------------------------- replacement schedule and losses
# (the learning-rate schedule of every training loop: fips_rt.train.lr_factor)
def replacement_probability(step: int, steps: int, start: float, end: float) -> float:
    """Progressive module replacement: probability that a compressed block is used at ``step``.

    Rises linearly from ``start`` at step 0 to 1 at ``end * steps`` and stays at 1 afterwards."""
    if steps <= 0 or end <= 0:
        return 1.0
    t = step / (end * steps)
    return float(min(1.0, start + (1.0 - start) * max(0.0, t)))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(teacher || student) per token on logits (causal LMs); normalized MSE otherwise."""
    import torch.nn.functional as F
    if kind == "causal-lm":
        return F.kl_div(F.log_softmax(student.float(), -1).flatten(0, -2),
                        F.log_softmax(teacher.float(), -1).flatten(0, -2), log_target=True, reduction="batchmean")
    return (student.float() - teacher.float()).pow(2).mean() / (teacher.float().pow(2).mean() + 1e-12)


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||h_s - h_t||^2 / ||h_t||^2."""
    terms = [(s.float() - t.float()).pow(2).mean() / (t.float().pow(2).mean() + 1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- block drop (ShortGPT)
def block_cosine(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum over tokens of cos(h_in, h_out), token count): accumulate, then divide."""
    a = h_in.reshape(-1, h_in.shape[-1]).float()
    b = h_out.reshape(-1, h_out.shape[-1]).float()
    if mask is not None:
        a, b = a[mask.reshape(-1)], b[mask.reshape(-1)]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(cos.sum()), int(cos.numel())


def blocks_to_drop(cosines: Sequence[float], block_params: Sequence[int], params_total: int,
                   target_params: float) -> list[int]:
    """Most redundant blocks first (highest input/output cosine, i.e. lowest block influence 1 - cos),
    until params_total - dropped <= target_params. Returned sorted."""
    order = sorted(range(len(cosines)), key=lambda i: -cosines[i])
    drop, total = [], params_total
    for i in order:
        if total <= target_params:
            break
        drop.append(i)
        total -= block_params[i]
    if total > target_params:
        raise FipsError(f"dropping every block still leaves {total} parameters > target {int(target_params)}.")
    if len(drop) == len(cosines):
        raise FipsError("the target would drop every block.")
    return sorted(drop)
