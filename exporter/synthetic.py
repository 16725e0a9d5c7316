"""Compressed models built without training, for tests and benchmarks of the exporter.

``fipsify_(model)`` replaces every MLP linear in place by FipsLinear modules with the shapes the
real engine produces (consecutive groups within a stage, one U per group, rank from the budget,
V pruned to the sparsity): ``init="svd"`` (truncated SVD of the group's concatenated weights, V
pruned by magnitude, so the model still resembles the dense one) or ``init="random"`` (fast, for
large synthetic models). ``deltafy_(model)`` makes DeltaLLM units (one shared matrix per unit and
linear kind, a random low-rank delta per layer). Neither is a compression method: use
``fips_rt.compress_`` for that.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fips_rt.adapters import adapter_for, get_submodule, linear_paths, set_submodule, stage_of_layer
from fips_rt.budget import kept_nnz, rank_for_budget
from fips_rt.modules import DeltaLinear, FipsLinear, SharedBasis


def _groups(model, adapter, group_size: int) -> list[list[int]]:
    stages = stage_of_layer(model, adapter)
    groups: list[list[int]] = []
    for layer, stage in enumerate(stages):
        if groups and len(groups[-1]) < group_size and stages[groups[-1][0]] == stage:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _oriented(lin: nn.Linear, orientation: str) -> torch.Tensor:
    """The [d, d_ff] matrix that U V approximates."""
    w = lin.weight.detach().float()
    return w.T if orientation == "in" else w


def _top_mask(v: torch.Tensor, keep: int) -> torch.Tensor:
    flat = v.abs().reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(v)


@torch.no_grad()
def fipsify_(model, *, group_size: int = 4, mlp_budget: float = 0.5, sparsity: float = 0.75, init: str = "svd",
             seed: int = 0) -> list[dict]:
    """Replace the MLP linears of ``model`` (nn.Module or LoadedModel) by FiPS modules; returns the groups."""
    model = getattr(model, "model", model)
    adapter = adapter_for(model)
    layers = linear_paths(model, adapter)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for group in _groups(model, adapter, group_size):
        linears = [(p, o) for layer in group for p, o in layers[layer]]
        mods = [get_submodule(model, p) for p, _ in linears]
        targets = [_oriented(m, o) for m, (_, o) in zip(mods, linears)]
        d, d_ff = targets[0].shape
        r = rank_for_budget(mlp_budget, d, d_ff, len(linears), sparsity)
        if init == "svd":
            Us, S, Vh = torch.linalg.svd(torch.cat(targets, dim=1), full_matrices=False)
            k = min(r, S.numel())
            U = torch.zeros(d, r)
            U[:, :k] = Us[:, :k]
            if r > k:  # more rank than d: extra directions, their V rows start at zero
                U[:, k:] = torch.randn(d, r - k, generator=gen) / math.sqrt(d)
            V_all = torch.zeros(r, Vh.shape[1])
            V_all[:k] = S[:k, None] * Vh[:k]
            Vs = list(V_all.split(d_ff, dim=1))
        elif init == "random":
            U = torch.randn(d, r, generator=gen) / math.sqrt(d)
            Vs = [torch.randn(r, d_ff, generator=gen) / math.sqrt(r * (1.0 - sparsity)) for _ in linears]
        else:
            raise ValueError(f"init must be 'svd' or 'random' (got {init!r})")
        basis = SharedBasis(U)
        keep = kept_nnz(r, d_ff, sparsity)
        for (path, orientation), mod, V in zip(linears, mods, Vs):
            if init == "random":
                mask = torch.zeros(r * d_ff, dtype=torch.bool)
                mask[torch.randperm(r * d_ff, generator=gen)[:keep]] = True
                mask = mask.view(r, d_ff)
            else:
                mask = _top_mask(V, keep)
            bias = None if mod.bias is None else mod.bias.detach().float()
            set_submodule(model, path, FipsLinear(basis, V.contiguous(), mask, orientation, bias))
        for p in model.parameters():
            p.requires_grad_(False)
        out.append({"layers": group, "rank": r, "d": d, "d_ff": d_ff, "linears": [p for p, _ in linears]})
    return out


@torch.no_grad()
def deltafy_(model, *, unit: int = 2, rank: int = 4, scale: float = 0.02, seed: int = 0) -> list[list[int]]:
    """DeltaLLM-shaped model: in each unit of ``unit`` consecutive layers, every MLP linear shares the
    first layer's weight (one Parameter) and adds a random rank-``rank`` delta."""
    model = getattr(model, "model", model)
    adapter = adapter_for(model)
    layers = linear_paths(model, adapter)
    gen = torch.Generator().manual_seed(seed)
    units = [list(range(s, min(s + unit, len(layers)))) for s in range(0, len(layers), unit)]
    for u in units:
        anchors = [get_submodule(model, p) for p, _ in layers[u[0]]]
        shared = [nn.Parameter(a.weight.detach().float().clone(), requires_grad=False) for a in anchors]
        for layer in u:
            for (path, _), W in zip(layers[layer], shared):
                mod = get_submodule(model, path)
                out_f, in_f = W.shape
                A = torch.randn(out_f, rank, generator=gen) * scale
                B = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                bias = None if mod.bias is None else mod.bias.detach().float()
                set_submodule(model, path, DeltaLinear(W, A, B, bias))
    for p in model.parameters():
        p.requires_grad_(False)
    return units
