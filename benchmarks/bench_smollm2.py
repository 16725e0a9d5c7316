#!/usr/bin/env python
"""SmolLM2-135M: dense ONNX vs FiPS ONNX (mlp-budget 0.5), measured by ``fips bench`` in one run.

    python benchmarks/bench_smollm2.py                  # export (cached under runs/) + bench
    python benchmarks/bench_smollm2.py --force-export    # rebuild the checkpoint and both exports
    python benchmarks/bench_smollm2.py --work runs/bench_demo --name bench_smollm2_demo
        # any pair of exports: WORK/dense/model.onnx and WORK/fips/model.onnx (here the `fips demo`
        # checkpoint, exported with `fips export runs/demo/model.pt -o runs/bench_demo/fips/model.onnx
        # --last-logits-only --external-data`)

Steps:
Both are exported with external data (``model.onnx.data``): onnxruntime then maps the weights from the
file instead of parsing them out of the protobuf, which removes a ~100 MiB load-time transient from the
peak RSS (measured: peak 638 -> 543 MiB for the dense model) and lets processes share the pages.

1. export the dense model           -> runs/bench_smollm2/dense/model.onnx
2. FiPS-compress it (mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0: the whitened-SVD init with
   magnitude-pruned V, no fine-tuning; 4096 wiki calibration tokens), save the checkpoint
   -> runs/bench_smollm2/fips.pt, export it -> runs/bench_smollm2/fips/model.onnx
3. ``fips bench`` (python -m fips_rt.runtime.cli bench) on both, each in a fresh process, same options:
   -> benchmarks/results/bench_smollm2.{json,md,png}

The large files stay under runs/ (git-ignored). Export needs torch; the benchmark itself does not.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench_smollm2 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_exports(work: Path, force: bool) -> tuple[Path, Path]:
    dense_onnx = work / "dense" / "model.onnx"
    fips_onnx = work / "fips" / "model.onnx"
    ckpt = work / "fips.pt"
    if not force and dense_onnx.is_file() and fips_onnx.is_file():
        log(f"reusing {dense_onnx} and {fips_onnx}")
        return dense_onnx, fips_onnx
    import fips_rt
    from fips_rt.checkpoint import save_checkpoint
    from fips_rt.data import lm_batches
    from fips_rt.exporter import export

    dense_onnx.parent.mkdir(parents=True, exist_ok=True)
    fips_onnx.parent.mkdir(parents=True, exist_ok=True)
    log("loading smollm2-135m")
    os.environ.setdefault("TQDM_DISABLE", "1")
    lm = fips_rt.load_model("smollm2-135m")
    log("exporting the dense model")
    rep = export(lm, dense_onnx, dtype="fp32", last_logits_only=True, verify=True, external_data=True)
    log(rep.table() if hasattr(rep, "table") else str(rep))
    log("compressing (FiPS, mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0)")
    calib = lm_batches(lm.tokenizer, "wiki", "train", 4096, 512, 4)
    cfg = fips_rt.FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0)
    report = fips_rt.compress_(lm, cfg, calib, device="cpu")
    save_checkpoint(ckpt, lm, cfg.method, cfg.to_dict(), report.to_dict())
    log(f"exporting the FiPS model from {ckpt}")
    rep = export(str(ckpt), fips_onnx, dtype="fp32", last_logits_only=True, verify=True, external_data=True)
    log(rep.table() if hasattr(rep, "table") else str(rep))
    return dense_onnx, fips_onnx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_smollm2"), help="where the .onnx files go")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the reports go")
    ap.add_argument("--force-export", action="store_true")
    ap.add_argument("--prompt-lengths", default="1,64,512")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two models this many times")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--spinning", default="on", help="on (onnxruntime default) | off | auto")
    ap.add_argument("--name", default="bench_smollm2")
    a = ap.parse_args()

    dense_onnx, fips_onnx = build_exports(Path(a.work), a.force_export)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fips_rt.runtime.cli", "bench", str(fips_onnx), "--baseline", str(dense_onnx),
           "--json", str(res / f"{a.name}.json"), "--markdown", str(res / f"{a.name}.md"),
           "--plot", str(res / f"{a.name}.png"), "--prompt-lengths", a.prompt_lengths,
           "--decode-tokens", str(a.decode_tokens), "--decode-context", str(a.decode_context),
           "--repetitions", str(a.repetitions), "--warmup", str(a.warmup), "--kernel", a.kernel,
           "--spinning", a.spinning, "--rounds", str(a.rounds)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    log("running: " + " ".join(cmd))
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
