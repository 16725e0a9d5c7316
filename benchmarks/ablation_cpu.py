"""FiPS quality levers on the CPU, one row per recipe: SmolLM2-135M, MLP budget 0.5 (issue 11).

Every row compresses the real SmolLM2-135M from the same 16,384 wiki-train calibration tokens (32 x 512)
and is judged on the wiki **validation** windows and on the out-of-domain WordNet glosses (validation
half; ``fips_rt.data.wordnet_glosses``), each against the dense model on the same windows. The test
splits are left for the final ``fips demo``. Rows are written to the JSON as each one finishes and the
script skips rows already there (end it at any time; rerun to continue).

    python benchmarks/ablation_cpu.py                       # every row not yet in the JSON
    python benchmarks/ablation_cpu.py --rows base,seq       # just these
    python benchmarks/ablation_cpu.py --list                # row names and settings
    python benchmarks/ablation_cpu.py --checkpoint base=/path/model.pt   # a row from an existing checkpoint
                                                                           # (made with that row's recipe)

Outputs: benchmarks/results/quality_ablation_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# the demo recipe before issue 11; every row changes only what it names
BASE = dict(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=80, lr=1e-3)
ROWS: dict[str, dict] = {
    "init-only": dict(steps=0),
    "base": dict(),  # the old demo: whitened init + 80 local AdamW steps per group (teacher forcing)
    "refit-init": dict(steps=0, refit="after", refit_rounds=1),  # closed-form V, U refits instead of SGD
    "refit-init-r0": dict(steps=0, refit="after", refit_ridge=0.0, refit_rounds=1),
    "refit-init-r1": dict(steps=0, refit="after", refit_ridge=1.0, refit_rounds=1),
    "seq": dict(sequential=True),
    "refit-after": dict(refit="after"),
    "refit-before": dict(refit="before"),
    "seq+refit-after": dict(sequential=True, refit="after"),
    "global30": dict(global_steps=30),
    "seq+refit-after+global30": dict(sequential=True, refit="after", global_steps=30),
    "steps120": dict(steps=120),
    # refit on the final mask right after init, then the local steps at that fixed mask (no GMP ramp)
    "refit-fixed-mask": dict(refit="before", initial_sparsity=0.75),
    "seq+refit-fixed-mask": dict(sequential=True, refit="before", initial_sparsity=0.75),
    # rank = d (U square, no zero columns at init) with V 53% sparse: the same parameter budget
    "r576-init": dict(steps=0, sparsity=0.5315),
    "r576-refit-init": dict(steps=0, sparsity=0.5315, refit="after", refit_rounds=1),
    "r576-seq-refit-init": dict(steps=0, sparsity=0.5315, refit="after", sequential=True, refit_rounds=1),
    "r576-refit-init-r0": dict(steps=0, sparsity=0.5315, refit="after", refit_ridge=0.0, refit_rounds=1),
    "r576-refit-init-r1": dict(steps=0, sparsity=0.5315, refit="after", refit_ridge=1.0, refit_rounds=1),
    "r576-refit-init-x2": dict(steps=0, sparsity=0.5315, refit="after", refit_rounds=2),
    # second-order selection: down_proj's entries ranked by OBS saliency (full input covariance)
    "r576-refit-init-x2-obs": dict(steps=0, sparsity=0.5315, refit="after", refit_rounds=2, selection="obs"),
    "r576-init-obs": dict(steps=0, sparsity=0.5315, selection="obs"),
    # fewer V positions (rank 384 < d, V 72% dense): the sparse kernel's decode cost follows positions
    "r384-refit-init-x2-obs": dict(steps=0, sparsity=0.2813, refit="after", refit_rounds=2, selection="obs"),
    "r576": dict(sparsity=0.5315),
    "r576+refit-after": dict(sparsity=0.5315, refit="after"),
    "r576+seq+refit-after": dict(sparsity=0.5315, sequential=True, refit="after"),
    "r576+seq+refit-both": dict(sparsity=0.5315, sequential=True, refit="both"),
    "r576+refit-both": dict(sparsity=0.5315, refit="both"),
}
# global error minimization (KL to the dense logits, fips_rt.fips.train_global) after the demo recipe
# (r576-refit-init-x2); with --start DEMO_CHECKPOINT these rows run only the global stage from it
DEMO_RECIPE = dict(steps=0, sparsity=0.5315, refit="after", refit_rounds=2)
GLOBAL_FIELDS = ("global_steps", "global_lr", "global_batch", "global_seq_len", "global_norms")
# 30 steps x one 512-token row: ~21 CPU-s per step here, ~6 min of the idle demo's 15 (docs/quality.md)
ROWS.update({
    "x2+kl10-lr3e-4": dict(DEMO_RECIPE, global_steps=10, global_lr=3e-4, global_batch=1),
    "x2+kl20-lr3e-4": dict(DEMO_RECIPE, global_steps=20, global_lr=3e-4, global_batch=1),
    "x2+kl30-lr1e-4": dict(DEMO_RECIPE, global_steps=30, global_lr=1e-4, global_batch=1),
    "x2+kl30-lr3e-4": dict(DEMO_RECIPE, global_steps=30, global_lr=3e-4, global_batch=1),
    "x2+kl30-lr3e-5": dict(DEMO_RECIPE, global_steps=30, global_lr=3e-5, global_batch=1),
    "x2+kl30-lr1e-4-norms": dict(DEMO_RECIPE, global_steps=30, global_lr=1e-4, global_batch=1, global_norms=True),
    "x2+kl60-lr1e-4": dict(DEMO_RECIPE, global_steps=60, global_lr=1e-4, global_batch=1),
    "x2+kl100-lr1e-4": dict(DEMO_RECIPE, global_steps=100, global_lr=1e-4, global_batch=1),
    "x2+kl60-lr1e-4-seq256": dict(DEMO_RECIPE, global_steps=60, global_lr=1e-4, global_batch=1, global_seq_len=256),
    # the demo since session 6: OBS selection + the refit + 60 global steps
    "x2-obs+kl60-lr1e-4": dict(DEMO_RECIPE, selection="obs", global_steps=60, global_lr=1e-4, global_batch=1),
})


def _settings(name: str) -> dict:
    return dict(BASE, **ROWS[name])


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": {}, "dense": {}}


def _write(path: Path, res: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)
    md = ["# FiPS levers on the CPU: SmolLM2-135M, MLP budget 0.5 (validation splits)", "",
          f"Calibration: {res.get('calibration')}. Evaluation: {res.get('evaluation')}.",
          f"Machine: {res.get('machine')}.", "",
          f"Dense perplexity: wiki validation {res['dense'].get('wiki', float('nan')):.2f}, "
          f"WordNet glosses (out-of-domain, validation half) {res['dense'].get('wordnet', float('nan')):.2f}.", "",
          "| row | changes from base | wiki val ppl | wiki ratio | OOD ppl | OOD ratio | compress s | "
          "global stage | ran with |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        g = "-"
        if r.get("global_seconds") is not None:
            g = (f"{r['global_seconds']:.0f} s wall, {r.get('global_cpu_seconds') or float('nan'):.0f} s CPU; "
                 f"KL {r.get('kl_first') or float('nan'):.3f} -> {r.get('kl_last') or float('nan'):.3f}"
                 + ("; from the demo checkpoint" if "global stage here" in str(r.get("source")) else ""))
        md.append(f"| {name} | {r['changes'] or '-'} | {r['wiki_ppl']:.2f} | {r['wiki_ratio']:.3f} | "
                  f"{r['ood_ppl']:.2f} | {r['ood_ratio']:.3f} | {r['seconds']:.0f} | {g} | {r.get('note') or '-'} |")
    md += ["", "Compress seconds are wall clock on a shared 2-core machine (other jobs in the last column), so "
           "they compare only roughly. Rows marked 'from the demo checkpoint' load the `fips demo` checkpoint "
           "(recipe r576-refit-init-x2, made on the idle machine in its compress seconds) and run only the global "
           "stage here; their compress seconds are that checkpoint's plus the global stage's wall time under "
           "load. CPU seconds (process time, both threads) compare across loads better than wall time: on the "
           "idle machine wall time is about CPU time / 1.8."]
    md += ["", "Base: " + ", ".join(f"{k}={v}" for k, v in BASE.items())
           + " (whitened init, GMP 50% -> 75%, teacher-forced MLP MSE, 512 tokens per step)."]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")


def _global_only(settings: dict, start: str) -> bool:
    """Whether a row is the --start checkpoint's recipe plus a global stage (then only that stage runs)."""
    from fips_rt.checkpoint import read_header
    from fips_rt.config import FipsConfig
    if not settings.get("global_steps"):
        return False
    base = FipsConfig().to_dict()
    made = FipsConfig.from_dict(read_header(start)["config"]).to_dict()  # fields it lacks: today's defaults
    want = FipsConfig(**settings).to_dict()
    same = all(made[k] == want[k] for k in base if k not in GLOBAL_FIELDS and k not in ("activation_memory_gb",))
    if not same or made.get("global_steps"):
        raise SystemExit(f"--start {start} was not made with this row's recipe (minus its global stage)")
    return True


