"""Quality harness: FiPS against its peers at equal parameter counts, SmolLM2-135M and all-MiniLM-L6-v2.

Every method starts from the same dense model, sees the same calibration tokens (wiki train split) and
is judged on the same evaluation windows (wiki test split by default; ``--split validation`` to choose
settings without touching the test split), with fixed seeds. SmolLM2: perplexity and its ratio to the
dense model on the same windows. MiniLM: cosine of the sentence embeddings to the dense model's and
top-1 retrieval agreement with the dense model.

    python benchmarks/quality.py                        # full settings; CUDA when present (device auto)
    python benchmarks/quality.py --resume               # continue a long run: rows already in the JSON
                                                        #   with identical settings are skipped
    python benchmarks/quality.py --split validation     # choose settings (writes quality_*_validation.*)
    python benchmarks/quality.py --smoke --threads 1    # tiny settings on a CPU: quality_*_smoke.*
    python benchmarks/quality.py --model smollm2 --methods fips-local,svd-local --budgets 0.5 --set steps=800
    python benchmarks/quality.py --plot-only            # redraw the .md/.png from the JSON; runs nothing

Outputs (benchmarks/results/): quality_smollm2.{json,md,png}, quality_minilm.{json,md}.

The CPU quality curve (``--preset cpu``): SmolLM2-135M at MLP budgets 0.5, 0.7, 0.9, each run at the cost of
one ``fips demo``, on a CPU (``--device`` to change it):

    python benchmarks/quality.py --preset cpu --select-lr   # 1. LR grid at MLP budget 0.7, validation split
                                                            #    -> quality_smollm2_cpu_lr.{json,md,png}
    python benchmarks/quality.py --preset cpu               # 2. test split -> quality_smollm2_cpu.{json,md,png}
    python benchmarks/quality.py --preset cpu --plot-only   # redraw its .md/.png from the JSON
    python benchmarks/quality.py --preset cpu --smoke       # tiny settings: quality_smollm2_cpu_smoke.*

- Data: calibration = the demo's 32 x 512 wiki-train tokens (16,384); evaluation = 16 windows x 512 tokens of
  the wiki test articles AND of the out-of-domain WordNet glosses (test half), cut exactly as ``fips demo``
  cuts them (``fips_rt.data.lm_batches``); each row has both perplexities and both ratios to the dense model
  on the same windows, and its whole-model parameters (rows are matched at equal whole-model parameters).
- Methods (the same calibration tokens and the same 60 distillation steps x 1 row x 512 tokens each):
  ``fips-global`` = the demo recipe (groups of 4, whitened init, V sparsity per budget such that the rank is
  d = 576: ``square_u_sparsity``, 0.5315 / 0.3315 / 0.1315; closed-form refits, refit=after x 2 rounds, no
  local AdamW steps; then 60 global distillation steps); ``svd-global`` = per-linear whitened truncated SVD
  (already the minimizer of its whitened local error, so no refit) + the same distillation loop
  (``fips_rt.fips.train_global``); ``drop-heal`` = ShortGPT block drop to the FiPS row's whole-model params,
  healed 60 steps; ``deltallm`` at the FiPS row's whole-model params, 60 steps; plus the dense row.
- Order: dense, then all methods at 0.5, then 0.7, then 0.9. Every row is written to the JSON (temp file +
  rename), the .md and the .png as it finishes; rerunning the same command resumes (rows whose recorded
  settings match are kept; failed rows are retried), so the background job can be ended at any time. Delete
  the JSON to start over.
- Learning rates: ``--select-lr`` runs each trained method's grid (fips-global global_lr, svd-global svd_lr,
  drop-heal heal_lr: 3e-5, 1e-4, 3e-4, 1e-3 -- 1e-3 added when 3e-4 won at the edge; deltallm delta_lr: 3e-4,
  1e-3, 3e-3, its block_lr = delta_lr / 10, the ratio chosen on benchmarks/deltallm_cpu.py's validation split)
  at MLP budget 0.7 on the
  VALIDATION split (wiki validation + the WordNet validation half, 16 x 512 each), resumably, method by
  method. When a method's best LR sits at its grid's edge, one more LR one step past that edge is run, and so
  on, at most two beyond the preset's grid (``next_grid_lr``; the grid the JSON records then includes them).
  The test-split run then takes, per method, the grid LR with the lowest wiki-validation ratio from
  quality_smollm2_cpu_lr.json -- once that method's whole grid is there and its rows were made with the same
  settings -- and otherwise the defaults (1e-4 each; deltallm 1e-3); every row records its LR and where it came
  from (``lr``, ``lr_source``; the .md says selected/default). A row whose LR changed is rerun.
- Each row also records its build and evaluation seconds, its CPU seconds, the load average at its start and
  end, and the CPU seconds other processes used meanwhile (the busiest named); the .md has the CPU model,
  cores and torch threads (``--threads N``) and the command.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Every knob of a run. Rows record the fields their method depends on (see METHODS), so a resumed
    run recomputes exactly the rows whose settings changed."""
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)  # MLP budgets (fraction of MLP parameters kept)
    seed: int = 0
    # causal LM data: calibration = calib_rows x seq_len train tokens, in batches of calib_batch rows
    calib_rows: int = 128
    seq_len: int = 1024
    calib_batch: int = 4  # also the rows per distillation step of every distilled method
    eval_windows: int = 96
    eval_seq_len: int = 1024
    eval_batch: int = 4
    # encoder data: train summaries for calibration; test summaries for cosine; test articles for retrieval
    calib_sentences: int = 2048
    max_len: int = 128
    eval_sentences: int = 0  # 0: every summary of the split
    retrieval_articles: int = 0  # 0: every article of the split with two or more sentences
    eval_ood: str = ""  # "" or "wordnet": every row is also evaluated on that text (the same split half,
    #                     eval_windows x eval_seq_len), with its ratio to the dense model on those windows
    # FiPS
    group_size: int = 4
    sparsity: float = 0.75
    square_u: bool = False  # True: V's sparsity per budget such that the rank equals d (U square;
    #                         square_u_sparsity); ``sparsity`` is then unused
    ridge: float = 1e-2
    mask_every: int = 0  # steps between GMP mask updates; 0: the engine's default (about 10 over the ramp)
    refit: str = "none"  # closed-form refits of V and U (FipsConfig.refit: none, before, after, both)
    refit_rounds: int = 2
    selection: str = "magnitude"  # V's kept entries at init (FipsConfig.selection: magnitude, obs)
    # local error minimization (FiPS local/global and svd-local: equal training)
    steps: int = 600
    lr: float = 1e-3
    batch_tokens: int = 512
    # distillation (fips-global, svd-global, deltallm, drop-heal: equal steps x rows x seq_len tokens)
    global_steps: int = 300
    distill_rows: int = 0  # calibration rows per distillation step (0: calib_batch)
    global_lr: float = 1e-4
    svd_lr: float = 1e-4
    delta_lr: float = 1e-3  # deltallm: the deltas' lr (DeltaConfig.lr)
    delta_block_lr: float = 1e-4  # deltallm: every other block parameter's (DeltaConfig.block_lr); LR grids: delta_lr / 10
    heal_lr: float = 1e-4
    distill_warmup: int = 10  # deltallm, drop-heal (fips.train_global warms up over global_steps // 20)
    # Basis Sharing: layers per shared gate/up basis
    share: int = 2


DEFAULTS = {
    ("smollm2", False): Settings(),
    ("smollm2", True): Settings(budgets=(0.5,), calib_rows=8, seq_len=128, calib_batch=2, eval_windows=8,
                                eval_seq_len=128, eval_batch=4, steps=8, mask_every=4, batch_tokens=256,
                                global_steps=3, distill_warmup=1),
    ("minilm", False): Settings(calib_batch=32),
    ("minilm", True): Settings(budgets=(0.5,), calib_sentences=64, max_len=64, calib_batch=16, eval_sentences=64,
                               retrieval_articles=64, steps=8, mask_every=4, batch_tokens=256),
}
MODELS = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}
LM_COMMON = ("calib_rows", "seq_len", "calib_batch", "eval_windows", "eval_seq_len", "eval_ood", "seed")
ENC_COMMON = ("calib_sentences", "max_len", "calib_batch", "eval_sentences", "retrieval_articles", "seed")
# settings left out of a row's resume key while they hold these values (rows made before they existed
# stay valid)
NEUTRAL = {"eval_ood": "", "square_u": False, "distill_rows": 0}


