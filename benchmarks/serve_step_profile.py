"""Where the time of one batched decode step goes: onnxruntime's per-node profile of ``decode_batch``-shaped
calls (``B`` rows, one new token each, a left-padded past ``W`` positions wide), grouped by what the nodes do.

    python benchmarks/serve_step_profile.py --model /work/artifacts/serve/fips_idle --batch 1 16 --width 128
    # writes benchmarks/results/serve_step_profile.{json,md}

Groups: ``sparse MLP (transB=0)`` / ``sparse MLP (transB=1)`` (fips.SparseMatMul), ``basis / dense MLP``
(MatMul/Gemm nodes of ``.mlp``), ``attention projections`` (q/k/v/o Gemm), ``KV concat`` (the Concat of past
and new keys/values), ``attention core`` (the score and context MatMuls, Softmax, the Transpose of the keys),
``LM head``, ``other`` (norms, rotary, reshapes...). The step wall time is measured separately, without the
profiler, with the same session options as ``fips serve`` (2 threads, spinning on, prepacking off).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def group_of(name: str, op: str, args: dict) -> str:
    if op == "SparseMatMul":
        return "sparse MLP (transB=1)" if args.get("trans_b") else "sparse MLP (transB=0)"
    if "lm_head" in name:
        return "LM head"
    if ".mlp" in name and op in ("MatMul", "Gemm", "FusedMatMul"):
        return "basis / dense MLP"
    if op == "Gemm" or (op in ("MatMul", "FusedMatMul") and "proj" in name):
        return "attention projections"
    if op == "Concat" and re.search(r"layers\.\d+/Concat", name) and args.get("kv_concat"):
        return "KV concat"
    if op in ("MatMul", "FusedMatMul", "Softmax") or (op == "Transpose" and args.get("k_transpose")):
        return "attention core"
    return "other"


def kv_nodes(onnx_path: Path) -> tuple[set[str], set[str], set[str], set[str]]:
    """Names of the Concat nodes fed by a past input, the Transposes of their outputs, the LM-head node and
    the SparseMatMul nodes with transB = 1."""
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)
    past = {i.name for i in m.graph.input if i.name.startswith("past_key_values")}
    concat = {n.name for n in m.graph.node if n.op_type == "Concat" and any(x in past for x in n.input)}
    cat_out = {o for n in m.graph.node if n.name in concat for o in n.output}
    unsq = {o for n in m.graph.node if n.op_type == "Unsqueeze" and n.input[0] in cat_out for o in n.output}
    ktr = {n.name for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in (cat_out | unsq)}
    head = {n.name for n in m.graph.node if "logits" in n.output}
    trans = {n.name for n in m.graph.node if n.op_type == "SparseMatMul"
             and any(a.name == "transB" and a.i == 1 for a in n.attribute)}
    return concat, ktr, head, trans


def feeds_for(sess, batch: int, width: int, rng) -> dict:
    f = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            f[i.name] = rng.integers(0, 1000, size=(batch, 1)).astype(np.int64)
        elif i.name == "attention_mask":
            f[i.name] = np.ones((batch, width + 1), dtype=np.int64)
        elif i.name == "position_ids":
            f[i.name] = np.full((batch, 1), width, dtype=np.int64)
        else:
            heads, hd = i.shape[1], i.shape[3]
            f[i.name] = (rng.standard_normal((batch, heads, width, hd)) * 0.5).astype(np.float32)
    return f


def profile(model: Path, batch: int, width: int, threads: int, reps: int) -> dict:
    import onnxruntime as ort
    from fips_rt.runtime.session import resolve_model_path, session_options
    onnx_path, _ = resolve_model_path(model)
    concat, ktr, head, trans = kv_nodes(onnx_path)
    so, facts = session_options(threads=threads, kernel="auto", provider="cpu")
    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(sess, batch, width, rng)
    for _ in range(3):
        sess.run(None, feeds)
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        wall.append(time.perf_counter() - t0)
    del sess
    so, _ = session_options(threads=threads, kernel="auto", provider="cpu")
    tmp = tempfile.mkdtemp(prefix="fips-prof-")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, "p")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, feeds)
    for _ in range(reps):
        sess.run(None, feeds)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    per_group = defaultdict(float)
    per_op = defaultdict(float)
    runs = 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs += 1
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "?")
        g = ("LM head" if name in head else
             group_of(name, op, {"kv_concat": name in concat, "k_transpose": name in ktr, "trans_b": name in trans}))
        per_group[g] += ev["dur"]
        per_op[op] += ev["dur"]
    n = max(runs, 1)
    total = sum(per_group.values())
    return {"batch": batch, "width": width, "threads": threads, "kernel": facts["kernel"],
            "step_ms_median": statistics.median(wall) * 1e3, "step_ms_min": min(wall) * 1e3,
            "profiled_runs": runs, "node_ms_total": total / n / 1e3,
            "groups_ms": {k: v / n / 1e3 for k, v in sorted(per_group.items(), key=lambda kv: -kv[1])},
            "ops_ms": {k: v / n / 1e3 for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def to_markdown(res: dict) -> str:
    la = res["loadavg"]
    lines = [f"One batched decode step, per-node onnxruntime profile ({res['timestamp']}, {res['cpu']}, "
             f"{res['threads']} threads, past width {res['width']}; load average before/after "
             f"{la['before'][0]:.2f} / {la['after'][0]:.2f}). Node times are the profiler's per-node kernel "
             "times averaged over the profiled runs (with 2 threads a node's time is its wall time).", ""]
    if res.get("note"):
        lines += [f"Conditions: {res['note']}", ""]
    for label, runs in res["models"].items():
        groups = sorted({g for r in runs for g in r["groups_ms"]},
                        key=lambda g: -max(r["groups_ms"].get(g, 0) for r in runs))
        lines += [f"**{label}** (`{res['paths'][label]}`)", "",
                  "| group | " + " | ".join(f"B={r['batch']} ms (share)" for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for g in groups:
            cells = [f"{r['groups_ms'].get(g, 0):.2f} ({100 * r['groups_ms'].get(g, 0) / r['node_ms_total']:.0f}%)"
                     for r in runs]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("| sum of node times | " + " | ".join(f"{r['node_ms_total']:.2f}" for r in runs) + " |")
        lines.append("| step wall, no profiler (median) | " + " | ".join(f"{r['step_ms_median']:.2f}" for r in runs)
                     + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", help="label=PATH (repeatable)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_step_profile")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from fips_rt.runtime.bench import machine_info
    models = {}
    for spec in args.model or [Path("fips=/work/artifacts/serve/fips_idle"), Path("dense=/work/artifacts/serve/dense")]:
        label, _, path = str(spec).partition("=")
        models[label] = Path(path)
    res = {"schema": "fips-rt/serve-step-profile/1", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "cpu": machine_info().get("cpu_model"), "threads": args.threads, "width": args.width, "note": args.note,
           "loadavg": {"before": list(os.getloadavg())}, "paths": {k: str(v) for k, v in models.items()}, "models": {}}
    for label, path in models.items():
        res["models"][label] = [profile(path, b, args.width, args.threads, args.reps) for b in args.batch]
        for r in res["models"][label]:
            print(f"{label} B={r['batch']}: step {r['step_ms_median']:.1f} ms; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["groups_ms"].items()), file=sys.stderr, flush=True)
    res["loadavg"]["after"] = list(os.getloadavg())
    md = to_markdown(res)
    print(md)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
