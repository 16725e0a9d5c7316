"""Perplexity of what is deployed: the exported ONNX file in onnxruntime vs the PyTorch model it came from.

    python benchmarks/eval_onnx.py [--checkpoint fips-demo/model.pt] [--data wiki] [--split test]
                                   [--eval-tokens 8192] [--seq-len 512] [--out benchmarks/results]

Exports the dense SmolLM2-135M and (with --checkpoint) a fips-rt checkpoint to ONNX (fp32, full logits),
then computes, on the very same token windows (``fips_rt.data.window_ids``): PyTorch perplexity of each
(``fips eval`` of the model / the checkpoint) and onnxruntime perplexity of each export (``fips eval
MODEL.onnx``, native kernel when it builds). Reports each ONNX/PyTorch ratio (the export contract's
promise: within 0.1%) and the compressed/dense ratio on both sides. Writes eval_onnx.json + .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    from fips_rt.runtime.bench import git_info, machine_info
    m = machine_info()
    commit, dirty = git_info(Path(__file__).parent)
    return {"cpu": m["cpu_model"], "cpus": m["logical_cpus"], "python": m["python"], "platform": m["platform"],
            "onnxruntime": m.get("onnxruntime"), "commit": commit[:7] if commit else None, "dirty": dirty,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a fips-rt model.pt to export and evaluate beside dense")
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--split", default="test")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="eval_onnx")
    a = ap.parse_args()

    import torch
    torch.set_num_threads(2)
    from fips_rt import evaluate as E
    from fips_rt.checkpoint import load_checkpoint
    from fips_rt.data import lm_batches
    from fips_rt.exporter import export
    from fips_rt.models import load_model
    from fips_rt.runtime import Model
    from fips_rt.runtime.evaluate import lm_windows, perplexity

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    models = [("dense", lambda: load_model("smollm2-135m"))]
    if a.checkpoint:
        models.append(("compressed", lambda: load_checkpoint(a.checkpoint)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for role, loader in models:
            lm = loader()
            t0 = time.perf_counter()
            ref = E.perplexity(lm.model, lm_batches(lm.tokenizer, a.data, a.split, a.eval_tokens, a.seq_len))
            t_pt = time.perf_counter() - t0
            log(f"{role}: PyTorch ppl {ref['ppl']:.4f} ({t_pt:.0f} s)")
            out = Path(tmp) / role / "model.onnx"
            out.parent.mkdir()
            rep = export(lm, out, verify=False)
            del lm
            m = Model.load(out.parent, threads=2)
            wins = lm_windows(m.tokenizer, a.data, a.split, a.eval_tokens, a.seq_len)
            got = perplexity(m, wins)
            log(f"{role}: ONNX ppl {got['ppl']:.4f} ({got['seconds']:.0f} s, kernel {m.info.kernel})")
            rows.append({"model": role, "source": "smollm2-135m" if role == "dense" else a.checkpoint,
                         "ppl_pytorch": ref["ppl"], "ppl_onnx": got["ppl"], "onnx_over_pytorch": got["ppl"] / ref["ppl"],
                         "tokens": got["tokens"], "tokens_pytorch": ref["tokens"], "kernel": m.info.kernel,
                         "onnx_bytes": rep.file_bytes, "seconds_pytorch": round(t_pt, 1),
                         "seconds_onnx": got["seconds"]})
            del m
    result = {"benchmark": "eval_onnx", "data": a.data, "split": a.split, "eval_tokens": a.eval_tokens,
              "seq_len": a.seq_len, "machine": machine(), "rows": rows,
              "command": "python benchmarks/eval_onnx.py " + " ".join(sys.argv[1:])}
    if len(rows) == 2:
        result["ratio_pytorch"] = rows[1]["ppl_pytorch"] / rows[0]["ppl_pytorch"]
        result["ratio_onnx"] = rows[1]["ppl_onnx"] / rows[0]["ppl_onnx"]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Perplexity of the deployed file ({a.data} {a.split}, {rows[0]['tokens']:,} scored tokens)", "",
          f"Machine: {result['machine']['cpu']} ({result['machine']['cpus']} CPUs), onnxruntime "
          f"{result['machine']['onnxruntime']}, commit {result['machine']['commit']}. Command: `{result['command']}`", "",
          "| model | PyTorch ppl | ONNX ppl | ONNX / PyTorch | kernel | ONNX MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['ppl_pytorch']:.4f} | {r['ppl_onnx']:.4f} | {r['onnx_over_pytorch']:.5f} | "
                  f"{r['kernel']} | {r['onnx_bytes'] / 1e6:.1f} |")
    if "ratio_onnx" in result:
        md += ["", f"compressed / dense: PyTorch {result['ratio_pytorch']:.4f}, ONNX {result['ratio_onnx']:.4f}"]
    (out_dir / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