def parse_set(settings: Settings, items: list[str]) -> Settings:
    """Apply ``key=value`` overrides (types follow the field's default)."""
    kw = {}
    types = {f.name: type(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in types or not _:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {', '.join(types)}")
        if types[key] is tuple:
            kw[key] = tuple(float(v) for v in value.split(",") if v.strip())
        else:
            kw[key] = types[key](value)
    return dataclasses.replace(settings, **kw)


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    """The dense model (never modified), the data, and what every row is judged against."""
    name: str  # "smollm2" | "minilm"
    base: object  # LoadedModel, dense, frozen, on ``device``
    calib: list[dict]
    evaldata: dict  # LM: {"windows"}; encoder: {"texts", "queries", "corpus"} (batches)
    S: Settings
    split: str
    device: torch.device
    progress: bool = False
    log: Callable = print
    dense: dict = field(default_factory=dict)  # count_model of the dense model
    reference: dict = field(default_factory=dict)  # dense evaluation (cached)

    @property
    def kind(self) -> str:
        return self.base.adapter.kind

    @property
    def adapter(self):
        return self.base.adapter

    def fresh(self):
        """A LoadedModel around a deep copy of the dense module (tokenizer and source shared)."""
        return dataclasses.replace(self.base, model=copy.deepcopy(self.base.model))


# --------------------------------------------------------------------------- methods
def distill_rows(S: Settings) -> int:
    """Calibration rows per distillation step of every distilled method."""
    return S.distill_rows or S.calib_batch


def square_u_sparsity(budget: float, d: int, d_ff: int, n_linears: int, step: float = 0.0005) -> float:
    """The sparsity of V at which a group of ``n_linears`` d x d_ff linears at MLP budget ``budget`` gets
    rank d (U square: no zero basis columns at init), by the engine's budget math
    (``fips_rt.budget.rank_for_budget``): rank d needs d*d + (1 - s) d n d_ff <= p n d d_ff, i.e.
    s >= 1 - p + d / (n d_ff), rounded up to a multiple of ``step`` (then raised by ``step`` until the
    engine gives rank d). SmolLM2-135M, groups of 4 (n = 12, d = 576, d_ff = 1536): 0.5315 at p = 0.5
    (the ``fips demo`` constant), 0.3315 at 0.7, 0.1315 at 0.9."""
    from fips_rt.budget import rank_for_budget
    exact = 1.0 - budget + d / (n_linears * d_ff)
    if not 0.0 <= exact < 1.0:
        raise ValueError(f"no sparsity in [0, 1) gives rank {d} at MLP budget {budget} (needs {exact:.4f})")
    s = round(math.ceil(exact / step - 1e-6) * step, 6)
    while s < 1.0 and rank_for_budget(budget, d, d_ff, n_linears, s) < d:
        s = round(s + step, 6)
    r = rank_for_budget(budget, d, d_ff, n_linears, s) if s < 1.0 else 0
    if r != d:
        raise ValueError(f"sparsity {s} (a multiple of {step}) gives rank {r}, not {d}, at MLP budget {budget}")
    return s


def square_u_sparsity_for(model, adapter, budget: float, group_size: int) -> float:
    """``square_u_sparsity`` for the full groups of ``group_size`` MLPs of ``model`` (fips.plan_groups;
    a smaller last group then gets a rank below d, as in ``fips demo``)."""
    from fips_rt.config import FipsConfig
    from fips_rt.fips import plan_groups
    plans, _ = plan_groups(model, adapter, FipsConfig(mlp_budget=budget, group_size=group_size, sparsity=0.0))
    n = max(len(p.linears) for p in plans)
    shapes = {(p.d, p.d_ff) for p in plans if len(p.linears) == n}
    if len(shapes) != 1:
        raise ValueError(f"the full groups have several MLP shapes {sorted(shapes)}: one sparsity cannot make "
                         f"every U square")
    d, d_ff = shapes.pop()
    return square_u_sparsity(budget, d, d_ff, n)


def fips_sparsity(ctx: Context, budget: float) -> float:
    S = ctx.S
    return square_u_sparsity_for(ctx.base.model, ctx.adapter, budget, S.group_size) if S.square_u else S.sparsity


def fips_config(S: Settings, budget: float, local: bool = False, distill: bool = False,
                sparsity: float | None = None):
    from fips_rt.config import FipsConfig
    # keep_teacher: every group is trained on the dense model's MLP I/O, however many calibration passes
    # the activations need (svd-local does the same), so all local-trained rows are teacher-forced alike.
    return FipsConfig(mlp_budget=budget, group_size=S.group_size,
                      sparsity=S.sparsity if sparsity is None else sparsity, init="whitened",
                      ridge=S.ridge, steps=S.steps if local else 0, lr=S.lr, batch_tokens=S.batch_tokens,
                      mask_every=S.mask_every, refit=S.refit, refit_rounds=S.refit_rounds, selection=S.selection,
                      global_steps=S.global_steps if distill else 0, global_lr=S.global_lr,
                      global_batch=distill_rows(S) if distill else S.calib_batch, seed=S.seed, keep_teacher=True)


def ctx_fips_config(ctx: Context, budget: float, local: bool = False, distill: bool = False):
    """``fips_config`` with the sparsity the context's settings give at ``budget``."""
    return fips_config(ctx.S, budget, local, distill, fips_sparsity(ctx, budget))


def fips_params(ctx: Context, budget: float) -> int:
    """Whole-model parameters of the FiPS rows at MLP budget ``budget`` (from the plan: dense U + kept V
    entries per group, MLP biases, everything outside the MLPs)."""
    from fips_rt.budget import kept_nnz
    from fips_rt.fips import plan_groups
    cfg = ctx_fips_config(ctx, budget)
    plans, _ = plan_groups(ctx.base.model, ctx.adapter, cfg)
    factors = sum(p.d * p.rank + kept_nnz(p.rank, len(p.linears) * p.d_ff, cfg.sparsity) for p in plans)
    weights = sum(p.d * p.d_ff * len(p.linears) for p in plans)
    return ctx.dense["params"] - weights + factors


def fips_model_budget(ctx: Context, budget: float) -> float:
    return fips_params(ctx, budget) / ctx.dense["params"]


def delta_config(ctx: Context, budget: float):
    from fips_rt.config import DeltaConfig
    S = ctx.S
    return DeltaConfig(model_budget=fips_model_budget(ctx, budget), steps=S.global_steps, lr=S.delta_lr,
                       block_lr=S.delta_block_lr, batch=distill_rows(S), warmup=S.distill_warmup, save_every=0, seed=S.seed)


def build_fips(ctx: Context, budget: float, local: bool, distill: bool):
    from fips_rt.api import compress_
    lm = ctx.fresh()
    cfg = ctx_fips_config(ctx, budget, local, distill)
    rep = compress_(lm, cfg, ctx.calib, device=ctx.device, progress=ctx.progress, log=ctx.log)
    d = rep.details
    return lm.model, {"ranks": sorted({g["rank"] for g in d["groups"]}), "sparsity": cfg.sparsity,
                      "global": d.get("global", {}),
                      "local_loss": [g.get("loss_last") for g in d["groups"]]}


def build_lowrank(ctx: Context, budget: float, layout: str, local: bool):
    from fips_rt import baselines
    from fips_rt.fips import plan_groups
    S = ctx.S
    lm = ctx.fresh()
    kw = dict(ridge=S.ridge, device=ctx.device, progress=ctx.progress)
    if layout == "per-linear":
        info = baselines.svd_llm_(lm.model, ctx.adapter, budget, ctx.calib, **kw)
    else:
        info = baselines.basis_sharing_(lm.model, ctx.adapter, budget, ctx.calib, share=S.share, **kw)
    if local:  # the same layer groups, steps, lr, tokens and sampler as fips-local
        groups = [p.layers for p in plan_groups(ctx.base.model, ctx.adapter, ctx_fips_config(ctx, budget))[0]]
        info["local"] = baselines.train_local_(lm.model, ctx.adapter, ctx.base.model, groups, ctx.calib,
                                               steps=S.steps, lr=S.lr, batch_tokens=S.batch_tokens, seed=S.seed,
                                               device=ctx.device, progress=ctx.progress)
    return lm.model, {k: v for k, v in info.items() if k != "seconds"}


def svd_global_config(S: Settings, budget: float) -> dict:
    """What svd-global's distillation runs with (the global-stage fields of a FipsConfig)."""
    return {"mlp_budget": budget, "global_steps": S.global_steps, "global_lr": S.svd_lr,
            "global_batch": distill_rows(S), "global_seq_len": 0, "global_norms": False, "seed": S.seed}


def build_svd_global(ctx: Context, budget: float):
    """svd (per-linear whitened truncated SVD, dense factors), then fips-global's own distillation loop
    (``fips_rt.fips.train_global``: it trains every U, V and MLP bias of the model's FipsLinear modules,
    which the SVD factors are; V's all-ones mask keeps it dense) with svd_lr."""
    from fips_rt import baselines
    from fips_rt.config import FipsConfig
    from fips_rt.fips import train_global
    S = ctx.S
    lm = ctx.fresh()
    info = baselines.svd_llm_(lm.model, ctx.adapter, budget, ctx.calib, ridge=S.ridge, device=ctx.device,
                              progress=ctx.progress)
    cfg = FipsConfig(**svd_global_config(S, budget))
    glob = train_global(lm.model, ctx.base.model, ctx.adapter, ctx.calib, cfg, ctx.device, progress=ctx.progress)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    lm.model.eval()
    return lm.model, {**{k: v for k, v in info.items() if k != "seconds"}, "svd_seconds": info.get("seconds"),
                      "global": glob}


def build_deltallm(ctx: Context, budget: float):
    from fips_rt.api import compress_
    lm = ctx.fresh()
    cfg = delta_config(ctx, budget)
    rep = compress_(lm, cfg, ctx.calib, device=ctx.device, progress=ctx.progress, log=ctx.log)
    d = rep.details
    return lm.model, {"target_model_budget": cfg.model_budget, "plan": d["plan"], "train": d["train"]}


def build_drop_heal(ctx: Context, budget: float):
    from fips_rt.blockdrop import drop_blocks_, heal_
    S = ctx.S
    model = copy.deepcopy(ctx.base.model)
    target = fips_model_budget(ctx, budget)
    info = drop_blocks_(model, ctx.adapter, target, ctx.calib)
    heal = heal_(model, ctx.base.model, ctx.calib, S.global_steps, S.heal_lr, adapter=ctx.adapter,
                 batch_rows=distill_rows(S), warmup=S.distill_warmup, seed=S.seed, device=ctx.device,
                 progress=ctx.progress, log=ctx.log)
    return model, {"target_model_budget": target, "dropped": info["dropped"],
                   "heal": {k: v for k, v in heal.items() if k != "losses"}}


@dataclass(frozen=True)
class Method:
    name: str
    kinds: tuple[str, ...]  # model kinds it runs on
    fields: tuple[str, ...]  # Settings fields its result depends on (beyond the common data fields)
    build: Callable  # (ctx, budget) -> (compressed nn.Module, details)
    config: Callable | None  # (ctx, budget) -> the config dict it runs with (recorded; part of the resume key)
    about: str
    lr_field: str | None = None  # the Settings field of its distillation learning rate (--select-lr)
    lr_follow: tuple[tuple[str, float], ...] = ()  # Settings fields set to factor x that LR when a grid sets it


def lr_overrides(method: str, lr: float) -> tuple[tuple[str, float], ...]:
    """The Settings overrides that give ``method`` the learning rate ``lr``: its lr_field, and the fields that
    follow it (Method.lr_follow; rounded to 6 significant digits so that 1e-3 x 0.1 is 1e-4)."""
    m = METHODS[method]
    return ((m.lr_field, lr),) + tuple((g, float(f"{lr * k:.6g}")) for g, k in m.lr_follow)


LM_ONLY, BOTH = ("causal-lm",), ("causal-lm", "encoder")
FIPS_F = ("group_size", "sparsity", "square_u", "ridge")
LOCAL_F = ("steps", "lr", "batch_tokens")  # + mask_every for FiPS (svd-local has no masks to update)
DISTILL_F = ("global_steps", "distill_rows", "distill_warmup")
METHODS = {m.name: m for m in [
    Method("fips-init", BOTH, FIPS_F, lambda c, b: build_fips(c, b, False, False),
           lambda c, b: ctx_fips_config(c, b).to_dict(),
           "FiPS, activation-aware shared init only: groups of 4 MLPs share U, V 75% sparse, no training"),
    Method("fips-local", BOTH, FIPS_F + LOCAL_F + ("mask_every",), lambda c, b: build_fips(c, b, True, False),
           lambda c, b: ctx_fips_config(c, b, True).to_dict(),
           "FiPS + local error minimization (teacher-forced MLP MSE, GMP to the final sparsity)"),
    Method("fips-global", LM_ONLY, FIPS_F + LOCAL_F + DISTILL_F + ("mask_every", "global_lr"),
           lambda c, b: build_fips(c, b, True, True),
           lambda c, b: ctx_fips_config(c, b, True, True).to_dict(),
           "FiPS + local + global error minimization (KL distillation to the dense model; U, V, MLP biases)",
           "global_lr"),
    Method("svd", BOTH, ("ridge",), lambda c, b: build_lowrank(c, b, "per-linear", False), None,
           "SVD-LLM style: every MLP linear its own whitened truncated SVD, dense factors, "
           "rank floor(p d d_ff / (d + d_ff)); training-free"),
    Method("svd-local", BOTH, ("ridge", "group_size") + LOCAL_F,
           lambda c, b: build_lowrank(c, b, "per-linear", True), None,
           "svd + the same local error minimization as fips-local (same groups, steps, lr, tokens)"),
    Method("svd-global", LM_ONLY, ("ridge",) + DISTILL_F + ("svd_lr",), build_svd_global,
           lambda c, b: svd_global_config(c.S, b),
           "svd + fips-global's global distillation (fips_rt.fips.train_global: KL to the dense logits, the same "
           "steps, rows, tokens, sampler and schedule; U, V and biases of the SVD factors trained) at its own "
           "LR (svd_lr). No local fit or refit: the whitened truncated SVD already minimizes each linear's "
           "whitened local error at its rank (gate/up ||X (W - UV)||, down ||(W - UV) H|| on the dense input), "
           "so FiPS's closed-form refit would leave it as it is (up to its ridge and, for down_proj, its fit "
           "to the dense MLP output on the compressed gate/up output)", "svd_lr"),
    Method("basis-sharing", BOTH, ("ridge", "share"), lambda c, b: build_lowrank(c, b, "basis-sharing", False),
           None,
           "Basis Sharing: gate and up bases whitened-SVD-shared by 2 adjacent layers, down per layer; "
           "training-free"),
    Method("deltallm", LM_ONLY, FIPS_F + DISTILL_F + ("delta_lr", "delta_block_lr"), build_deltallm,
           lambda c, b: delta_config(c, b).to_dict(),
           "DeltaLLM (the library's defaults): the least influential blocks follow their nearest block, every "
           "linear shared + a low-rank delta, the residual writers started at zero (so training starts at the "
           "block-drop model), progressive-replacement distillation (fips_rt.deltallm.distill_train); "
           "whole-model params = the FiPS row's", "delta_lr", (("delta_block_lr", 0.1),)),
    Method("drop-heal", LM_ONLY, FIPS_F + DISTILL_F + ("heal_lr",), build_drop_heal, None,
           "ShortGPT block drop to the FiPS row's whole-model params, healed by the same distillation budget "
           "(fips_rt.blockdrop.heal_: every parameter of the remaining blocks trained)", "heal_lr"),
]}


def methods_for(kind: str) -> list[str]:
    return [n for n, m in METHODS.items() if kind in m.kinds]


# --------------------------------------------------------------------------- evaluation
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate(ctx: Context, model) -> dict:
    from fips_rt.evaluate import perplexity, sentence_embeddings
    model.eval()
    if ctx.kind == "causal-lm":
        ppl = perplexity(model, ctx.evaldata["windows"], progress=ctx.progress)["ppl"]
        dense = ctx.reference.get("ppl", ppl)
        out = {"ppl": ppl, "ppl_ratio": ppl / dense}
        if ctx.evaldata.get("ood_windows"):  # the second text (Settings.eval_ood), on its own windows
            ood = perplexity(model, ctx.evaldata["ood_windows"], progress=ctx.progress)["ppl"]
            out.update(ood_data=ctx.S.eval_ood, ood_ppl=ood, ood_ppl_ratio=ood / ctx.reference.get("ood_ppl", ood))
        return out
    ev = ctx.evaldata
    emb, q, c = (sentence_embeddings(model, ev[k]) for k in ("texts", "queries", "corpus"))
    top = (q @ c.T).argmax(-1)
    ref = ctx.reference
    cos = (emb * ref["emb"]).sum(-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "retrieval_agreement": float((top == ref["top"]).float().mean()),
            "retrieval_accuracy": float((top == torch.arange(top.numel())).float().mean()),
            "n_texts": int(cos.numel()), "n_queries": int(top.numel())}


def set_reference(ctx: Context) -> dict:
    """Evaluate the dense model once; every compressed row is compared with it."""
    from fips_rt.evaluate import sentence_embeddings
    ctx.reference.clear()
    if ctx.kind == "causal-lm":
        out = evaluate(ctx, ctx.base.model)
        ctx.reference["ppl"] = out["ppl"]
        if "ood_ppl" in out:
            ctx.reference["ood_ppl"] = out["ood_ppl"]
        return out
    ev = ctx.evaldata
    emb, q, c = (sentence_embeddings(ctx.base.model, ev[k]) for k in ("texts", "queries", "corpus"))
    ctx.reference.update(emb=emb, top=(q @ c.T).argmax(-1))
    return evaluate(ctx, ctx.base.model)


def measure(ctx: Context, model) -> dict:
    from fips_rt.accounting import count_model
    from fips_rt.baselines import stored_bytes
    c = count_model(model, ctx.adapter)
    params, nbytes = int(c["params"]), stored_bytes(model, c)
    return {"params": params, "bytes": nbytes, "model_budget": params / ctx.dense["params"],
            "bytes_ratio": nbytes / ctx.dense["bytes"], "mlp_params": int(c["mlp_params"]),
            "mlp_budget_reached": c["mlp_params"] / ctx.dense["mlp_params_dense"]}


# --------------------------------------------------------------------------- what else runs on the machine
def _proc_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every process now, from /proc (empty where there is none)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def _proc_name(pid: int) -> str:
    """A short name: the program and its script or module (``python -m pytest``), never further arguments."""
    try:
        argv = [a for a in (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")) if a]
    except OSError:
        return "?"
    words = [os.path.basename(a.decode(errors="replace")) for a in argv[:3]]
    if len(words) > 1 and words[1] == "-m":
        words = [words[0], words[2] if len(words) > 2 else ""]
    return " ".join(w for w in words[:2] if w)[:48] or "?"


class MachineLoad:
    """Load average at the start and the end of a row, and the CPU seconds other processes used meanwhile
    (processes that started and ended inside the row are missed; their time is in the load average)."""

    def __init__(self):
        self.t0 = time.time()
        self.load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.cpu0 = _proc_cpu()

    def finish(self) -> dict:
        own = {os.getpid()}
        cpu1 = _proc_cpu()
        others = {pid: t - self.cpu0.get(pid, 0.0) for pid, t in cpu1.items() if pid not in own}
        top = [(t, _proc_name(pid)) for t, pid in sorted(((t, pid) for pid, t in others.items() if t >= 1.0),
                                                         reverse=True)[:5]]
        return {"load_start": self.load0, "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "others_cpu_seconds": round(sum(t for t in others.values() if t > 0), 1),
                "others_top": [f"{name} ({t:.0f} s)" for t, name in top if name != "?"][:3]}


# --------------------------------------------------------------------------- rows, resume
def _jsonable(x):
    return json.loads(json.dumps(x))


def common_settings(ctx: Context) -> dict:
    names = LM_COMMON if ctx.kind == "causal-lm" else ENC_COMMON
    s = {k: getattr(ctx.S, k) for k in names if NEUTRAL.get(k, object()) != getattr(ctx.S, k)}
    return _jsonable({"model": MODELS.get(ctx.name, ctx.name), "split": ctx.split, "device_type": ctx.device.type,
                      **s})


def row_settings(ctx: Context, method: str, budget: float) -> dict:
    """What a row depends on: the common data settings, the method's fields and its config."""
    s = common_settings(ctx)
    if method != "dense":
        m = METHODS[method]
        s.update({k: getattr(ctx.S, k) for k in m.fields if NEUTRAL.get(k, object()) != getattr(ctx.S, k)})
        if m.config is not None:
            s["config"] = m.config(ctx, budget)
    return _jsonable(s)


def run_row(ctx: Context, method: str, budget: float) -> dict:
    row = {"method": method, "budget": budget, "split": ctx.split, "device": str(ctx.device),
           "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU",
           "commit": git_commit(), "settings": row_settings(ctx, method, budget)}
    torch.manual_seed(ctx.S.seed)
    load = MachineLoad()
    t0, c0 = time.time(), time.process_time()
    try:
        if method == "dense":
            model, details = ctx.base.model, {}
        else:
            model, details = METHODS[method].build(ctx, budget)
    except Exception as e:  # noqa: BLE001 - one failing method must not end a long run; the row says why
        ctx.log(f"{method} @ {budget}: FAILED: {type(e).__name__}: {e}")
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    row["seconds"] = time.time() - t0
    row["cpu_seconds"] = time.process_time() - c0
    row.update(measure(ctx, model))
    t1 = time.time()
    row.update(set_reference(ctx) if method == "dense" else evaluate(ctx, model))
    row["eval_seconds"] = time.time() - t1
    row["machine_load"] = load.finish()
    row["details"] = _jsonable(details)
    if model is not ctx.base.model:
        del model
    _free(ctx.device)
    return row


def load_rows(path: Path, ctx: Context) -> list[dict]:
    """Rows of an earlier run with the same common settings (others are dropped: their ratios refer to
    other evaluation data)."""
    if not path.is_file():
        return []
    common = common_settings(ctx)
    rows = json.loads(path.read_text()).get("rows", [])
    keep = [r for r in rows if {k: r.get("settings", {}).get(k) for k in common} == common]
    if len(keep) < len(rows):
        ctx.log(f"--resume: {len(rows) - len(keep)} rows of {path.name} had other data settings; dropped")
    return keep


@dataclass(frozen=True)
class Job:
    """One row to run: ``method`` at MLP budget ``budget`` with ``overrides`` of the settings (e.g. the
    method's learning rate). ``tag`` tells rows of one (method, budget) apart (``lr=1e-4`` in an LR
    grid); ``lr_source`` says where the learning rate came from."""
    method: str
    budget: float
    tag: str = ""
    overrides: tuple[tuple[str, object], ...] = ()
    lr_source: str | None = None


def _key(r: dict) -> tuple:
    return r["method"], r["budget"], r.get("tag", "")


def run(ctx: Context, methods: list[str], budgets: list[float], out: Path, *, resume: bool = False,
        meta: dict | None = None, jobs: list[Job] | None = None, figure_each: bool = False) -> dict:
    """Dense row, then every (budget, method) -- or the given ``jobs``, in their order. Writes ``out``
    (.json, .md; .png for LMs at the end, or after each row with ``figure_each``) after each row, the JSON
    atomically (temp file + rename), so a run can be ended at any time and resumed (``resume``: rows of
    the file whose settings match are kept)."""
    rows = load_rows(out.with_suffix(".json"), ctx) if resume else []
    order = ["dense"] + methods
    result = {"benchmark": "quality", "model": MODELS.get(ctx.name, ctx.name), "split": ctx.split,
              **(meta or {}), "settings": _jsonable(dataclasses.asdict(ctx.S)), "rows": rows}
    if jobs is None:
        jobs = [Job(m, b) for b in budgets for m in methods]
    todo = [Job("dense", 1.0)] + list(jobs)
    for i, job in enumerate(todo):
        method, budget = job.method, job.budget
        jctx = dataclasses.replace(ctx, S=dataclasses.replace(ctx.S, **dict(job.overrides))) if job.overrides else ctx
        settings = row_settings(jctx, method, budget)
        name = f"{method} @ {budget}" + (f" ({job.tag})" if job.tag else "")
        old = next((r for r in rows if _key(r) == (method, budget, job.tag)), None)
        if old is not None and old.get("settings") == settings and "error" not in old:
            ctx.log(f"[{i + 1}/{len(todo)}] {name}: kept from {out.with_suffix('.json').name} (same settings)")
            if job.lr_source is not None and old.get("lr_source") != job.lr_source:
                old["lr_source"] = job.lr_source  # the same learning rate, found again from another source
            if method == "dense":  # the reference the other rows are compared with
                if ctx.kind == "causal-lm":
                    ctx.reference["ppl"] = old["ppl"]
                    if old.get("ood_ppl") is not None:
                        ctx.reference["ood_ppl"] = old["ood_ppl"]
                else:
                    set_reference(ctx)
            continue
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        ctx.log(f"[{i + 1}/{len(todo)}] {name}: start (load average {load:.1f})")
        row = run_row(jctx, method, budget)
        if job.tag:
            row["tag"] = job.tag
        lr_field = METHODS[method].lr_field if method in METHODS else None
        if lr_field is not None:
            row.update(lr_field=lr_field, lr=getattr(jctx.S, lr_field), lr_source=job.lr_source or "settings")
        ctx.log(f"[{i + 1}/{len(todo)}] {name}: " + row_summary(row))
        if not meta or not meta.get("preset"):
            ctx.log(json.dumps({k: v for k, v in row.items() if k not in (
                "settings", "details", "split", "device_name", "commit", "machine_load")}))
        rows[:] = [r for r in rows if _key(r) != _key(row)] + [row]
        rows.sort(key=lambda r: (r["method"] != "dense", r["budget"],
                                 order.index(r["method"]) if r["method"] in order else len(order),
                                 r.get("lr") or 0.0, r.get("tag", "")))
        result["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_outputs(result, out, figure=figure_each)
    write_outputs(result, out)
    return result


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named run: its settings (and smoke settings), methods, and the learning-rate grid of --select-lr."""
    name: str
    model: str
    settings: Settings
    smoke: Settings
    methods: tuple[str, ...]
    lr_budget: float  # MLP budget of the LR selection
    lr_grid: dict  # method -> learning rates tried (of its Method.lr_field)
    about: dict = field(default_factory=dict)  # method -> its description in this preset's tables
    notes: tuple[str, ...] = ()


# the `fips demo` recipe (fips_rt/cli.py DEMO) at every budget, and its peers with the same data and training
_CPU = Settings(budgets=(0.5, 0.7, 0.9), calib_rows=32, seq_len=512, calib_batch=4, eval_windows=16, eval_seq_len=512,
                eval_batch=4, eval_ood="wordnet", group_size=4, square_u=True, refit="after", refit_rounds=2,
                selection="obs",
                steps=0, global_steps=60, distill_rows=1, distill_warmup=3, global_lr=1e-4, svd_lr=1e-4,
                heal_lr=1e-4, delta_lr=1e-3, delta_block_lr=1e-4)
PRESETS = {p.name: p for p in [Preset(
    name="cpu", model="smollm2", settings=_CPU,
    smoke=dataclasses.replace(_CPU, budgets=(0.5,), calib_rows=4, seq_len=128, calib_batch=2, eval_windows=2,
                              eval_seq_len=128, eval_batch=2, global_steps=2, distill_warmup=1),
    methods=("fips-global", "svd-global", "drop-heal", "deltallm"),
    lr_budget=0.7,
    lr_grid={"fips-global": (3e-5, 1e-4, 3e-4), "svd-global": (3e-5, 1e-4, 3e-4), "drop-heal": (3e-5, 1e-4, 3e-4, 1e-3),
             "deltallm": (3e-4, 1e-3, 3e-3)},
    about={"fips-global": "the `fips demo` recipe: groups of 4 consecutive MLPs share a dense U (whitened init), V's "
                          "sparsity per budget such that the rank equals d = 576 (U square; square_u_sparsity), "
                          "V's kept entries by second-order saliency (selection=obs), "
                          "closed-form refits of V and U in the whitened space (refit=after, 2 rounds, no local "
                          "AdamW steps), then the global distillation (fips_rt.fips.train_global: KL to the dense "
                          "logits; U, V and MLP biases trained)"},
    notes=("Equal data and training: every method calibrates on the same {calib_rows} x {seq_len} wiki-train rows "
           "and is then distilled for the same {global_steps} steps x {rows} row(s) x {seq_len} tokens drawn from "
           "them (KL to the dense model's logits, AdamW betas 0.9/0.95, linear warm-up, then cosine to 0), each at "
           "its own learning rate. fips-global and svd-global run fips_rt.fips.train_global (a random calibration "
           "batch, then {rows} random row(s) of it; warm-up global_steps // 20 = {warm} steps); deltallm and "
           "drop-heal run fips_rt.deltallm.distill_train ({rows} random row(s) of the {calib_rows}; warm-up "
           "distill_warmup = {distill_warmup} steps). What "
           "is trained differs by method: FiPS U, V and MLP biases; the SVD factors; DeltaLLM's deltas and every "
           "block parameter (train_scope=blocks, at delta_block_lr; progressive replacement; the followers are the blocks "
           "drop-heal would drop, started at the identity); every parameter of the blocks drop-heal keeps. deltallm and drop-heal run "
           "at the fips-global row's whole-model parameters (drop-heal: whole blocks, at or below it); svd-global "
           "at the same MLP budget (its per-linear rank floor(p d d_ff / (d + d_ff)) lands slightly below).",
           "Perplexity ratios are to the dense model on the same windows: the wiki articles and the WordNet "
           "glosses ({split} split / half), {eval_windows} windows x {eval_seq_len} tokens each, cut as `fips demo` "
           "cuts them (the test-split run uses exactly the demo's windows)."),
)]}


def grid_rows(ctx: Context, method: str, budget: float, rows: list[dict]) -> dict[float, dict]:
    """{lr: row} of ``method``'s finished LR-grid rows at ``budget`` that were made with ``ctx``'s settings on
    the validation split (each row's recorded settings equal what this run would record for it)."""
    f = METHODS[method].lr_field
    vctx = dataclasses.replace(ctx, split="validation")
    ok = {}
    for r in rows:
        if r["method"] != method or "error" in r or r.get("lr") is None or r["budget"] != budget or "ppl_ratio" not in r:
            continue
        sctx = dataclasses.replace(vctx, S=dataclasses.replace(ctx.S, **dict(lr_overrides(method, r["lr"]))))
        if r.get("settings") == row_settings(sctx, method, budget):
            ok[r["lr"]] = r
    return ok


def next_grid_lr(grid: list[float], ratios: dict[float, float], base: tuple[float, ...] | None = None,
                 max_extra: int = 2) -> float | None:
    """The learning rate to add to a grid whose best (lowest ratio) sits at an edge: one step beyond that edge,
    the step being the ratio between the edge and its neighbour (3e-4 after 3e-5, 1e-4; 1e-3 after 1e-4, 3e-4).
    None when the best is inside the grid, a grid LR has no ratio yet, the grid has fewer than two LRs, or
    ``max_extra`` LRs beyond ``base`` (the preset's own grid; None: ``grid``) were added already."""
    g = sorted(set(grid))
    extra = set(g) - set(g if base is None else base)
    if len(g) < 2 or any(lr not in ratios for lr in g) or len(extra) >= max_extra:
        return None
    best = min(g, key=lambda lr: ratios[lr])
    if best == g[0]:
        return float(f"{g[0] * g[0] / g[1]:.3g}")
    if best == g[-1]:
        return float(f"{g[-1] * g[-1] / g[-2]:.3g}")
    return None


def chosen_lrs(ctx: Context, preset: Preset, lr_path: Path, methods: list[str]) -> dict[str, dict]:
    """Per trained method, the learning rate of the test-split run and where it came from: the grid LR with
    the lowest wiki-validation ratio in ``lr_path`` once the method's whole grid is there (the grid the file
    records: the preset's, plus the LRs --select-lr added past an edge), made with this run's settings
    (``grid_rows``); else the setting's default."""
    data = json.loads(lr_path.read_text()) if lr_path.is_file() else None
    budget = (data or {}).get("lr_budget", preset.lr_budget)
    out = {}
    for m in methods:
        f = METHODS[m].lr_field
        if f is None:
            continue
        default = getattr(ctx.S, f)
        recorded = ((data or {}).get("lr_grid") or {}).get(m) or ()
        grid = tuple(sorted(set(preset.lr_grid.get(m, ())) | set(recorded)))
        ok = grid_rows(ctx, m, budget, (data or {}).get("rows", []))
        if data is None:
            src = f"the default (no {lr_path.name})"
        elif not grid or any(lr not in ok for lr in grid):
            src = (f"the default ({lr_path.name} has {sum(lr in ok for lr in grid)} of the {len(grid)} grid LRs "
                   f"made with these settings)")
        else:
            best = min((ok[lr] for lr in grid), key=lambda r: r["ppl_ratio"])
            out[m] = {"field": f, "lr": best["lr"], "source": (
                f"{lr_path.name}: lowest wiki-validation ratio at MLP budget {budget} among "
                + ", ".join(f"{lr:g} ({ok[lr]['ppl_ratio']:.3f}x)" for lr in grid))}
            continue
        out[m] = {"field": f, "lr": default, "source": src}
    return out


def preset_jobs(ctx: Context, preset: Preset, methods: list[str], budgets: list[float], select_lr: bool,
                lr_path: Path) -> tuple[list[Job], dict]:
    """The rows of a preset run, in order (budget by budget; --select-lr: method by method over its grid),
    and what the run records about its learning rates."""
    if select_lr:
        jobs, grids = [], {}
        for m in methods:
            f = METHODS[m].lr_field
            if f is None or m not in preset.lr_grid:
                continue
            grids[m] = list(preset.lr_grid[m])
            jobs += [Job(m, b, f"lr={lr:g}", lr_overrides(m, lr), "grid") for b in budgets for lr in preset.lr_grid[m]]
        return jobs, {"lr_budget": budgets[0], "lr_grid": grids}
    lrs = chosen_lrs(ctx, preset, lr_path, methods)
    jobs = [Job(m, b, "", lr_overrides(m, lrs[m]["lr"]) if m in lrs else (), lrs.get(m, {}).get("source"))
            for b in budgets for m in methods]
    return jobs, {"lr_selection": lrs}


def row_summary(row: dict) -> str:
    if "error" in row:
        return f"FAILED: {row['error']}"
    s = f"done in {row['seconds'] + row['eval_seconds']:.0f} s (build {row['seconds']:.0f}, eval {row['eval_seconds']:.0f})"
    if "ppl" in row:
        s += f"; params {row['model_budget']:.4f} of dense; ppl {row['ppl']:.2f} ({row['ppl_ratio']:.3f}x)"
        if "ood_ppl" in row:
            s += f", {row['ood_data']} {row['ood_ppl']:.2f} ({row['ood_ppl_ratio']:.3f}x)"
    elif "cosine_mean" in row:
        s += f"; cosine {row['cosine_mean']:.4f}, top-1 agreement {row['retrieval_agreement']:.3f}"
    return s


# --------------------------------------------------------------------------- reports
def _fmt(x, spec=".2f"):
    if x is None:
        return "—"
    if isinstance(x, float) and x >= 1e4 and spec.endswith("f"):
        return f"{x:,.0f}"
    return format(x, spec)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lm = any("ppl" in r for r in rows)
    m = result.get("machine", {})
    title = f"# Quality: {result['model']} ({result['split']} split)"
    lines = [title, "", f"Device: {result.get('device_name', '?')}; commit {m.get('commit', '?')}; "
             f"{result.get('finished', m.get('timestamp', ''))}.", ""]
    if result.get("smoke"):
        lines += ["Smoke settings (tiny calibration, few steps, few windows, CPU): these rows show that the harness "
                  "runs end to end; they say nothing about how the methods compare.", ""]
    data = result.get("data", {})
    if data:
        lines += ["Data: " + "; ".join(f"{k} {v}" for k, v in data.items()) + ".", ""]
    if lm:
        lines += ["| method | MLP budget | params / dense | params | MB | ppl | ppl / dense | compress s |",
                  "|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| method | MLP budget | params / dense | params | MB | cosine mean | cosine min | top-1 agreement "
                  "| retrieval acc. | compress s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['budget']} | failed: {r['error']} |")
            continue
        head = (f"| {r['method']} | {r['budget']} | {r['model_budget']:.4f} | {r['params']:,} | "
                f"{r['bytes'] / 1e6:.1f} |")
        if lm:
            lines.append(f"{head} {_fmt(r['ppl'])} | {_fmt(r['ppl_ratio'])}x | {r['seconds']:.0f} |")
        else:
            lines.append(f"{head} {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['retrieval_agreement']:.3f} | "
                         f"{r['retrieval_accuracy']:.3f} | {r['seconds']:.0f} |")
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] in METHODS))
    lines += ["", "Methods:"] + [f"- `{n}`: {METHODS[n].about}" for n in names]
    common = LM_COMMON if lm else ENC_COMMON
    used = ["budgets", *common] + [f for n in names for f in METHODS[n].fields]
    s = {k: v for k, v in result["settings"].items() if k in dict.fromkeys(used)}
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity ratio (log scale) vs parameters and vs stored bytes, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "ppl_ratio" in r]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "params", "parameters (millions)"), (axes[1], "bytes", "stored bytes (MB)")):
        scale = 1e6
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            pts = sorted((r[key] / scale, r["ppl_ratio"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense is not None:
            ax.plot([dense[key] / scale], [1.0], marker="*", markersize=12, color="black", linestyle="none",
                    label="dense")
        ax.set_yscale("log")  # x stays linear: the budgets span less than a factor of two
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity / dense perplexity")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{result['model']}: perplexity ratio vs parameters")
    axes[1].set_title(f"{result['model']}: perplexity ratio vs bytes")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_lr_rows(rows: list[dict]) -> dict[str, dict]:
    """Per method, its row with the lowest wiki perplexity ratio among the rows that carry an LR."""
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r or r.get("lr") is None or "ppl_ratio" not in r:
            continue
        if r["method"] not in best or r["ppl_ratio"] < best[r["method"]]["ppl_ratio"]:
            best[r["method"]] = r
    return best


def _ood_label(result: dict) -> str:
    ood = (result.get("settings") or {}).get("eval_ood") or "out-of-domain"
    return {"wordnet": "WordNet"}.get(ood, ood)


def _load_cell(r: dict) -> str:
    ml = r.get("machine_load") or {}
    a, b = ml.get("load_start"), ml.get("load_end")
    return "—" if a is None else f"{a:.1f} -> {b:.1f}"


def _others_cell(r: dict) -> str:
    ml = r.get("machine_load") or {}
    if "others_cpu_seconds" not in ml:
        return "—"
    top = ml.get("others_top") or []
    return f"{ml['others_cpu_seconds']:.0f} s" + (f": {', '.join(top)}" if top else "")


def markdown_cpu(result: dict) -> str:
    """The table of a ``--preset`` run: both perplexities and their ratios, the LR, time and machine load."""
    rows = result["rows"]
    m = result.get("machine", {})
    split, ood = result["split"], _ood_label(result)
    lr_run = bool(result.get("lr_grid"))
    title = f"# Quality on the CPU: {result['model']}, FiPS vs its peers at equal whole-model parameters"
    title += (f" -- learning-rate selection at MLP budget {result.get('lr_budget')} ({split} split)" if lr_run
              else f" ({split} split)")
    lines = [title, ""]
    if result.get("smoke"):
        lines += ["Smoke settings (tiny calibration, 2 steps, few windows): these rows show that the preset runs end "
                  "to end; they say nothing about how the methods compare.", ""]
    lines += [f"Command: `{result.get('command', '?')}`", "",
              f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} with "
              f"{m.get('torch_threads', '?')} threads; load average at the start "
              f"{_fmt(m.get('load_average_start'), '.1f')}; commit {m.get('commit', '?')}; started "
              f"{m.get('timestamp', '?')}, last row {result.get('finished', '?')}.", ""]
    data = result.get("data", {})
    if data:
        lines += ["Data: " + "; ".join(f"{k} {v}" for k, v in data.items()) + ".", ""]
    dense = next((r for r in rows if r["method"] == "dense" and "ppl" in r), None)
    if dense is not None:
        lines += [f"Dense perplexity: wiki {split} {dense['ppl']:.2f}, {ood} {split} {_fmt(dense.get('ood_ppl'))}.", ""]
    best = best_lr_rows(rows) if lr_run else {}
    lines += [f"| method | MLP budget | LR | params | params / dense | wiki {split} ppl | wiki ratio | {ood} ppl | "
              f"{ood} ratio | build s | eval s | load avg start -> end | other processes' CPU during the row |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "—" if r.get("lr") is None else f"{r['lr']:g}"
        if lr_run and best.get(r["method"]) is r:
            lr += " (best)"
        elif not lr_run and r.get("lr") is not None:
            src = str(r.get("lr_source") or "")
            lr += " (selected)" if "lowest" in src else " (default)"
        if "error" in r:
            lines.append(f"| {r['method']} | {r['budget']} | {lr} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['method']} | {r['budget']} | {lr} | {r['params']:,} | {r['model_budget']:.4f} | "
                     f"{_fmt(r.get('ppl'))} | {_fmt(r.get('ppl_ratio'), '.3f')} | {_fmt(r.get('ood_ppl'))} | "
                     f"{_fmt(r.get('ood_ppl_ratio'), '.3f')} | {r['seconds']:.0f} | {r.get('eval_seconds', 0):.0f} | "
                     f"{_load_cell(r)} | {_others_cell(r)} |")
    if lr_run:
        lines += ["", f"Best learning rate per method (lowest wiki {split} ratio; the test-split run "
                  f"`--preset {result.get('preset')}` takes these once a method's whole grid is here):"]
        for name, grid in (result.get("lr_grid") or {}).items():
            b = best.get(name)
            lines.append(f"- `{name}` ({METHODS[name].lr_field}; grid {', '.join(f'{x:g}' for x in grid)}): "
                         + (f"{b['lr']:g} (wiki {b['ppl_ratio']:.3f}x, {ood} {_fmt(b.get('ood_ppl_ratio'), '.3f')}x)"
                            if b else "not run yet"))
    elif result.get("lr_selection"):
        lines += ["", "Learning rates:"]
        for name, v in result["lr_selection"].items():
            lines.append(f"- `{name}`: {v['field']}={v['lr']:g}, from {v['source']}")
    sp = sorted({(r["budget"], r["details"]["sparsity"]) for r in rows
                 if r["method"].startswith("fips") and "sparsity" in (r.get("details") or {})})
    if sp:
        lines += ["", "FiPS V sparsity per MLP budget: " + ", ".join(f"{b} -> {s}" for b, s in sp) + "."]
    about = result.get("about") or {}
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] in METHODS))
    lines += ["", "Methods:"] + [f"- `{n}`: {about.get(n, METHODS[n].about)}" for n in names]
    if result.get("notes"):
        lines += [""] + [str(n) for n in result["notes"]]
    used = ["budgets", *LM_COMMON, "refit", "refit_rounds"] + [f for n in names for f in METHODS[n].fields]
    s = {k: v for k, v in result["settings"].items() if k in dict.fromkeys(used)}
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + "."]
    return "\n".join(lines) + "\n"


