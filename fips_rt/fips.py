"""FiPS orchestration: groups -> statistics -> shared init -> global allocation -> local (+ global) training.

The math lives in budget.py, decompose.py and sparsity.py; this module wires data and hooks into the
training loop of train.py (losses, mask schedules, the parameters each stage trains).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, get_submodule, linear_paths, set_submodule, stage_of_layer
from .budget import check_groups, consecutive_groups, kept_nnz, mlp_budget_from_model_budget, rank_for_budget
from .capture import count_tokens, input_statistics, io_bytes, mlp_chain, run_chain, teacher_io
from .config import FipsConfig
from .decompose import diag_scale, normalized_cov, obs_scale, score_of, shared_svd_init, whitening_factor
from .errors import FipsError
from .modules import FipsLinear, SharedBasis
from .procmem import release_freed_memory
from .selection import magnitude_masks, select
from .sparsity import gmp_sparsity, nm_mask, rigl_drop_fraction, rigl_update
from .train import fips_warmup, loss_summary, train_loop


@dataclass
class GroupPlan:
    index: int
    layers: list[int]
    linears: list[tuple[str, str]]  # (path, orientation) over all layers of the group, in order
    d: int
    d_ff: int
    rank: int
    budget_params: int  # kept parameters this group may use (U + V nnz) at its own budget
    nnz: int = 0  # V entries kept after global allocation
    stats: dict = field(default_factory=dict)


def _linear_dims(model, path: str, orientation: str) -> tuple[int, int]:
    w = get_submodule(model, path).weight
    return (w.shape[1], w.shape[0]) if orientation == "in" else (w.shape[0], w.shape[1])


def mlp_param_count(model, adapter: Adapter) -> int:
    n = 0
    for layer in linear_paths(model, adapter):
        for path, _ in layer:
            m = get_submodule(model, path)
            n += m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return n


def plan_groups(model, adapter: Adapter, cfg: FipsConfig) -> tuple[list[GroupPlan], float]:
    layers = linear_paths(model, adapter)
    n = len(layers)
    if cfg.groups is not None:
        groups = check_groups(cfg.groups, n)
    else:
        if cfg.group_size > n:
            raise FipsError(f"group size {cfg.group_size} is larger than the model's {n} layers.")
        stages = stage_of_layer(model, adapter)
        groups = []
        for s in sorted(set(stages)):
            ids = [i for i in range(n) if stages[i] == s]
            groups += [[ids[j] for j in g] for g in consecutive_groups(len(ids), min(cfg.group_size, len(ids)))]
    budget = cfg.mlp_budget
    if budget is None:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        budget = mlp_budget_from_model_budget(cfg.model_budget, total, mlp_param_count(model, adapter))
    plans = []
    for gi, g in enumerate(groups):
        lins = [pl for li in g for pl in layers[li]]
        dims = {_linear_dims(model, p, o) for p, o in lins}
        if len(dims) != 1:
            raise FipsError(f"group {g} mixes MLP shapes {sorted(dims)}; groups must stay within a stage.")
        d, d_ff = dims.pop()
        r = rank_for_budget(budget, d, d_ff, len(lins), cfg.sparsity)
        plans.append(GroupPlan(gi, list(g), lins, d, d_ff, r,
                               budget_params=int(math.floor(budget * len(lins) * d * d_ff + 1e-9))))
    return plans, budget


def _oriented(model, path: str, orientation: str) -> torch.Tensor:
    w = get_submodule(model, path).weight.detach().float().cpu()
    return w.T if orientation == "in" else w  # d x d_ff


def group_whitening(plan: GroupPlan, cfg: FipsConfig, stats: dict) -> tuple[torch.Tensor, list]:
    """The group's d-side whitening factor L (Cholesky of the mean normalized input covariance of its
    layers, float64) and per linear its d_ff-side scaling (down_proj: sqrt E[h^2]; None elsewhere)."""
    cov = sum(normalized_cov(stats[li]["xtx"], stats[li]["n"]) for li in plan.layers)
    L = whitening_factor(cov / len(plan.layers), cfg.ridge)
    scales = []
    for (p, o), li in zip(plan.linears, [li for li in plan.layers for _ in range(len(plan.linears) // len(plan.layers))]):
        if o == "out":
            h2, cnt = stats[li]["h2"][p]
            scales.append(diag_scale(h2 / max(cnt, 1)))
        else:
            scales.append(None)
    return L, scales


def selection_scales(plan: GroupPlan, cfg: FipsConfig, stats: dict, col_scales: list) -> list:
    """The d_ff-side pruning weights of the group's linears for ``cfg.selection == "obs"``: every d_ff -> d
    linear's from the full covariance of its input (decompose.obs_scale); the others' unchanged."""
    per_layer = len(plan.linears) // len(plan.layers)
    out = list(col_scales)
    for k, (path, orient) in enumerate(plan.linears):
        if orient == "out":
            hth, n = stats[plan.layers[k // per_layer]]["hth"][path]
            out[k] = obs_scale(hth, n, cfg.ridge).float()
    return out


def init_group(model, plan: GroupPlan, cfg: FipsConfig, stats: dict | None, *, weights=None, whitening=None):
    """The group's shared init from its dense weights (``weights``, oriented d x d_ff; default: read
    from ``model``) and, for the whitened init, ``whitening`` = group_whitening(...) or ``stats``."""
    if weights is None:
        weights = [_oriented(model, p, o) for p, o in plan.linears]
    if cfg.init == "whitened":
        if whitening is None:
            if stats is None:
                raise FipsError("whitened init needs calibration data.")
            whitening = group_whitening(plan, cfg, stats)
        L, scales = whitening
        return shared_svd_init(weights, plan.rank, d_factor=L, col_scales=scales, tau=cfg.overcomplete_tau)
    return shared_svd_init(weights, plan.rank, tau=cfg.overcomplete_tau)


def _module_masks(mods: list[FipsLinear], col_scales, keep: int, device, within_mask: bool) -> list[torch.Tensor]:
    """Global magnitude masks over the group's V (scores |V| * D, one module at a time; entries outside
    the current mask score -1 when ``within_mask``): the same masks as global_magnitude_masks on the
    concatenated scores, without the concatenation (fips_rt.selection)."""
    def score(i):
        sc = score_of(mods[i].V.detach(), col_scales[i].to(device))
        return sc.masked_fill_(~mods[i].mask, -1.0) if within_mask else sc

    def for_each(visit):
        for i in range(len(mods)):
            visit(i, score(i))
    th = select(len(mods), for_each, keep)
    return [th.mask(i, score(i)) for i in range(len(mods))]


def install_group(model, plan: GroupPlan, U: torch.Tensor, Vs, masks, device) -> list[FipsLinear]:
    basis = SharedBasis(U.to(device))
    mods = []
    for (path, orient), V, m in zip(plan.linears, Vs, masks):
        old = get_submodule(model, path)
        bias = old.bias.detach().to(device) if getattr(old, "bias", None) is not None else None
        mod = FipsLinear(basis, V.to(device), m.to(device), orient, bias)
        set_submodule(model, path, mod)
        mods.append(mod)
    return mods


# --------------------------------------------------------------------------- local error minimization
def mask_hooks(mods: list[FipsLinear]):
    """``train_loop``'s (before_update, after_update) that keep every V inside its mask: a masked entry
    gets no gradient (so no weight-decay drift either) and is zeroed again after the update."""
    owner = {id(m.V): m for m in mods}

    def before(p):
        m = owner.get(id(p))
        if m is not None:
            p.grad.mul_(m.mask)

    def after(p):
        m = owner.get(id(p))
        if m is not None:
            m.apply_mask_()
    return before, after


def fit_mlps_local(model, adapter: Adapter, layers: list[int], mods: list[FipsLinear], X: dict, Y: dict, *,
                   steps: int, lr: float, weight_decay: float, batch_tokens: int, seed: int, device,
                   desc: str, progress: bool = False, after_backward=None, after_step=None, postfix=None) -> list[float]:
    """Teacher-forced local fit of the MLPs of ``layers``, jointly (they may share bases): for each step a
    random batch of the captured inputs ``X[li]``, loss = sum over layers of ||MLP(x) - y||^2 / ||y||^2,
    AdamW (betas 0.9/0.95) on every basis, V and bias of ``mods``, by ``fips_rt.train.train_loop``: linear
    warm-up (steps/20) then cosine decay. V stays inside its mask (masked gradients, re-masked after each
    step). Hooks for the caller's mask schedule: ``after_backward(step)`` sees the raw gradients,
    ``after_step(step)`` runs after the update. Returns the loss of every step."""
    params = list({id(p): p for m in mods
                   for p in [m.basis.weight, m.V] + ([m.bias] if m.bias is not None else [])}.values())

    def adamw(ps):  # fused: one pass over each tensor (the unfused CPU AdamW makes several + temporaries)
        return torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)
    chains = {li: mlp_chain(model, adapter, li) for li in layers}
    norms = {li: float(Y[li].pow(2).mean()) + 1e-12 for li in layers}
    n_tok = X[layers[0]].shape[0]
    gen = torch.Generator().manual_seed(seed)
    use_amp = device.type == "cuda"

    def loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, n_tok, (min(batch_tokens, n_tok),), generator=gen)
        total = 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            for li in layers:
                x, y = X[li][idx].to(device, non_blocking=True), Y[li][idx].to(device, non_blocking=True)
                total = total + (run_chain(chains[li], x).float() - y).pow(2).mean() / norms[li]
        return total
    before_update, after_update = mask_hooks(mods)
    # Without a hook on the raw gradients (RigL needs them), each tensor is updated the moment its
    # gradient is complete and the gradient is freed (per_tensor): one V's gradient in memory at a time
    # instead of the whole group's.
    return train_loop(loss, params, adamw, steps=steps, warmup=fips_warmup(steps), per_tensor=after_backward is None,
                      before_update=before_update, after_update=after_update, after_backward=after_backward,
                      after_step=after_step, desc=desc, progress=progress, postfix=postfix, postfix_every=10)["losses"]


def train_group_local(model, adapter: Adapter, plan: GroupPlan, mods: list[FipsLinear], col_scales, cfg: FipsConfig,
                      X: dict, Y: dict, device, progress=False) -> dict:
    """Teacher-forced MSE of every MLP of the group (trained jointly: they share U), GMP/RigL/N:M on V."""
    steps = cfg.steps
    total_entries = sum(m.mask.numel() for m in mods)
    final_keep = plan.nnz
    start_keep = min(total_entries, int(round(final_keep * (1 - cfg.initial_sparsity) / max(1 - cfg.sparsity, 1e-9))))
    s_i, s_f = 1 - start_keep / total_entries, 1 - final_keep / total_entries
    every = cfg.mask_every or max(1, int(cfg.gmp_end * steps) // 10)
    grads: list[torch.Tensor] = []

    def is_update(step: int) -> bool:
        return cfg.pruning != "nm" and (step + 1) % every == 0 and step + 1 <= cfg.gmp_end * steps + every

    def after_backward(step: int) -> None:
        if cfg.pruning == "rigl" and is_update(step):
            grads[:] = [m.V.grad.detach().clone() for m in mods]

    @torch.no_grad()
    def after_step(step: int) -> None:
        if not is_update(step):
            return
        if cfg.pruning == "gmp":
            s = gmp_sparsity(step + 1, steps, s_i, s_f, end=cfg.gmp_end)
            keep = max(final_keep, int(round(total_entries * (1 - s))))
            new = _module_masks(mods, col_scales, keep, device, within_mask=True)
            for m, nm in zip(mods, new):
                m.mask.copy_(nm & m.mask)
                m.apply_mask_()
        else:  # rigl
            frac = rigl_drop_fraction(step + 1, steps, cfg.rigl_drop, cfg.gmp_end)
            for m, g in zip(mods, grads):
                m.mask.copy_(rigl_update(m.V, g, m.mask, frac))
                m.apply_mask_()

    losses = fit_mlps_local(
        model, adapter, plan.layers, mods, X, Y, steps=steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        batch_tokens=cfg.batch_tokens, seed=cfg.seed + plan.index, device=device,
        desc=f"group {plan.index} layers {plan.layers[0]}-{plan.layers[-1]}", progress=progress,
        after_backward=after_backward, after_step=after_step,
        postfix=lambda: {"density": f"{sum(m.nnz for m in mods) / total_entries:.3f}"})
    finalize_masks(mods, col_scales, plan, cfg, device)
    return loss_summary(losses)


@torch.no_grad()
def finalize_masks(mods, col_scales, plan: GroupPlan, cfg: FipsConfig, device) -> None:
    """Bring the group's V to exactly its allotted nnz (N:M: the N:M pattern) and make masks final."""
    if cfg.pruning == "nm":
        n, m_ = cfg.nm
        for m, c in zip(mods, col_scales):
            m.mask.copy_(nm_mask((m.V.abs() * c.to(device)[None, :]).masked_fill(~m.mask, -1.0), n, m_))
            m.apply_mask_()
        return
    if sum(m.nnz for m in mods) > plan.nnz:
        for m, nm in zip(mods, _module_masks(mods, col_scales, plan.nnz, device, within_mask=True)):
            m.mask.copy_(nm)
            m.apply_mask_()


