"""Peak RSS of SmolLM2-135M in onnxruntime: dense export vs FiPS export (function-body path, no native kernel).

    python benchmarks/export_memory.py [--tokens 512] [--threads 2] [--repeats 3] [--out benchmarks/results]

Both files are exported with ``last_logits_only`` and measured with the same session options
(intra_op_num_threads=2, session.disable_prepacking=1), each in a fresh process, ``--repeats`` times
(raw samples kept): peak RSS minus RSS before session creation, during a prefill of 512 tokens.
Each model is measured twice: weights inside the .onnx (the default layout below 2 GB; the peak
then comes from session creation, which copies the tensors) and as external data (mapped by
onnxruntime: the peak comes from the prefill). The pass/fail ratio is the default layout's.
FiPS: ``fips_rt.compress_`` with FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0,
init="svd") when the engine is available, else the exporter's synthetic FiPS of the same shapes.
Writes ``export_memory.json`` (one schema) and ``export_memory.md`` (rendered from it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MiB = 2 ** 20


def machine() -> dict:
    """The record's machine block, from ``fips_rt.runtime.bench`` (one reader of the CPU and git for all benchmarks)."""
    from fips_rt.runtime.bench import git_info, machine_info
    m = machine_info()
    commit, _ = git_info(Path(__file__).parent)
    return {"python": m["python"], "platform": m["platform"], "cpus": m["logical_cpus"],
            "onnxruntime": m.get("onnxruntime"), "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
            "cpu": m["cpu_model"], "mem_total_gib": round(m["mem_total_mb"] / 1024, 1) if m.get("mem_total_mb") else None,
            "commit": commit[:7] if commit else None}


def build(tmp: Path, log) -> dict:
    from fips_rt.exporter import export
    from fips_rt.models import load_model
    lm = load_model("smollm2-135m")
    for name in ("dense", "fips", "dense_ext", "fips_ext"):
        (tmp / name).mkdir()
    dense = export(lm, tmp / "dense" / "model.onnx", last_logits_only=True, verify=False)
    dense_ext = export(lm, tmp / "dense_ext" / "model.onnx", last_logits_only=True, verify=False, external_data=True)
    log(f"dense export: {dense.file_bytes / 1e6:.1f} MB")
    how = "fips_rt.compress_(FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0, init='svd'))"
    try:
        from fips_rt import FipsConfig, compress_
        compress_(lm, FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0, init="svd"), device="cpu",
                  log=lambda *a: None)
    except Exception as e:  # noqa: BLE001 - the engine may be absent or changing: fall back, say so
        from fips_rt.exporter.synthetic import fipsify_
        fipsify_(lm, group_size=4, mlp_budget=0.5, sparsity=0.75)
        how = f"exporter.synthetic.fipsify_ (compress_ unavailable: {type(e).__name__})"
    fips = export(lm, tmp / "fips" / "model.onnx", last_logits_only=True, verify=False)
    fips_ext = export(lm, tmp / "fips_ext" / "model.onnx", last_logits_only=True, verify=False, external_data=True)
    log(f"FiPS export: {fips.file_bytes / 1e6:.1f} MB ({how})")
    return {"dense": dense, "fips": fips, "dense_ext": dense_ext, "fips_ext": fips_ext, "fips_source": how}


def summarize(samples: list[dict]) -> dict:
    peaks = [s["peak_delta"] / MiB for s in samples]
    loads = [s["load_delta"] / MiB for s in samples]
    runs = [s["run_s"][0] for s in samples]
    return {"peak_delta_mib_mean": statistics.mean(peaks), "peak_delta_mib_std": statistics.pstdev(peaks),
            "load_delta_mib_mean": statistics.mean(loads), "prefill_s_mean": statistics.mean(runs),
            "prefill_s_std": statistics.pstdev(runs)}