def plot_cpu(result: dict, path: Path) -> None:
    """Two panels (wiki, the out-of-domain text): perplexity ratio (log) vs whole-model parameters, one
    line per method; for an LR-selection file, vs the learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "ppl_ratio" in r]
    lr_run = bool(result.get("lr_grid"))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    split, ood = result["split"], _ood_label(result)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "ppl_ratio", f"wiki {split}"), (axes[1], "ood_ppl_ratio", f"{ood} {split}")):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            if lr_run:
                pts = sorted((r["lr"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None
                             and r.get("lr") is not None)
            else:
                pts = sorted((r["params"] / 1e6, r[key]) for r in rows if r["method"] == method
                             and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense is not None and not lr_run:
            ax.plot([dense["params"] / 1e6], [1.0], marker="*", markersize=12, color="black", linestyle="none",
                    label="dense")
        ax.set_yscale("log")
        if lr_run:
            ax.set_xscale("log")
        ax.set_xlabel("learning rate" if lr_run else "whole-model parameters (millions)")
        ax.set_ylabel("perplexity / dense perplexity")
        ax.set_title(f"{result['model']}: {label}" + (f", MLP budget {result.get('lr_budget')}" if lr_run else ""))
        ax.grid(True, which="both", alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_outputs(result: dict, out: Path, figure: bool = True) -> None:
    """JSON, markdown (and the PNG), each written to a temp file and renamed (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext, text in ((".json", json.dumps(result, indent=2)),
                      (".md", (markdown_cpu if result.get("preset") else markdown)(result))):
        tmp = out.with_name(out.name + ext + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(ext))
    if figure and any("ppl_ratio" in r for r in result["rows"]):
        (plot_cpu if result.get("preset") else plot)(result, out.with_suffix(".png"))


# --------------------------------------------------------------------------- data and machine
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def machine(device: torch.device) -> dict:
    from fips_rt.runtime.bench import machine_info  # one reader of the CPU model for all benchmarks
    cpu = machine_info()["cpu_model"]
    commit = git_commit()
    import transformers
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


_ABBREV = {"dr", "mr", "mrs", "ms", "st", "jr", "sr", "no", "vs", "mt", "ft", "co", "inc", "ltd", "gen", "col",
           "lt", "sgt", "prof", "rev", "gov", "sen", "rep", "est", "approx", "ca", "c", "b", "d", "fl"}


def first_sentence(text: str) -> tuple[str, str] | None:
    """(first sentence, rest) of a summary, or None when it has one sentence. Skips boundaries after
    abbreviations and initials (``Dr.``, ``J. R. R.``, ``U.S.``)."""
    text = text.strip()
    for m in re.finditer(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])", text):
        head = text[:m.end()].strip()
        word = re.split(r"[\s(]", text[:m.start()])[-1]
        if len(head) <= 10 or word.lower() in _ABBREV or len(word) == 1 or "." in word:
            continue
        rest = text[m.end():].strip()
        return (head, rest) if len(rest) > 10 else None
    return None