# --------------------------------------------------------------------------- closed-form refits, sequential inputs
def local_io(model, adapter: Adapter, layers: list[int], io_cache: tuple[dict, dict], calibration, *,
             sequential: bool, progress: bool = False) -> tuple[dict, dict]:
    """(X, Y) of a group's local fit, taken out of ``io_cache`` (the dense model's MLP I/O). Y is always
    the dense model's MLP output (teacher targets). X is the dense MLP input (teacher forcing), or, with
    ``sequential``, the input the current model feeds these MLPs: groups compressed before carry their
    error into it (GPTQ/SparseGPT-style). Call it before the group itself is replaced."""
    X = {li: io_cache[0].pop(li) for li in layers}
    Y = {li: io_cache[1].pop(li) for li in layers}
    if sequential and any(isinstance(m, FipsLinear) for m in model.modules()):
        del X
        X = teacher_io(model, adapter, layers, calibration, progress)[0]
    return X, Y


@torch.no_grad()
def _out_input_moments(chain, out_mod: FipsLinear, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
    """H^T H / N and (Y - b)^T H / N of a d_ff -> d linear's input H over the MLP inputs ``x`` (the MLP as
    it is now), ``y`` its dense targets; and ||Y - b||^2 / N."""
    acc = {}

    def pre(mod, args):
        acc["h"] = args[0]
    h = out_mod.register_forward_pre_hook(pre)
    n = x.shape[0]
    CR = R = None
    const = 0.0
    try:
        for i in range(0, n, chunk):
            run_chain(chain, x[i:i + chunk])
            H = acc["h"].reshape(-1, acc["h"].shape[-1]).float()
            t = y[i:i + chunk].float()
            if out_mod.bias is not None:
                t = t - out_mod.bias.float()
            CR = H.T @ H if CR is None else CR + H.T @ H
            R = t.T @ H if R is None else R + t.T @ H
            const += float(t.pow(2).sum())
    finally:
        h.remove()
    return CR / n, R / n, const / n


@torch.no_grad()
def refit_group(model, adapter: Adapter, plan: GroupPlan, mods: list[FipsLinear], dense_w: list[torch.Tensor],
                X: dict, Y: dict, cfg: FipsConfig, device) -> dict:
    """Closed-form refits of one group in the activation-weighted space (fips_rt.refit), masks fixed:
    per round, V of every d -> d_ff linear (masked least squares on the layer's MLP input covariance),
    then V of every d_ff -> d linear on its input as the refitted MLP now produces it (target: the dense
    MLP output or the dense weight, ``cfg.refit_target``), then U (normal equations), all ridge-regularized
    toward the current value. Returns the group's weighted (relative) error before and after."""
    from .refit import Quadratic, refit_u, refit_v, weight_space, weighted_total
    per_layer = len(plan.linears) // len(plan.layers)
    U = mods[0].basis.weight
    qs: list = [None] * len(mods)
    covs = {li: None for li in plan.layers}

    def quads(j: int, li: int, orientation: str) -> None:
        x = X[li].to(device)
        if covs[li] is None:
            covs[li] = (x.T @ x) / x.shape[0]
        for k in range(j * per_layer, (j + 1) * per_layer):
            if mods[k].orientation != orientation:
                continue
            if orientation == "in":
                qs[k] = weight_space(dense_w[k].to(device), CL=covs[li])
            else:
                CR, R, const = _out_input_moments(mlp_chain(model, adapter, li), mods[k], x, Y[li].to(device))
                qs[k] = (Quadratic(None, CR, R, const, 1.0 / max(const, 1e-30)) if cfg.refit_target == "output"
                         else weight_space(dense_w[k].to(device), CR=CR))

    def solve_v(j: int, orientation: str) -> None:
        for k in range(j * per_layer, (j + 1) * per_layer):
            if mods[k].orientation == orientation:
                mods[k].V.copy_(refit_v(qs[k], U, mods[k].V.detach(), mods[k].mask, ridge=cfg.refit_ridge,
                                        iters=cfg.refit_iters))

    out: dict = {}
    for rnd in range(cfg.refit_rounds):
        for j, li in enumerate(plan.layers):
            quads(j, li, "in")
            solve_v(j, "in")
            quads(j, li, "out")  # down's input as the refitted gate/up now produce it
            solve_v(j, "out")
        Vs = [m.V.detach() for m in mods]
        out.setdefault("refit_error_v", weighted_total(qs, U, Vs))  # sum of relative errors, after round 1's V
        if cfg.refit_u:
            U.copy_(refit_u(qs, U.detach(), Vs, ridge=cfg.refit_ridge, iters=cfg.refit_iters))
        out["refit_error_u"] = weighted_total(qs, U, Vs)  # the same quadratics (down's taken before the U step)
    return out


# --------------------------------------------------------------------------- global error minimization
def global_params(model, norms: bool = False) -> list[nn.Parameter]:
    """What global distillation trains: every basis U, V and MLP bias of the FiPS linears, and with
    ``norms`` also the weights (and biases) of the normalization layers (RMSNorm / LayerNorm)."""
    mods = [m for m in model.modules() if isinstance(m, FipsLinear)]
    params = [p for m in mods for p in ([m.basis.weight, m.V] + ([m.bias] if m.bias is not None else []))]
    if norms:
        params += [p for m in model.modules() if "norm" in type(m).__name__.lower()
                   for p in m.parameters(recurse=False)]
    return list({id(p): p for p in params}.values())


def _global_batch(batches: list[dict], cfg: FipsConfig, gen: torch.Generator) -> dict:
    """One distillation batch: a random calibration batch, ``global_batch`` random rows of it, each row
    cropped to a random window of ``global_seq_len`` tokens when that is set (and shorter than the row)."""
    b = batches[int(torch.randint(0, len(batches), (1,), generator=gen))]
    rows = next(iter(b.values())).shape[0]
    if cfg.global_batch and cfg.global_batch < rows:
        pick = torch.randperm(rows, generator=gen)[:cfg.global_batch]
        b = {k: v[pick] for k, v in b.items()}
    T = b["input_ids"].shape[1] if "input_ids" in b else 0
    if cfg.global_seq_len and 0 < cfg.global_seq_len < T:
        s = int(torch.randint(0, T - cfg.global_seq_len + 1, (1,), generator=gen))
        b = {k: (v[:, s:s + cfg.global_seq_len] if v.dim() >= 2 and v.shape[1] == T else v) for k, v in b.items()}
    return b


def train_global(model, teacher, adapter: Adapter, batches: list[dict], cfg: FipsConfig, device, progress=False) -> dict:
    """Global error minimization: distillation of the whole compressed model to the dense ``teacher``,
    KL(teacher || student) per token on the logits of causal LMs (normalized MSE on outputs otherwise).

    AdamW (betas 0.9/0.95, no weight decay) at ``cfg.global_lr`` on ``global_params`` (U, V, MLP
    biases; ``cfg.global_norms`` adds the norm weights); every other parameter is frozen for the run (no
    weight gradients are computed for it) and restored afterwards. V stays inside its mask (masked
    gradients, re-masked after each step), so the sparsity pattern and the budget do not change. The
    loop and schedule are the local fit's (``fips_rt.train.train_loop``: linear warm-up over steps/20,
    then cosine decay). Each of
    the ``cfg.global_steps`` steps draws ``_global_batch`` from ``batches`` (the calibration batches).
    Returns the first and last losses, the loss of every step and the seconds spent."""
    from .delta_math import distill_loss
    from .evaluate import forward
    t0, c0 = time.time(), time.process_time()
    mods = [m for m in model.modules() if isinstance(m, FipsLinear)]
    params = global_params(model, cfg.global_norms)
    steps = cfg.global_steps
    if not params or steps == 0:
        return {"loss_first": None, "loss_last": None, "losses": [], "seconds": 0.0, "cpu_seconds": 0.0,
                "trained_params": 0}
    flags = {id(p): (p, p.requires_grad) for p in list(model.parameters()) + params}
    for p, _ in flags.values():
        p.requires_grad_(False)  # no weight gradients for what is not trained (train_loop enables params)
    use_amp = device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed + 1000)

    def loss(step: int) -> torch.Tensor:
        b = {k: v.to(device) for k, v in _global_batch(batches, cfg, gen).items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            t = forward(teacher, b, adapter.kind).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            s = forward(model, b, adapter.kind).float()
        return distill_loss(s, t, adapter.kind)  # the same loss as DeltaLLM's distillation

    def adamw(ps):
        return torch.optim.AdamW(ps, lr=cfg.global_lr, weight_decay=0.0, betas=(0.9, 0.95))
    before_update, after_update = mask_hooks(mods)
    was_training = model.training
    model.train(False)  # no dropout: the student is compared with the teacher on the same function
    try:
        losses = train_loop(loss, params, adamw, steps=steps, warmup=fips_warmup(steps), before_update=before_update,
                            after_update=after_update, desc="global distillation", progress=progress)["losses"]
    finally:
        for p, flag in flags.values():
            p.requires_grad_(flag)
        model.train(was_training)
    return {**loss_summary(losses), "losses": losses, "seconds": time.time() - t0,
            "cpu_seconds": time.process_time() - c0, "trained_params": sum(p.numel() for p in params)}


# --------------------------------------------------------------------------- orchestration
def _save_state(state_dir: Path, plan: GroupPlan, mods: list[FipsLinear], info: dict) -> None:
    """A finished group, compact: U, and per V its kept values + packed bitmask (the checkpoint's sparse
    format, float32; V is zero outside its mask), written under a temporary name and renamed."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"U": mods[0].basis.weight.detach().cpu()}
    for i, m in enumerate(mods):
        vals, pm = m.packed()
        tensors[f"values{i}"] = torch.from_numpy(vals)
        tensors[f"mask{i}"] = torch.from_numpy(pm)
        if m.bias is not None:
            tensors[f"b{i}"] = m.bias.detach().cpu()
    shapes = [list(m.V.shape) for m in mods]
    tmp = state_dir / f".group_{plan.index:03d}.tmp"
    try:
        torch.save({"tensors": tensors, "shapes": shapes, "info": info, "layers": plan.layers, "rank": plan.rank},
                   tmp)
        tmp.replace(state_dir / f"group_{plan.index:03d}.pt")
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_state(state_dir: Path, plan: GroupPlan):
    """A saved group with its V and masks dense again (``tensors``: U, V{i}, M{i}, b{i}), or None."""
    from .sparse_format import unpack, unpack_mask
    f = state_dir / f"group_{plan.index:03d}.pt"
    if not f.is_file():
        return None
    obj = torch.load(str(f), map_location="cpu", weights_only=True)
    if obj.get("layers") != plan.layers or obj.get("rank") != plan.rank or "shapes" not in obj:
        raise FipsError(f"--resume: {f} was made with other settings (layers/rank differ); use a new --state-dir.")
    t = obj["tensors"]
    for i, shape in enumerate(obj["shapes"]):
        pm = t.pop(f"mask{i}").contiguous().numpy()
        t[f"V{i}"] = torch.from_numpy(unpack(t.pop(f"values{i}").contiguous().numpy(), pm, tuple(shape)))
        t[f"M{i}"] = torch.from_numpy(unpack_mask(pm, tuple(shape)))
    return obj


def _record_io(model, adapter: Adapter, layers, layer_ids: list[int], batches, progress=False, stats: bool = False,
               full_out: bool = False):
    """Teacher MLP I/O of ``layer_ids`` (and with ``stats`` the whitening statistics of every layer) from
    one pass of the model: ``capture.statistics_and_io`` / ``teacher_io``, but each layer's per-batch
    pieces are concatenated and dropped one layer at a time, so the I/O is in memory once (not twice
    while every layer's concatenation is built)."""
    from .capture import Tokens, _io_hooks, _statistics_hooks, forward_batches
    st, tokens = {}, Tokens()
    xs, ys = {li: [] for li in layer_ids}, {li: [] for li in layer_ids}
    handles = (_statistics_hooks(model, adapter, layers, tokens, st, full_out=full_out) if stats else []) + _io_hooks(
        model, adapter, layer_ids, tokens, xs, ys)
    forward_batches(model, adapter, batches, tokens, handles, stop_layer=len(layers) - 1 if stats else max(layer_ids),
                    desc="calibration statistics and activations" if stats else
                    f"teacher activations (layers {layer_ids[0]}-{max(layer_ids)})", progress=progress)
    X, Y = {}, {}
    for li in layer_ids:
        X[li] = torch.cat(xs.pop(li))
        Y[li] = torch.cat(ys.pop(li))
    release_freed_memory()
    return (st, (X, Y)) if stats else (X, Y)


def compress_fips(model, adapter: Adapter, cfg: FipsConfig, calibration: list[dict] | None, *, device: torch.device,
                  progress: bool = False, state_dir: str | Path | None = None, resume: bool = False,
                  log=print) -> dict:
    t0 = time.time()
    release_freed_memory()  # large freed buffers (calibration pieces, temporaries) go back to the system
    torch.manual_seed(cfg.seed)
    plans, budget = plan_groups(model, adapter, cfg)
    if cfg.init == "whitened" or cfg.steps > 0 or cfg.global_steps > 0:
        if not calibration:
            raise FipsError("FiPS with whitened init or training needs calibration data.")
    state = Path(state_dir) if state_dir else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        meta = {"config": cfg.to_dict(), "groups": [p.layers for p in plans], "ranks": [p.rank for p in plans],
                "state_format": 2}
        meta_file = state / "plan.json"
        if resume and meta_file.is_file():
            old = json.loads(meta_file.read_text())
            if old != json.loads(json.dumps(meta)):
                raise FipsError(f"--resume: {state} holds a run with other settings; use a new --state-dir.")
        elif not resume:
            for f in state.glob("group_*.pt"):
                f.unlink()
        meta_file.write_text(json.dumps(meta))
    teacher = None  # a dense copy: distillation target, and teacher I/O for groups recorded late
    if cfg.global_steps > 0 or (cfg.steps > 0 and cfg.keep_teacher):
        import copy
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    layers = linear_paths(model, adapter)
    # Teacher-forced I/O comes from the dense model: recorded before any group is replaced, for as many
    # groups per forward pass as fit in cfg.activation_memory_gb (the rest on later passes, from the teacher).
    todo = [p for p in plans if not (state is not None and resume and (state / f"group_{p.index:03d}.pt").is_file())]
    n_tokens = count_tokens(calibration, adapter.kind) if calibration else 0

    def io_layers(start_index: int) -> list[int]:
        chosen, size = [], 0
        for p in todo:
            if p.index < start_index:
                continue
            need = io_bytes(model, adapter, p.layers, n_tokens)
            if chosen and size + need > cfg.activation_memory_gb * 2**30:
                break
            chosen += p.layers
            size += need
        return chosen

    def prefetch(start_index: int):
        # before any replacement the model is the dense teacher; later passes use the kept dense copy if
        # any (keep_teacher), else the partially compressed model (inputs then carry earlier groups' error)
        first = all(isinstance(get_submodule(model, pth), nn.Linear) for li in range(len(layers)) for pth, _ in layers[li])
        src = model if first or teacher is None else teacher
        return _record_io(src, adapter, layers, io_layers(start_index), calibration, progress)

    # the whitening statistics and the first groups' teacher I/O come from one pass of the dense model
    io_cache: tuple[dict, dict] = ({}, {})
    stats = None
    needs_io = cfg.steps > 0 or cfg.refit != "none"
    first_io = io_layers(todo[0].index) if needs_io and todo else []
    full_out = cfg.selection == "obs"
    if cfg.init == "whitened" and first_io:
        stats, io_cache = _record_io(model, adapter, layers, first_io, calibration, progress, stats=True,
                                     full_out=full_out)
    elif cfg.init == "whitened":
        stats = input_statistics(model, adapter, layers, calibration, progress, full_out=full_out)
    elif first_io:
        io_cache = _record_io(model, adapter, layers, first_io, calibration, progress)
    # shared init of every group, then one global magnitude threshold allots V entries across groups
    inits = []
    for plan in plans:
        inits.append(init_group(model, plan, cfg, stats))
        if cfg.selection == "obs":
            inits[-1].col_scale[:] = selection_scales(plan, cfg, stats, inits[-1].col_scale)
    if full_out:
        for s in stats.values():
            s.pop("hth", None)
    total_keep = sum(kept_nnz(p.rank, len(p.linears) * p.d_ff, cfg.sparsity) for p in plans)
    flat_vs = [(v, c) for ini in inits for v, c in zip(ini.V, ini.col_scale)]
    if cfg.pruning == "nm":
        for plan in plans:
            plan.nnz = kept_nnz(plan.rank, len(plan.linears) * plan.d_ff, cfg.sparsity)
        masks_final = None
    else:
        th = select(len(flat_vs), lambda visit: [visit(i, score_of(v, c)) for i, (v, c) in enumerate(flat_vs)],
                    total_keep)  # exact global threshold, one score tensor at a time
        masks_final = [th.mask(i, score_of(v, c)) for i, (v, c) in enumerate(flat_vs)]
        k = 0
        for plan, ini in zip(plans, inits):
            plan.nnz = int(sum(int(m.sum()) for m in masks_final[k:k + len(ini.V)]))
            k += len(ini.V)
    group_info = []
    k = 0
    for gi, plan in enumerate(plans):
        ini = inits[gi]
        inits[gi] = None  # each group's init is dropped once its group is installed
        n_lin = len(ini.V)
        col_scale = ini.col_scale
        saved = _load_state(state, plan) if (state is not None and resume) else None
        if saved is not None:
            t = saved["tensors"]
            mods = install_group(model, plan, t["U"], [t[f"V{i}"] for i in range(n_lin)],
                                 [t[f"M{i}"] for i in range(n_lin)], device)
            for i, m in enumerate(mods):
                if f"b{i}" in t:
                    m.bias.data.copy_(t[f"b{i}"])
            info = dict(saved["info"], resumed=True)
            log(f"group {plan.index}: resumed from {state}")
        else:
            if cfg.steps > 0 and cfg.pruning != "nm":
                total = sum(v.numel() for v in ini.V)
                start_keep = min(total, int(round(plan.nnz * (1 - cfg.initial_sparsity) / max(1 - cfg.sparsity, 1e-9))))
                masks = magnitude_masks(ini.scores, start_keep)
            elif cfg.pruning == "nm":
                masks = [nm_mask(s, *cfg.nm) for s in ini.scores]
            else:
                masks = masks_final[k:k + n_lin]
                masks_final[k:k + n_lin] = [None] * n_lin
            info = {}
            if needs_io:  # before the group is replaced: sequential inputs see only the groups before it
                if not all(li in io_cache[0] for li in plan.layers):
                    io_cache = prefetch(plan.index)
                X, Y = local_io(model, adapter, plan.layers, io_cache, calibration, sequential=cfg.sequential,
                                progress=progress)
            dense_w = [_oriented(model, p, o) for p, o in plan.linears] if cfg.refit != "none" else None
            mods = install_group(model, plan, ini.U, ini.V, masks, device)
            del ini, masks
            if needs_io:
                t1 = time.time()
                if cfg.refit in ("before", "both") or (cfg.refit == "after" and cfg.steps == 0):
                    info.update({f"{k}_before": v for k, v in
                                 refit_group(model, adapter, plan, mods, dense_w, X, Y, cfg, device).items()})
                if cfg.steps > 0:
                    info.update(train_group_local(model, adapter, plan, mods, col_scale, cfg, X, Y, device,
                                                  progress))
                    if cfg.refit in ("after", "both"):
                        info.update({f"{k}_after": v for k, v in
                                     refit_group(model, adapter, plan, mods, dense_w, X, Y, cfg, device).items()})
                info["seconds_local"] = time.time() - t1
                del X, Y, dense_w
            if state is not None:
                _save_state(state, plan, mods, info)
        ini = None
        release_freed_memory()
        k += n_lin
        info.update(layers=plan.layers, rank=plan.rank, nnz=sum(m.nnz for m in mods),
                    density=sum(m.nnz for m in mods) / sum(m.mask.numel() for m in mods))
        group_info.append(info)
        if progress and needs_io:
            log(f"group {plan.index} (layers {plan.layers[0]}-{plan.layers[-1]}, rank {plan.rank}): "
                + (f"loss {info.get('loss_first') or 0:.4f} -> {info.get('loss_last') or 0:.4f}, "
                   if "loss_first" in info else "")
                + ", ".join(f"{k} {v:.4f}" for k, v in info.items() if k.startswith("refit_"))
                + f" ({info.get('seconds_local', 0):.0f} s)")
    global_info = {}
    if cfg.global_steps > 0:
        global_info = train_global(model, teacher, adapter, calibration, cfg, device, progress)
        del teacher
    model.eval()
    return {"method": "fips", "mlp_budget": budget, "groups": group_info, "global": global_info,
            "seconds": time.time() - t0, "device": str(device)}
