"""Low-rank baselines built from the FiPS pieces: a ``SharedBasis`` U and ``FipsLinear`` modules whose
V is dense (all-ones mask), so evaluation and parameter accounting treat a baseline like FiPS
(``stored_bytes`` drops the bitmask a dense V does not need).

- SVD-LLM style (``svd_llm_``): every MLP linear gets its own basis from its own whitened truncated SVD;
  rank r = floor(p * d * d_ff / (d + d_ff)) at MLP budget p (dense U and V: d*r + r*d_ff <= p*d*d_ff).
- Basis Sharing (``basis_sharing_``, ICLR'25, MLP part): the gate (and the up) weights of ``share``
  adjacent layers share one whitened SVD basis, each layer keeping its own dense coefficients; down_proj
  is not shared (as in the paper, which shares Q/K/V/Up/Gate but not O/Down). Training-free.
- ``train_local_``: the FiPS engine's local error minimization (teacher-forced MSE of every MLP output,
  AdamW, warm-up + cosine, the same token sampler) for any FipsLinear layout, e.g. one basis per linear.

Orientation (as in decompose.py): every weight is W (d x d_ff); a d -> d_ff linear computes y = x W, a
d_ff -> d linear y = h W^T. Whitening: with the input second moment C = L L^T, the expected output error
is ||L^T (W - W')||_F (d -> d_ff) or ||(W - W') L||_F (d_ff -> d); both are minimized at a given rank by
the truncated SVD of the weighted matrix, un-weighted afterwards. A d_ff -> d linear is weighted by a
full Cholesky factor of its own d_ff-side input (V is dense here, so no sparsity pattern must survive).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .adapters import Adapter, get_submodule, linear_paths, stage_of_layer
from .budget import consecutive_groups, rank_for_budget
from . import capture
from .capture import teacher_io
from .decompose import left_singular_vectors, normalized_cov, whitening_factor
from .errors import FipsError
from .fips import GroupPlan, fit_mlps_local, install_group
from .modules import FipsLinear
from .sparse_format import mask_nbytes
from .train import loss_summary


@dataclass
class BasisGroup:
    """Linears (path, orientation) of one shape that share one basis U of ``rank`` columns."""
    linears: list[tuple[str, str]]
    layers: list[int]
    rank: int


# --------------------------------------------------------------------------- layouts (pure)
def _dims(model, path: str, orientation: str) -> tuple[int, int]:
    w = get_submodule(model, path).weight
    return (w.shape[1], w.shape[0]) if orientation == "in" else (w.shape[0], w.shape[1])


def lowrank_rank(budget: float, d: int, d_ff: int, n_linears: int) -> int:
    """Rank of a dense basis shared by ``n_linears`` d x d_ff weights at MLP budget p:
    floor(p * n d d_ff / (d + n d_ff)) (n = 1: SVD-LLM's per-linear rank)."""
    return rank_for_budget(budget, d, d_ff, n_linears, 0.0)


def per_linear_layout(model, adapter: Adapter, budget: float) -> list[BasisGroup]:
    """SVD-LLM: one basis per MLP linear."""
    out = []
    for li, layer in enumerate(linear_paths(model, adapter)):
        for path, o in layer:
            d, d_ff = _dims(model, path, o)
            out.append(BasisGroup([(path, o)], [li], lowrank_rank(budget, d, d_ff, 1)))
    return out


def basis_sharing_layout(model, adapter: Adapter, budget: float, share: int = 2) -> list[BasisGroup]:
    """Basis Sharing: each d -> d_ff linear (gate, up) shares its basis with the same linear of the
    adjacent layers (consecutive groups of ``share`` within a stage); d_ff -> d linears stay per layer."""
    layers = linear_paths(model, adapter)
    stages = stage_of_layer(model, adapter)
    out = []
    for s in sorted(set(stages)):
        ids = [i for i in range(len(layers)) if stages[i] == s]
        for g in consecutive_groups(len(ids), min(share, len(ids))):
            lis = [ids[j] for j in g]
            for slot, (_, o) in enumerate(layers[lis[0]]):
                members = [[layers[li][slot] for li in lis]] if o == "in" else [[layers[li][slot]] for li in lis]
                for lins in members:
                    d, d_ff = _dims(model, *lins[0])
                    ls = [li for li in lis if layers[li][slot] in lins]
                    out.append(BasisGroup(lins, ls, lowrank_rank(budget, d, d_ff, len(lins))))
    return out


# --------------------------------------------------------------------------- statistics
def linear_input_covariances(model, adapter: Adapter, batches: list[dict], progress: bool = False
                             ) -> dict[str, tuple[torch.Tensor, int]]:
    """X^T X (float64, CPU) and token count of the input of every MLP linear, padding tokens excluded
    (``fips_rt.capture.linear_input_covariances`` over all MLP linears; gate/up share their entry)."""
    paths = {li: [p for p, _ in layer] for li, layer in enumerate(linear_paths(model, adapter))}
    return capture.linear_input_covariances(model, adapter, paths, batches, progress)


# --------------------------------------------------------------------------- decomposition (pure)
def lowrank_init(weights: list[torch.Tensor], rank: int, d_factor: torch.Tensor | None = None,
                 ff_factors: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared dense basis for weights W_k (each d x d_ff_k): M = [A W_1 B_1 | A W_2 B_2 | ...] with
    A = L^T (``d_factor`` L, lower) and B_k = ``ff_factors[k]`` (lower), both optional; M ~= P_r P_r^T M;
    U = A^{-1} P_r, V_k = P_r^T A W_k B_k B_k^{-1}. A rank above rank(M) pads U and V with zeros.
    Returns (U d x rank, [V_k rank x d_ff_k]) in float32; at full rank U V_k = W_k."""
    ws = [w.detach().double().cpu() for w in weights]
    ffs = [None] * len(ws) if ff_factors is None else [None if f is None else f.double().cpu() for f in ff_factors]
    L = None if d_factor is None else d_factor.double().cpu()
    blocks = []
    for w, f in zip(ws, ffs):
        m = w if L is None else L.T @ w
        blocks.append(m if f is None else m @ f)
    M = torch.cat(blocks, dim=1)
    P = left_singular_vectors(M)
    k = min(rank, P.shape[1])
    Up = P[:, :k]
    Vps = [Up.T @ b for b in blocks]
    if rank > k:
        Up = torch.cat([Up, Up.new_zeros(Up.shape[0], rank - k)], dim=1)
        Vps = [torch.cat([v, v.new_zeros(rank - k, v.shape[1])]) for v in Vps]
    U = Up if L is None else torch.linalg.solve_triangular(L.T, Up, upper=True)
    Vs = [v if f is None else torch.linalg.solve_triangular(f, v, upper=False, left=False) for v, f in zip(Vps, ffs)]
    return U.float(), [v.float() for v in Vs]


def _oriented(model, path: str, orientation: str) -> torch.Tensor:
    w = get_submodule(model, path).weight.detach().float().cpu()
    return w.T if orientation == "in" else w


def group_factors(group: BasisGroup, covs: dict | None, ridge: float):
    """(d-side factor from the mean normalized covariance of the group's d -> d_ff inputs,
    [full d_ff-side factor of each d_ff -> d linear's input]); None where not whitened."""
    if covs is None:
        return None, None
    ins = [p for p, o in group.linears if o == "in"]
    d_factor = None
    if ins:
        d_factor = whitening_factor(sum(normalized_cov(*covs[p]) for p in ins) / len(ins), ridge)
    ffs = [whitening_factor(normalized_cov(*covs[p]), ridge) if o == "out" else None for p, o in group.linears]
    return d_factor, ffs


@torch.no_grad()
def install_lowrank_(model, groups: list[BasisGroup], covs: dict | None, *, ridge: float = 1e-2,
                     device: torch.device | str = "cpu") -> list[list[FipsLinear]]:
    """Replace every linear of ``groups`` by a FipsLinear on its group's basis with a dense V."""
    device = torch.device(device)
    installed = []
    for gi, g in enumerate(groups):
        dims = {_dims(model, p, o) for p, o in g.linears}
        if len(dims) != 1:
            raise FipsError(f"a basis group mixes shapes {sorted(dims)}.")
        d, d_ff = dims.pop()
        d_factor, ffs = group_factors(g, covs, ridge)
        U, Vs = lowrank_init([_oriented(model, p, o) for p, o in g.linears], g.rank, d_factor, ffs)
        plan = GroupPlan(gi, list(g.layers), list(g.linears), d, d_ff, g.rank, budget_params=0)
        mods = install_group(model, plan, U, Vs, [torch.ones(V.shape, dtype=torch.bool) for V in Vs], device)
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(False)
        installed.append(mods)
    return installed


def compress_lowrank_(model, adapter: Adapter, groups: list[BasisGroup], calibration: list[dict] | None, *,
                      whiten: bool = True, ridge: float = 1e-2, device: torch.device | str = "cpu",
                      progress: bool = False) -> dict:
    """Statistics (when whitened) -> per-group low-rank init -> installed FipsLinears (dense V)."""
    t0 = time.time()
    device = torch.device(device)
    model.to(device)
    if whiten and not calibration:
        raise FipsError("whitened low-rank init needs calibration data.")
    covs = linear_input_covariances(model, adapter, calibration, progress) if whiten else None
    install_lowrank_(model, groups, covs, ridge=ridge, device=device)
    return {"bases": len(groups), "ranks": sorted({g.rank for g in groups}), "whitened": whiten,
            "seconds": time.time() - t0}


def svd_llm_(model, adapter: Adapter, budget: float, calibration, **kw) -> dict:
    """SVD-LLM-style per-linear whitened truncated SVD at MLP budget ``budget``."""
    return dict(compress_lowrank_(model, adapter, per_linear_layout(model, adapter, budget), calibration, **kw),
                method="svd")


def basis_sharing_(model, adapter: Adapter, budget: float, calibration, *, share: int = 2, **kw) -> dict:
    """Basis Sharing (MLP): gate/up bases shared by ``share`` adjacent layers, down per layer."""
    groups = basis_sharing_layout(model, adapter, budget, share)
    return dict(compress_lowrank_(model, adapter, groups, calibration, **kw), method="basis-sharing", share=share)


# --------------------------------------------------------------------------- local error minimization
def train_local_(model, adapter: Adapter, teacher, layer_groups: list[list[int]], batches: list[dict], *,
                 steps: int, lr: float, batch_tokens: int, weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False) -> list[dict]:
    """Teacher-forced MSE of the MLPs of each layer group (jointly), every FipsLinear parameter of the
    group trained (bases, V, biases; V stays inside its mask), by the FiPS engine's own local-fit loop
    (``fips_rt.fips.fit_mlps_local``: same optimizer, schedule, loss and token sampler, seed + group
    index), without its mask schedule: the baselines' masks stay as initialized. The teacher (the dense
    model) gives every MLP its dense input and target."""
    device = torch.device(device)
    paths = linear_paths(model, adapter)
    out = []
    for gi, layers in enumerate(layer_groups):
        mods = [get_submodule(model, p) for li in layers for p, _ in paths[li]]
        if not all(isinstance(m, FipsLinear) for m in mods):
            raise FipsError(f"layers {layers}: local training needs FipsLinear modules (compress first).")
        X, Y = teacher_io(teacher, adapter, layers, batches, progress)
        losses = fit_mlps_local(model, adapter, list(layers), mods, X, Y, steps=steps, lr=lr,
                                weight_decay=weight_decay, batch_tokens=batch_tokens, seed=seed + gi, device=device,
                                desc=f"local group {gi}", progress=progress)
        del X, Y
        out.append({"layers": list(layers), **loss_summary(losses)})
    model.eval()
    return out


# --------------------------------------------------------------------------- storage
def stored_bytes(model, counts: dict, itemsize: int = 4) -> int:
    """``count_model``'s bytes without the bitmasks of fully dense V (a dense factor needs no mask)."""
    extra = sum(mask_nbytes(tuple(m.V.shape)) for m in model.modules()
                if isinstance(m, FipsLinear) and bool(m.mask.all()))
    return int(counts["bytes"] - extra)