def retrieval_pairs(texts: list[str], n: int) -> tuple[list[str], list[str]]:
    """Query = first sentence of a summary, corpus entry = the rest of it (summaries of 2+ sentences)."""
    queries, corpus = [], []
    for t in texts:
        pair = first_sentence(t)
        if pair is not None:
            queries.append(pair[0])
            corpus.append(pair[1])
        if n and len(queries) >= n:
            break
    return queries, corpus


def load_context(name: str, S: Settings, split: str, device: torch.device, progress: bool, log) -> tuple[Context, dict]:
    from fips_rt.accounting import count_model
    from fips_rt.data import encoder_batches, lm_batches, sentences, wiki_articles
    from fips_rt.models import load_model
    t0 = time.time()
    base = load_model(MODELS[name])
    base.model.to(device)
    tok = base.tokenizer
    if base.kind == "causal-lm":
        calib = lm_batches(tok, "wiki", "train", S.calib_rows * S.seq_len, S.seq_len, S.calib_batch)
        windows = lm_batches(tok, "wiki", split, S.eval_windows * S.eval_seq_len, S.eval_seq_len, S.eval_batch)
        evaldata = {"windows": windows}
        data = {"calibration": f"{sum(b['input_ids'].numel() for b in calib)} wiki-train tokens "
                               f"({len(calib)} batches of {S.calib_batch} x {S.seq_len})",
                "evaluation": f"{sum(b['input_ids'].numel() for b in windows)} wiki-{split} tokens "
                              f"({sum(len(b['input_ids']) for b in windows)} windows x {S.eval_seq_len})"}
        if S.eval_ood:  # as `fips demo` evaluates it: fips_rt.data.lm_batches on that text's split half
            ood = lm_batches(tok, S.eval_ood, split, S.eval_windows * S.eval_seq_len, S.eval_seq_len, S.eval_batch)
            evaldata["ood_windows"] = ood
            data["out-of-domain evaluation"] = (f"{sum(b['input_ids'].numel() for b in ood)} {S.eval_ood}-{split} "
                                                f"tokens ({sum(len(b['input_ids']) for b in ood)} windows x "
                                                f"{S.eval_seq_len})")
        data["distillation per run"] = f"{S.global_steps} steps x {distill_rows(S)} rows x {S.seq_len} tokens"
    else:
        calib = encoder_batches(tok, sentences("wiki", "train", S.calib_sentences), S.max_len, S.calib_batch)
        texts = [t for _, t in wiki_articles(split)]
        queries, corpus = retrieval_pairs(texts, S.retrieval_articles)
        eval_texts = texts[:S.eval_sentences] if S.eval_sentences else texts
        evaldata = {k: encoder_batches(tok, v, S.max_len, 64) for k, v in
                    (("texts", eval_texts), ("queries", queries), ("corpus", corpus))}
        data = {"calibration": f"{len(calib)} batches of wiki-train summaries (max {S.max_len} tokens), "
                               f"{sum(int(b['attention_mask'].sum()) for b in calib)} tokens",
                "cosine": f"{len(eval_texts)} wiki-{split} summaries",
                "retrieval": f"{len(queries)} wiki-{split} articles (query: first sentence; corpus: the rest)"}
    ctx = Context(name, base, calib, evaldata, S, split, device, progress, log)
    ctx.dense = count_model(base.model, base.adapter)
    data["load seconds"] = round(time.time() - t0, 1)
    return ctx, data


