"""DeltaLLM orchestration: plan -> input statistics -> delta init -> distillation with progressive replacement.

The math (sharing plans, rank solver, weighted low-rank init, replacement schedule, losses) lives in
delta_math.py, the training loop and its lr schedule in train.py; this module wires hooks and modules.
``distill_train`` is shared with the block-drop baseline (blockdrop.heal_) so both are trained with the
same loss and budget.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, block_paths, get_submodule, set_submodule
from .capture import hooks_removed, linear_input_covariances
from .config import DeltaConfig
from .delta_math import (SharingPlan, anchor_scale, candidate_plans, choose_plan, covariance_factor, distill_loss,
                         hidden_mse, influence_plan, lowrank_delta, replacement_probability, spectrum_pairs, weighted_spectrum)
from .errors import FipsError
from .modules import DeltaLinear
from .train import StateFile, loss_summary, train_loop

STATE_FILE = "deltallm_train.pt"


# --------------------------------------------------------------------------- model structure
def flat_blocks(model, adapter: Adapter) -> list[str]:
    return [bp for stage in block_paths(model, adapter) for bp in stage]


def shareable_linears(model, adapter: Adapter, share_attention: bool) -> list[str]:
    """Paths (relative to a block) of the linears a delta block takes from its anchor."""
    names = [p for p, _ in adapter.linears]
    if share_attention:
        block = get_submodule(model, flat_blocks(model, adapter)[0])
        names += [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in names]
    return names


def unique_param_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _shapes(model, blocks: list[str], names: list[str]) -> list[tuple[int, int]]:
    shapes = None
    for bp in blocks:
        s = [tuple(get_submodule(model, f"{bp}.{n}").weight.shape) for n in names]
        if shapes is not None and s != shapes:
            raise FipsError("DeltaLLM needs blocks of one shape; this model's blocks differ.")
        shapes = s
    return shapes


# --------------------------------------------------------------------------- statistics
def input_covariances(model, adapter: Adapter, blocks: list[str], names: list[str], layers: list[int],
                      batches: list[dict]) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """X^T X (float64, CPU) and token count of every shareable linear's input in ``layers``, keyed by
    (layer, linear index); ``fips_rt.capture.linear_input_covariances`` (gate/up share one entry)."""
    covs = linear_input_covariances(model, adapter, {li: [f"{blocks[li]}.{n}" for n in names] for li in layers},
                                    batches)
    return {(li, j): covs[f"{blocks[li]}.{n}"] for li in layers for j, n in enumerate(names)}


# --------------------------------------------------------------------------- planning
def plan_sharing(model, adapter: Adapter, cfg: DeltaConfig, calibration, log=print):
    """Candidate plans -> (weighted) spectra of the deltas they need -> the plan of least error.

    With ``anchor_scale="fit"`` each delta is W_f - s W_a with s = ``delta_math.anchor_scale`` (per
    anchor, follower and linear, in the same weighted norm), and the plan is chosen on those deltas."""
    blocks = flat_blocks(model, adapter)
    if len(block_paths(model, adapter)) != 1:
        raise FipsError("DeltaLLM shares weights along one list of blocks; this model has several stages.")
    names = shareable_linears(model, adapter, cfg.share_attention)
    shapes = _shapes(model, blocks, names)
    dense = unique_param_count(model)
    if cfg.model_budget is not None:
        budget = cfg.model_budget
    elif cfg.mlp_budget is not None:
        from .fips import mlp_param_count
        mlp = mlp_param_count(model, adapter)
        budget = (dense - mlp + cfg.mlp_budget * mlp) / dense
    else:
        budget = None
    if cfg.layout == "influence":
        if not calibration:
            raise FipsError("DeltaLLM's influence layout needs calibration data to score the blocks.")
        from .blockdrop import block_cosines
        cands = [influence_plan(block_cosines(model, adapter, calibration), shapes, dense, budget=budget,
                                keep_first=cfg.keep_first, keep_last=cfg.keep_last, rank=cfg.delta_rank,
                                tol=cfg.budget_tol)]
    else:
        cands = candidate_plans(len(blocks), shapes, dense, budget=budget, keep_first=cfg.keep_first,
                                keep_last=cfg.keep_last, layout=cfg.layout, share_size=cfg.share_size,
                                rank=cfg.delta_rank, max_share_size=cfg.max_share_size, tol=cfg.budget_tol)
    if not cands:
        hint = "" if cfg.delta_rank is None else f" with delta_rank={cfg.delta_rank} (drop --delta-rank to solve it)"
        raise FipsError(f"No {cfg.layout} sharing pattern reaches the budget {budget:.3f} within "
                        f"{cfg.budget_tol}{hint}; try another budget, share size or keep_first/keep_last.")
    layers = sorted({f for c in cands for f in c.delta_layers})
    stats = None
    if cfg.init == "weighted":
        if not calibration:
            raise FipsError("DeltaLLM's weighted init needs calibration data (or use init='svd').")
        stats = input_covariances(model, adapter, blocks, names, layers, calibration)
    factors: dict[tuple[int, int], torch.Tensor | None] = {}
    for li in layers:
        for j in range(len(names)):
            factors[(li, j)] = None if stats is None else covariance_factor(*stats[(li, j)], ridge=cfg.ridge)

    def weight(li, j):
        return get_submodule(model, f"{blocks[li]}.{names[j]}").weight.detach().cpu()

    zero = residual_zero(adapter, names) if cfg.residual_init == "zero" else set()
    spectra, scales = {}, {}
    for a, f in spectrum_pairs(cands):
        for j in range(len(names)):
            w_f, w_a = weight(f, j), weight(a, j)
            if j in zero:
                s = 0.0
            else:
                s = anchor_scale(w_f, w_a, factors[(f, j)]) if cfg.anchor_scale == "fit" else 1.0
            scales[(a, f, j)] = s
            spectra[(a, f, j)] = weighted_spectrum(w_f - s * w_a, w_f, factors[(f, j)])
    plan = choose_plan(cands, spectra, len(names))
    table = [{"share_size": c.share_size, "rank": c.rank, "ratio": c.ratio,
              "error": choose_plan([c], spectra, len(names)).error} for c in cands]
    used = {(a, f, j): scales[(a, f, j)] for a, fs in plan.units for f in fs for j in range(len(names))}
    return plan, {"budget": budget, "names": names, "shapes": shapes, "factors": factors, "candidates": table,
                  "scales": used, "zero": zero}


def residual_zero(adapter: Adapter, names: list[str]) -> set[int]:
    """Indices into ``names`` of the shared linears that write to the residual stream (Adapter.residual_out)."""
    if not adapter.residual_out:
        raise FipsError(f"residual_init='zero' needs the {adapter.family} adapter to name the linears that write "
                        "to the residual stream; it names none.")
    return {j for j, n in enumerate(names) if n in adapter.residual_out}


@torch.no_grad()
def install_plan(model, adapter: Adapter, plan: SharingPlan, names: list[str], factors, device,
                 scales: dict | None = None, zero: set[int] = frozenset()) -> dict[int, list]:
    """Swap every shareable linear of the units for DeltaLinear; returns {follower: [(path, module)]}.

    Anchors become rank-0 DeltaLinears that own the shared Parameter (so the checkpoint and the
    accounting store/count it once); followers get A, B from the weighted truncated SVD of W_f - s W_a
    (s from ``scales[(anchor, follower, linear)]``, 1 when absent). Linears in ``zero`` (indices into
    ``names``) start with A = 0 (their B from that SVD, the input directions A learns on): their delta is
    zero, and with s = 0 so is their output."""
    blocks = flat_blocks(model, adapter)
    followers: dict[int, list] = {}
    for a, fs in plan.units:
        for j, n in enumerate(names):
            anchor = get_submodule(model, f"{blocks[a]}.{n}")
            w_a = anchor.weight.detach()
            shared = nn.Parameter(w_a.clone().to(device), requires_grad=False)
            out_f, in_f = w_a.shape
            bias = anchor.bias.detach().to(device) if anchor.bias is not None else None
            set_submodule(model, f"{blocks[a]}.{n}",
                          DeltaLinear(shared, torch.zeros(out_f, 0, device=device), torch.zeros(0, in_f, device=device), bias))
            for f in fs:
                lin = get_submodule(model, f"{blocks[f]}.{n}")
                s = 1.0 if scales is None else float(scales.get((a, f, j), 1.0))
                A, B = lowrank_delta(lin.weight.detach().cpu() - s * w_a.cpu(), plan.rank_of(f), factors.get((f, j)))
                if j in zero:
                    A = torch.zeros_like(A)
                b = lin.bias.detach().to(device) if lin.bias is not None else None
                mod = DeltaLinear(shared, A.to(device), B.to(device), b, scale=s)
                set_submodule(model, f"{blocks[f]}.{n}", mod)
                followers.setdefault(f, []).append((f"{blocks[f]}.{n}", mod))
    for m in model.modules():
        if isinstance(m, DeltaLinear):
            for p in m.parameters():
                p.requires_grad_(False)
    return followers


# --------------------------------------------------------------------------- training (shared with blockdrop)
class ProgressiveSwitch:
    """Per step, each compressed block runs compressed with probability p(t), else its dense original
    (the teacher's frozen modules, swapped in for that step)."""

    def __init__(self, model, teacher, followers: dict[int, list]):
        self.model = model
        self.slots = {li: [(path, mod, get_submodule(teacher, path)) for path, mod in pairs]
                      for li, pairs in followers.items()}

    def select(self, use: dict[int, bool]) -> None:
        for li, slots in self.slots.items():
            for path, comp, dense in slots:
                set_submodule(self.model, path, comp if use.get(li, True) else dense)

    def all_compressed(self) -> None:
        self.select({})


def _row_pool(batches: list[dict]):
    """All calibration rows as one tensor when batches are plain equal-length input_ids, else None."""
    if batches and all(set(b) == {"input_ids"} for b in batches):
        lens = {b["input_ids"].shape[1] for b in batches}
        if len(lens) == 1:
            return torch.cat([b["input_ids"] for b in batches])
    return None


@contextmanager
def _block_outputs(model, paths: list[str], sink: list):
    def hook(mod, args, out):
        sink.append(out[0] if isinstance(out, tuple) else out)
    handles = [get_submodule(model, p).register_forward_hook(hook) for p in paths]
    with hooks_removed(handles):
        yield


def distill_train(model, teacher, kind: str, named_params: dict[str, nn.Parameter], batches: list[dict], *,
                  steps: int, lr: float, warmup: int = 10, batch_rows: int = 2, seed: int = 0,
                  device: torch.device, switch: ProgressiveSwitch | None = None, replace=(1.0, 0.0),
                  second: tuple[set[int], float] | None = None,
                  hidden_weight: float = 0.0, block_paths_: list[str] | None = None,
                  state_file: Path | None = None, save_every: int = 0, resume: bool = False, meta: dict | None = None,
                  progress: bool = False, log=print) -> dict:
    """Distillation to ``teacher``: KL on logits (causal LM) or normalized MSE on outputs, plus an
    optional hidden-state MSE on block outputs. AdamW on ``named_params`` only, by
    ``fips_rt.train.train_loop``: linear warm-up over ``warmup`` steps, then cosine decay. ``second`` =
    (ids of some of ``named_params``, lr): those train at that base rate instead (same schedule).

    Every step draws its rows (and its replacement coin flips) from a generator seeded by (seed, step),
    so a run resumed from a saved step continues exactly as the uninterrupted run would."""
    from .evaluate import forward
    pool = _row_pool(batches)
    use_amp = device.type == "cuda"
    n_blocks = len(switch.slots) if switch is not None else 0
    want_hidden = hidden_weight > 0 and block_paths_

    def loss(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
        if pool is not None:
            idx = torch.randperm(pool.shape[0], generator=gen)[:batch_rows]
            b = {"input_ids": pool[idx]}
        else:
            b = batches[int(torch.randint(0, len(batches), (1,), generator=gen))]
        b = {k: v.to(device) for k, v in b.items()}
        if switch is not None:
            p = replacement_probability(step, steps, *replace)
            coins = torch.rand(n_blocks, generator=gen)
            switch.select({li: bool(c < p) for li, c in zip(sorted(switch.slots), coins)})
        hs, ht = [], []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            with _block_outputs(teacher, block_paths_ if want_hidden else [], ht):
                t = forward(teacher, b, kind)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            with _block_outputs(model, block_paths_ if want_hidden else [], hs):
                s = forward(model, b, kind)
            value = distill_loss(s, t, kind)
            if want_hidden:
                value = value + hidden_weight * hidden_mse(hs, ht)
        return value

    def adamw(ps):
        groups = [{"params": [p for p in ps if second is None or id(p) not in second[0]], "lr": lr}]
        if second is not None:
            groups.append({"params": [p for p in ps if id(p) in second[0]], "lr": second[1]})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    state = None if state_file is None else StateFile(state_file, named_params, save_every, meta, resume)
    model.train(False)
    try:
        out = train_loop(loss, list(named_params.values()), adamw, steps=steps, warmup=warmup, state=state,
                         desc="distillation", progress=progress, log=log)
    finally:
        if switch is not None:
            switch.all_compressed()
    return {"steps": steps, "resumed_at": out["resumed_at"], **loss_summary(out["losses"]), "losses": out["losses"]}


# --------------------------------------------------------------------------- entry point
def _scale_summary(scales: dict) -> dict:
    vals = [abs(v) for v in scales.values()]
    return {"n": len(vals), "max_abs": max(vals, default=0.0), "mean_abs": sum(vals) / max(len(vals), 1)}


def block_parameters(model, adapter: Adapter) -> dict[str, nn.Parameter]:
    """Every parameter of every block (attention, MLP, norms), each Parameter once (a shared anchor under its
    first name): what block drop's heal and DeltaLLM's train_scope="blocks" train."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for bp in flat_blocks(model, adapter):
        for n, p in get_submodule(model, bp).named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{bp}.{n}"] = p
    return out


def trainable_params(model, adapter: Adapter, followers: dict[int, list], train_norms: bool,
                     scope: str = "deltas") -> tuple[dict[str, nn.Parameter], set[int]]:
    """(name -> Parameter, ids of the non-delta ones). scope "deltas": the followers' A, B (+ their norms
    with ``train_norms``); "blocks": also every other parameter of every block (the shared anchors, the
    unshared linears, attention, norms; each Parameter once), as block drop's heal trains them."""
    named: dict[str, nn.Parameter] = {}
    for li in sorted(followers):
        for path, mod in followers[li]:
            named[f"{path}.A"] = mod.A
            named[f"{path}.B"] = mod.B
    if train_norms:
        blocks = flat_blocks(model, adapter)
        for li in sorted(followers):
            for n, m in get_submodule(model, blocks[li]).named_modules():
                if "norm" in type(m).__name__.lower():
                    for pn, p in m.named_parameters(recurse=False):
                        named[f"{blocks[li]}.{n}.{pn}"] = p
    others: set[int] = set()
    if scope == "blocks":
        seen = {id(p) for p in named.values()}
        for name, p in block_parameters(model, adapter).items():
            if id(p) not in seen:
                others.add(id(p))
                named[name] = p
    return named, others


def compress_deltallm(model, adapter: Adapter, cfg: DeltaConfig, calibration: list[dict] | None, *,
                      device: torch.device, progress: bool = False, state_dir=None, resume: bool = False,
                      log=print) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.steps > 0 and not calibration:
        raise FipsError("DeltaLLM training needs calibration data (or steps=0).")
    model.to(device)
    plan, info = plan_sharing(model, adapter, cfg, calibration, log)
    log(f"deltallm: share size {plan.share_size} ({cfg.layout}), rank {plan.rank}, "
        f"{len(plan.delta_layers)} delta blocks, params {plan.ratio:.4f} of dense")
    teacher = None
    if cfg.steps > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    t_init = time.time()
    followers = install_plan(model, adapter, plan, info["names"], info["factors"], device, info["scales"],
                             info["zero"])
    init_s = time.time() - t_init
    train = {}
    if cfg.steps > 0:
        state = Path(state_dir) if state_dir else None
        meta = {"config": cfg.to_dict(), "plan": {k: v for k, v in plan.to_dict().items() if k != "error"}}
        if state is not None:
            state.mkdir(parents=True, exist_ok=True)
            if not resume and (state / STATE_FILE).exists():
                (state / STATE_FILE).unlink()
        named, others = trainable_params(model, adapter, followers, cfg.train_norms, cfg.train_scope)
        blocks = flat_blocks(model, adapter)
        train = distill_train(model, teacher, adapter.kind, named, calibration, steps=cfg.steps, lr=cfg.lr,
                              warmup=cfg.warmup, batch_rows=cfg.batch, seed=cfg.seed, device=device,
                              switch=ProgressiveSwitch(model, teacher, followers),
                              replace=(cfg.replace_start, cfg.replace_end), hidden_weight=cfg.hidden_mse,
                              second=(others, cfg.block_lr) if others else None,
                              block_paths_=blocks, state_file=None if state is None else state / STATE_FILE,
                              save_every=cfg.save_every, resume=resume, meta=json.loads(json.dumps(meta)),
                              progress=progress, log=log)
        train["trainable_params"] = sum(p.numel() for p in named.values())
        del teacher
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"method": "deltallm", "budget": info["budget"], "plan": plan.to_dict(), "layout": cfg.layout,
            "shared_linears": info["names"], "candidates": info["candidates"], "init": cfg.init,
            "anchor_scale": cfg.anchor_scale, "residual_init": cfg.residual_init, "train_scope": cfg.train_scope,
            "scales": _scale_summary(info["scales"]),
            "init_seconds": init_s, "train": {k: v for k, v in train.items() if k != "losses"},
            "losses": train.get("losses", []), "seconds": time.time() - t0, "device": str(device)}