def _global_from(start: str, settings: dict, dense, calib):
    """Load the --start checkpoint and run only the global distillation of ``settings`` on it."""
    import torch
    from fips_rt.checkpoint import load_checkpoint
    from fips_rt.config import FipsConfig
    from fips_rt.fips import train_global
    ck = load_checkpoint(start)
    made = json.loads(Path(start).with_suffix(".json").read_text()) if Path(start).with_suffix(".json").is_file() else {}
    torch.manual_seed(0)
    g = train_global(ck.model, dense.model, ck.adapter, calib, FipsConfig(**settings), torch.device("cpu"),
                     progress=True)
    base_s = float(made.get("seconds_compress") or "nan")
    extra = {"global_seconds": g["seconds"], "global_cpu_seconds": g["cpu_seconds"], "start_seconds": base_s, "kl_first": g["loss_first"],
             "kl_last": g["loss_last"], "trained_params": g["trained_params"]}
    return ck.model, base_s + g["seconds"], f"{start} + global stage here", extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quality_ablation_cpu.json"))
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token windows per domain")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default=None, help="what else ran on the machine (recorded)")
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH: a row from a checkpoint")
    ap.add_argument("--set", action="append", default=[], help="NAME:key=value, an extra setting for a row "
                    "(a new row name: NAME is created from base)")
    ap.add_argument("--redo", action="store_true", help="recompute the rows named in --rows")
    ap.add_argument("--md-only", action="store_true", help="rewrite the markdown from the JSON and stop")
    ap.add_argument("--start", default=None, help="a checkpoint of the demo recipe (r576-refit-init-x2, e.g. "
                    "`fips demo`'s model.pt): rows that differ from it only in global_* settings load it and run "
                    "only the global distillation (compress seconds = its seconds + the distillation's)")
    args = ap.parse_args()
    for item in args.set:
        name, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        ROWS.setdefault(name, {})[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    if args.md_only:
        _write(Path(args.out), _load(Path(args.out)))
        return
    if args.list:
        for n in ROWS:
            print(n, _settings(n))
        return
    import torch
    torch.set_num_threads(args.threads)
    from fips_rt.checkpoint import load_checkpoint, read_header
    from fips_rt.config import FipsConfig
    from fips_rt.data import lm_batches
    from fips_rt.evaluate import perplexity
    from fips_rt.fips import compress_fips
    from fips_rt.models import load_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _load(out)
    res.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{args.threads} threads", note=args.note or res.get("note"))
    if res.get("eval_windows", args.eval_windows) != args.eval_windows:
        raise SystemExit(f"{out} was measured on {res['eval_windows']} windows per domain; pass --eval-windows "
                         f"{res['eval_windows']} or another --out")
    res["eval_windows"] = args.eval_windows
    ckpts = dict(c.split("=", 1) for c in args.checkpoint)
    names = args.rows.split(",") if args.rows else list(ROWS)
    todo = [n for n in names if args.redo or n not in res["rows"]]
    if not todo:
        print("nothing to do")
        return
    dense = load_model("smollm2-135m")
    tok = dense.tokenizer
    calib = lm_batches(tok, "wiki", "train", args.calib_tokens, 512, 4)
    evals = {"wiki": lm_batches(tok, "wiki", "validation", args.eval_windows * 512, 512, 4),
             "wordnet": lm_batches(tok, "wordnet", "validation", args.eval_windows * 512, 512, 4)}
    res["calibration"] = f"{sum(b['input_ids'].numel() for b in calib)} wiki-train tokens (512-token rows)"
    res["evaluation"] = (f"{args.eval_windows} x 512 wiki-validation tokens; {args.eval_windows} x 512 tokens of "
                         "WordNet glosses, validation half")
    for k, b in evals.items():
        if k not in res["dense"]:
            res["dense"][k] = perplexity(dense.model, b)["ppl"]
    _write(out, res)
    for name in todo:
        settings = _settings(name)
        t0 = time.time()
        row_extra: dict = {}
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        start_from = args.start and _global_only(settings, args.start)
        if start_from:
            model, seconds, source, extra = _global_from(args.start, settings, dense, calib)
            row_extra = extra
        elif name in ckpts:
            model = load_checkpoint(ckpts[name]).model
            summ = Path(ckpts[name]).with_suffix(".json")  # what `fips demo` writes next to its checkpoint
            seconds = float(json.loads(summ.read_text()).get("seconds_compress") or "nan") if summ.is_file() \
                else float("nan")
            source = ckpts[name]
            g = (read_header(ckpts[name]).get("report") or {}).get("global") or {}
            if g.get("seconds") is not None:
                row_extra = {"global_seconds": g["seconds"], "global_cpu_seconds": g.get("cpu_seconds"),
                             "kl_first": g.get("loss_first"), "kl_last": g.get("loss_last"),
                             "trained_params": g.get("trained_params")}
        else:
            lm = load_model("smollm2-135m")
            torch.manual_seed(0)
            cfg = FipsConfig(**settings)
            rep = compress_fips(lm.model, lm.adapter, cfg, calib, device=torch.device("cpu"), progress=True,
                                log=print)
            model, seconds, source = lm.model, rep["seconds"], "compressed here"
            if rep.get("global"):
                row_extra = {"global_seconds": rep["global"].get("seconds"), "kl_first": rep["global"].get("loss_first"),
                             "kl_last": rep["global"].get("loss_last")}
        model.eval()
        ppl = {k: perplexity(model, b)["ppl"] for k, b in evals.items()}
        row = {"changes": ", ".join(f"{k}={v}" for k, v in ROWS[name].items()), "settings": settings,
               "wiki_ppl": ppl["wiki"], "wiki_ratio": ppl["wiki"] / res["dense"]["wiki"],
               "ood_ppl": ppl["wordnet"], "ood_ratio": ppl["wordnet"] / res["dense"]["wordnet"],
               "seconds": seconds, "eval_seconds": time.time() - t0 - (seconds if source == "compressed here" else 0),
               "started": started, "source": source, "note": args.note, **row_extra}
        if row_extra.get("global_seconds") is not None:
            row["eval_seconds"] = None  # the global stage's time is inside "seconds"; eval time not split out
        res["rows"][name] = row
        _write(out, res)
        print(f"{name}: wiki {row['wiki_ratio']:.3f}x  ood {row['ood_ratio']:.3f}x  {seconds:.0f} s", flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
