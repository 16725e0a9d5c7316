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

Outputs (benchmarks/results/): quality_smollm2.{json,md,png}, quality_minilm.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import json
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
    # FiPS
    group_size: int = 4
    sparsity: float = 0.75
    ridge: float = 1e-2
    mask_every: int = 0  # steps between GMP mask updates; 0: the engine's default (about 10 over the ramp)
    # local error minimization (FiPS local/global and svd-local: equal training)
    steps: int = 600
    lr: float = 1e-3
    batch_tokens: int = 512
    # distillation (fips-global, deltallm, drop-heal: equal steps x calib_batch rows x seq_len tokens)
    global_steps: int = 300
    global_lr: float = 1e-4
    delta_lr: float = 1e-3
    heal_lr: float = 1e-4
    distill_warmup: int = 10
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
LM_COMMON = ("calib_rows", "seq_len", "calib_batch", "eval_windows", "eval_seq_len", "seed")
ENC_COMMON = ("calib_sentences", "max_len", "calib_batch", "eval_sentences", "retrieval_articles", "seed")


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
def fips_config(S: Settings, budget: float, local: bool = False, distill: bool = False):
    from fips_rt.config import FipsConfig
    # keep_teacher: every group is trained on the dense model's MLP I/O, however many calibration passes
    # the activations need (svd-local does the same), so all local-trained rows are teacher-forced alike.
    return FipsConfig(mlp_budget=budget, group_size=S.group_size, sparsity=S.sparsity, init="whitened",
                      ridge=S.ridge, steps=S.steps if local else 0, lr=S.lr, batch_tokens=S.batch_tokens,
                      mask_every=S.mask_every,
                      global_steps=S.global_steps if distill else 0, global_lr=S.global_lr,
                      global_batch=S.calib_batch, seed=S.seed, keep_teacher=True)


def fips_params(ctx: Context, budget: float) -> int:
    """Whole-model parameters of the FiPS rows at MLP budget ``budget`` (from the plan: dense U + kept V
    entries per group, MLP biases, everything outside the MLPs)."""
    from fips_rt.budget import kept_nnz
    from fips_rt.fips import plan_groups
    cfg = fips_config(ctx.S, budget)
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
                       batch=S.calib_batch, warmup=S.distill_warmup, save_every=0, seed=S.seed)