# --------------------------------------------------------------------------- main
def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plot_only(paths: list[Path]) -> int:
    """Redraw the markdown (and PNG) of every existing JSON in ``paths``; runs nothing."""
    found = 0
    for out in paths:
        js = out.with_suffix(".json")
        if not js.is_file():
            _log(f"--plot-only: no {js}")
            continue
        write_outputs(json.loads(js.read_text()), out)
        _log(f"--plot-only: redrew {out}.md" + (" and .png" if out.with_suffix(".png").is_file() else ""))
        found += 1
    return 0 if found else 1


def run_preset(args, ap, command: str) -> int:
    """``--preset NAME``: the preset's settings (``--set`` overrides them), its methods (``--methods`` picks
    some), always resumed from its JSON; ``--select-lr`` runs the LR grid on the validation split."""
    from fips_rt.api import resolve_device
    P = PRESETS[args.preset]
    if args.split == "validation" and not args.select_lr:
        ap.error("--preset: the split follows --select-lr (validation) or not (test); drop --split")
    stem = f"quality_{P.model}_{P.name}" + ("_smoke" if args.smoke else "")
    out_dir = Path(args.out_dir)
    out = out_dir / (stem + ("_lr" if args.select_lr else ""))
    lr_path = out_dir / f"{stem}_lr.json"
    if args.plot_only:
        return plot_only([out])
    S = parse_set(P.smoke if args.smoke else P.settings, args.set)
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
    else:
        budgets = [P.lr_budget] if args.select_lr else list(S.budgets)
    if args.select_lr and len(budgets) != 1:
        ap.error("--select-lr chooses the learning rates at one MLP budget (--budgets B)")
    S = dataclasses.replace(S, budgets=tuple(budgets))
    methods = list(P.methods) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS or "causal-lm" not in METHODS[m].kinds]
    if bad:
        ap.error(f"--preset {P.name}: unknown or non-LM methods {bad}")
    device = resolve_device("cpu" if args.device == "auto" else args.device)
    split = "validation" if args.select_lr else "test"
    torch.manual_seed(S.seed)
    ctx, data = load_context(P.model, S, split, device, args.progress, _log)
    jobs, lr_meta = preset_jobs(ctx, P, methods, budgets, args.select_lr, lr_path)
    if args.select_lr and out.with_suffix(".json").is_file():  # grids of methods run before (--methods) stay listed
        before = json.loads(out.with_suffix(".json").read_text()).get("lr_grid") or {}
        lr_meta["lr_grid"] = {**{m: g for m, g in before.items() if m in METHODS}, **lr_meta["lr_grid"]}
    meta = {"preset": P.name, "command": command, "machine": machine(device), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "smoke": args.smoke, "methods": methods, "budgets": budgets, "data": data,
            "about": {m: P.about.get(m, METHODS[m].about) for m in methods},
            "notes": [n.format(**dataclasses.asdict(S), rows=distill_rows(S), warm=max(1, S.global_steps // 20),
                               split=split) for n in P.notes], **lr_meta}
    for m, v in lr_meta.get("lr_selection", {}).items():
        _log(f"{m}: {v['field']}={v['lr']:g} from {v['source']}")
    _log(f"preset {P.name}: {len(jobs)} rows + dense on {device} ({torch.get_num_threads()} torch threads); "
         f"writing {out}.* (rows already there with the same settings are kept)")
    result = run(ctx, methods, budgets, out, resume=True, meta=meta, jobs=jobs, figure_each=True)
    while args.select_lr:  # a best LR at the grid's edge: one more step past it, then look again
        added = []
        for m in methods:
            grid = lr_meta["lr_grid"].get(m)
            if not grid:
                continue
            ok = grid_rows(ctx, m, budgets[0], result["rows"])
            lr = next_grid_lr(grid, {k: r["ppl_ratio"] for k, r in ok.items()}, tuple(P.lr_grid.get(m, ())))
            if lr is not None:
                lr_meta["lr_grid"][m] = sorted(set(grid) | {lr})
                added.append(Job(m, budgets[0], f"lr={lr:g}", lr_overrides(m, lr), "grid (extended)"))
                _log(f"{m}: the best LR of {grid} is at the edge; adding {lr:g}")
        if not added:
            break
        jobs += added
        meta.update(lr_meta)
        result = run(ctx, methods, budgets, out, resume=True, meta=meta, jobs=jobs, figure_each=True)
    print(markdown_cpu(result), flush=True)
    return int(any("error" in r for r in result["rows"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=["smollm2", "minilm", "all"], default="all")
    ap.add_argument("--methods", default="all", help="comma list of " + ", ".join(METHODS) + " (default all; "
                    "methods a model does not support are skipped)")
    ap.add_argument("--budgets", default=None, help="MLP budgets, comma list (default 0.3,0.5,0.7,0.9; smoke 0.5)")
    ap.add_argument("--split", choices=["test", "validation"], default="test",
                    help="evaluation split: validation to choose settings, test to report")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present; --preset: cpu), cpu, cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (CPU, minutes); writes *_smoke.*")
    ap.add_argument("--resume", action="store_true", help="skip rows already in the output with identical settings")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a named run (cpu: SmolLM2-135M, the fips demo recipe vs its peers at MLP budgets 0.5, "
                         "0.7, 0.9 -> quality_smollm2_cpu.*); always resumes from its JSON")
    ap.add_argument("--select-lr", action="store_true",
                    help="with --preset: each trained method's LR grid on the validation split -> *_lr.*")
    ap.add_argument("--plot-only", action="store_true", help="redraw .md/.png from the JSON; runs nothing")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.select_lr and not args.preset:
        ap.error("--select-lr needs --preset")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import shlex
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.preset:
        return run_preset(args, ap, command.strip())
    from fips_rt.api import resolve_device
    names = ["smollm2", "minilm"] if args.model == "all" else [args.model]
    suffix = ("_smoke" if args.smoke else "") + ("_validation" if args.split == "validation" else "")
    if args.plot_only:
        return plot_only([Path(args.out_dir) / f"quality_{name}{suffix}" for name in names])
    device = resolve_device(args.device)
    wanted = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")

    status = 0
    for name in names:
        S = parse_set(DEFAULTS[(name, args.smoke)], args.set)
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(S.budgets)
        S = dataclasses.replace(S, budgets=tuple(budgets))
        out = Path(args.out_dir) / f"quality_{name}{suffix}"
        torch.manual_seed(S.seed)
        ctx, data = load_context(name, S, args.split, device, args.progress, _log)
        methods = [m for m in wanted if ctx.kind in METHODS[m].kinds]
        meta = {"machine": machine(device), "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                "smoke": args.smoke, "methods": methods, "budgets": budgets, "data": data}
        _log(f"{name}: {len(methods)} methods x {len(budgets)} budgets on {device}; writing {out}.*")
        result = run(ctx, methods, budgets, out, resume=args.resume, meta=meta)
        status |= int(any("error" in r for r in result["rows"]))
        print(markdown(result), flush=True)
        del ctx
        _free(device)
    return status


if __name__ == "__main__":
    sys.exit(main())