def render_md(res: dict) -> str:
    m, rows = res["machine"], []
    for name in ("dense", "fips", "dense_ext", "fips_ext"):
        r = res["models"][name]
        s = r["summary"]
        rows.append(f"| {name} | {r['file_mb']:.1f} | {r['mlp_mb']:.1f} | {s['load_delta_mib_mean']:.1f} | "
                    f"{s['peak_delta_mib_mean']:.1f} ± {s['peak_delta_mib_std']:.1f} | "
                    f"{s['prefill_s_mean']:.2f} ± {s['prefill_s_std']:.2f} |")
    return "\n".join([
        "# Export memory: SmolLM2-135M, dense vs FiPS (onnxruntime, function-body SparseMatMul)", "",
        f"{res['timestamp']} · commit {m.get('commit')} · {m.get('cpu')} · {m.get('cpus')} CPUs · "
        f"{m.get('mem_total_gib')} GiB · onnxruntime {m.get('onnxruntime')} · Python {m.get('python')}", "",
        f"Session: intra_op_num_threads={res['threads']}, session.disable_prepacking=1; fresh process per sample; "
        f"prefill {res['tokens']} tokens, last-position logits; {res['repeats']} samples each. "
        f"FiPS model: {res['fips_source']}.", "",
        "| model | file MB | MLP MB | RSS after load − before (MiB) | peak RSS − before (MiB) | prefill s |",
        "|---|---|---|---|---|---|", *rows, "",
        f"- MLP bytes FiPS / dense: **{res['ratios']['mlp_bytes']:.3f}**",
        f"- file FiPS / dense: **{res['ratios']['file_bytes']:.3f}**",
        f"- peak RSS delta FiPS / dense: **{res['ratios']['peak_rss_delta']:.3f}** (target <= 0.80)",
        f"- RSS after load FiPS / dense: {res['ratios']['load_rss_delta']:.3f}",
        f"- peak RSS delta FiPS / dense, external data: {res['ratios']['peak_rss_delta_external']:.3f}", "",
        "`_ext`: the same models with their weights as external data (mapped, not copied, at load).", ""])


def main(argv=None) -> int:
    from fips_rt.exporter.memory import measure_session_rss
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp), log)
        models = {}
        for name in ("dense", "fips", "dense_ext", "fips_ext"):
            rep = built[name]
            measure_session_rss(rep.output, tokens=a.tokens, threads=a.threads)  # warm-up (page cache)
            samples = [measure_session_rss(rep.output, tokens=a.tokens, threads=a.threads) for _ in range(a.repeats)]
            models[name] = {"file_mb": rep.file_bytes / 1e6, "mlp_mb": rep.mlp_bytes / 1e6,
                            "initializer_bytes": rep.initializer_bytes, "bytes_by_tag": rep.bytes_by_tag,
                            "samples": samples, "summary": summarize(samples)}
            log(f"{name}: peak delta {models[name]['summary']['peak_delta_mib_mean']:.1f} MiB")
    d, f = models["dense"], models["fips"]
    de, fe = models["dense_ext"], models["fips_ext"]
    res = {"benchmark": "export_memory", "schema": 1, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
           "machine": machine(), "tokens": a.tokens, "threads": a.threads, "repeats": a.repeats,
           "fips_source": built["fips_source"], "models": models,
           "ratios": {"mlp_bytes": f["mlp_mb"] / d["mlp_mb"], "file_bytes": f["file_mb"] / d["file_mb"],
                      "peak_rss_delta": f["summary"]["peak_delta_mib_mean"] / d["summary"]["peak_delta_mib_mean"],
                      "load_rss_delta": f["summary"]["load_delta_mib_mean"] / d["summary"]["load_delta_mib_mean"],
                      "peak_rss_delta_external": fe["summary"]["peak_delta_mib_mean"]
                      / de["summary"]["peak_delta_mib_mean"]},
           "seconds": round(time.time() - t0, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_memory.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "export_memory.md").write_text(render_md(res))
    print(render_md(res))
    return 0 if res["ratios"]["peak_rss_delta"] <= 0.80 else 1


if __name__ == "__main__":
    sys.exit(main())