def build_fips(ctx: Context, budget: float, local: bool, distill: bool):
    from fips_rt.api import compress_
    lm = ctx.fresh()
    cfg = fips_config(ctx.S, budget, local, distill)
    rep = compress_(lm, cfg, ctx.calib, device=ctx.device, progress=ctx.progress, log=ctx.log)
    d = rep.details
    return lm.model, {"ranks": sorted({g["rank"] for g in d["groups"]}), "global": d.get("global", {}),
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
        groups = [p.layers for p in plan_groups(ctx.base.model, ctx.adapter, fips_config(S, budget))[0]]
        info["local"] = baselines.train_local_(lm.model, ctx.adapter, ctx.base.model, groups, ctx.calib,
                                               steps=S.steps, lr=S.lr, batch_tokens=S.batch_tokens, seed=S.seed,
                                               device=ctx.device, progress=ctx.progress)
    return lm.model, {k: v for k, v in info.items() if k != "seconds"}


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
                 batch_rows=S.calib_batch, warmup=S.distill_warmup, seed=S.seed, device=ctx.device,
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


LM_ONLY, BOTH = ("causal-lm",), ("causal-lm", "encoder")
FIPS_F = ("group_size", "sparsity", "ridge")
LOCAL_F = ("steps", "lr", "batch_tokens")  # + mask_every for FiPS (svd-local has no masks to update)
DISTILL_F = ("global_steps", "distill_warmup")
METHODS = {m.name: m for m in [
    Method("fips-init", BOTH, FIPS_F, lambda c, b: build_fips(c, b, False, False),
           lambda c, b: fips_config(c.S, b).to_dict(),
           "FiPS, activation-aware shared init only: groups of 4 MLPs share U, V 75% sparse, no training"),
    Method("fips-local", BOTH, FIPS_F + LOCAL_F + ("mask_every",), lambda c, b: build_fips(c, b, True, False),
           lambda c, b: fips_config(c.S, b, True).to_dict(),
           "FiPS + local error minimization (teacher-forced MLP MSE, GMP to the final sparsity)"),
    Method("fips-global", LM_ONLY, FIPS_F + LOCAL_F + DISTILL_F + ("mask_every", "global_lr"),
           lambda c, b: build_fips(c, b, True, True),
           lambda c, b: fips_config(c.S, b, True, True).to_dict(),
           "FiPS + local + global error minimization (KL distillation to the dense model; U, V, MLP biases)"),
    Method("svd", BOTH, ("ridge",), lambda c, b: build_lowrank(c, b, "per-linear", False), None,
           "SVD-LLM style: every MLP linear its own whitened truncated SVD, dense factors, "
           "rank floor(p d d_ff / (d + d_ff)); training-free"),
    Method("svd-local", BOTH, ("ridge", "group_size") + LOCAL_F,
           lambda c, b: build_lowrank(c, b, "per-linear", True), None,
           "svd + the same local error minimization as fips-local (same groups, steps, lr, tokens)"),
    Method("basis-sharing", BOTH, ("ridge", "share"), lambda c, b: build_lowrank(c, b, "basis-sharing", False),
           None,
           "Basis Sharing: gate and up bases whitened-SVD-shared by 2 adjacent layers, down per layer; "
           "training-free"),
    Method("deltallm", LM_ONLY, FIPS_F + DISTILL_F + ("delta_lr",), build_deltallm,
           lambda c, b: delta_config(c, b).to_dict(),
           "DeltaLLM: shared MLP weights + low-rank deltas, weighted init, progressive-replacement "
           "distillation; whole-model params = the FiPS row's"),
    Method("drop-heal", LM_ONLY, FIPS_F + DISTILL_F + ("heal_lr",), build_drop_heal, None,
           "ShortGPT block drop to the FiPS row's whole-model params, healed by the same distillation"),
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
        return {"ppl": ppl, "ppl_ratio": ppl / dense}
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


# --------------------------------------------------------------------------- rows, resume
def _jsonable(x):
    return json.loads(json.dumps(x))


def common_settings(ctx: Context) -> dict:
    names = LM_COMMON if ctx.kind == "causal-lm" else ENC_COMMON
    return _jsonable({"model": MODELS.get(ctx.name, ctx.name), "split": ctx.split, "device_type": ctx.device.type,
                      **{k: getattr(ctx.S, k) for k in names}})


def row_settings(ctx: Context, method: str, budget: float) -> dict:
    """What a row depends on: the common data settings, the method's fields and its config."""
    s = common_settings(ctx)
    if method != "dense":
        m = METHODS[method]
        s.update({k: getattr(ctx.S, k) for k in m.fields})
        if m.config is not None:
            s["config"] = m.config(ctx, budget)
    return _jsonable(s)


def run_row(ctx: Context, method: str, budget: float) -> dict:
    row = {"method": method, "budget": budget, "split": ctx.split, "device": str(ctx.device),
           "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU",
           "commit": git_commit(), "settings": row_settings(ctx, method, budget)}
    torch.manual_seed(ctx.S.seed)
    t0 = time.time()
    try:
        if method == "dense":
            model, details = ctx.base.model, {}
        else:
            model, details = METHODS[method].build(ctx, budget)
    except Exception as e:  # noqa: BLE001 - one failing method must not end a long run; the row says why
        ctx.log(f"{method} @ {budget}: FAILED: {type(e).__name__}: {e}")
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    row["seconds"] = time.time() - t0
    row.update(measure(ctx, model))
    t1 = time.time()
    row.update(set_reference(ctx) if method == "dense" else evaluate(ctx, model))
    row["eval_seconds"] = time.time() - t1
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


def run(ctx: Context, methods: list[str], budgets: list[float], out: Path, *, resume: bool = False,
        meta: dict | None = None) -> dict:
    """Dense row, then every (budget, method). Writes ``out`` (.json, .md, .png for LMs) after each row."""
    rows = load_rows(out.with_suffix(".json"), ctx) if resume else []
    order = ["dense"] + methods
    result = {"benchmark": "quality", "model": MODELS.get(ctx.name, ctx.name), "split": ctx.split,
              **(meta or {}), "settings": _jsonable(dataclasses.asdict(ctx.S)), "rows": rows}
    todo = [("dense", 1.0)] + [(m, b) for b in budgets for m in methods]
    for method, budget in todo:
        settings = row_settings(ctx, method, budget)
        old = next((r for r in rows if r["method"] == method and r["budget"] == budget), None)
        if old is not None and old.get("settings") == settings and "error" not in old:
            ctx.log(f"{method} @ {budget}: kept from {out.with_suffix('.json').name} (same settings)")
            if method == "dense":  # the reference the other rows are compared with
                if ctx.kind == "causal-lm":
                    ctx.reference["ppl"] = old["ppl"]
                else:
                    set_reference(ctx)
            continue
        ctx.log(f"{method} @ {budget}: running")
        row = run_row(ctx, method, budget)
        ctx.log(json.dumps({k: v for k, v in row.items()
                            if k not in ("settings", "details", "split", "device_name", "commit")}))
        rows[:] = [r for r in rows if not (r["method"] == method and r["budget"] == budget)] + [row]
        rows.sort(key=lambda r: (r["method"] != "dense", r["budget"],
                                 order.index(r["method"]) if r["method"] in order else len(order)))
        result["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_outputs(result, out, figure=False)
    write_outputs(result, out)
    return result


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


def write_outputs(result: dict, out: Path, figure: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(result))
    if figure and any("ppl_ratio" in r for r in result["rows"]):
        plot(result, out.with_suffix(".png"))


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
            "commit": commit, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
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
                              f"({sum(len(b['input_ids']) for b in windows)} windows x {S.eval_seq_len})",
                "distillation per run": f"{S.global_steps} steps x {S.calib_batch} rows x {S.seq_len} tokens"}
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
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=["smollm2", "minilm", "all"], default="all")
    ap.add_argument("--methods", default="all", help="comma list of " + ", ".join(METHODS) + " (default all; "
                    "methods a model does not support are skipped)")
    ap.add_argument("--budgets", default=None, help="MLP budgets, comma list (default 0.3,0.5,0.7,0.9; smoke 0.5)")
    ap.add_argument("--split", choices=["test", "validation"], default="test",
                    help="evaluation split: validation to choose settings, test to report")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (CPU, minutes); writes *_smoke.*")
    ap.add_argument("--resume", action="store_true", help="skip rows already in the output with identical settings")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fips_rt.api import resolve_device
    device = resolve_device(args.device)
    names = ["smollm2", "minilm"] if args.model == "all" else [args.model]
    wanted = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    status = 0
    for name in names:
        S = parse_set(DEFAULTS[(name, args.smoke)], args.set)
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(S.budgets)
        S = dataclasses.replace(S, budgets=tuple(budgets))
        suffix = ("_smoke" if args.smoke else "") + ("_validation" if args.split == "validation" else "")
        out = Path(args.out_dir) / f"quality_{name}{suffix}"
        torch.manual_seed(S.seed)
        ctx, data = load_context(name, S, args.split, device, args.progress, log)
        methods = [m for m in wanted if ctx.kind in METHODS[m].kinds]
        meta = {"machine": machine(device), "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                "smoke": args.smoke, "methods": methods, "budgets": budgets, "data": data}
        log(f"{name}: {len(methods)} methods x {len(budgets)} budgets on {device}; writing {out}.*")
        result = run(ctx, methods, budgets, out, resume=args.resume, meta=meta)
        status |= int(any("error" in r for r in result["rows"]))
        print(markdown(result), flush=True)
        del ctx
        _free(device)
    return status


if __name__ == "__main__":
    sys.exit(main())
