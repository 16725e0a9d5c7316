"""How fast could a FiPS int8 decode step be? The measured export against the dense int8 export and against an
*ideal-kernel bound* of the same FiPS file, side by side in one run (issue 12's decode line).

The bound is the FiPS int8 file with every ``fips.QSparseMatMul`` replaced by onnxruntime's own int8 GEMV
(``MatMulNBits``, 8 bits, block 32, accuracy_level 4, prepacking on: the dense export's kernel) over a dense
matrix holding just the factor's kept-entry count (K' = kept / N rounded up to 32, fed by a ``Slice`` of the
input to K'): what FiPS would decode at if its sparse V cost no more than onnxruntime's int8 kernel on a dense
matrix of the kept values alone -- a free bitmask, no expansion, the best-tuned int8 kernel there is. Its
basis products (x·U, t·Uᵀ) and everything outside the MLPs are the FiPS file's own. Its outputs are
meaningless (random weights); only its time is used. The ``Slice`` nodes are the bound's own artefact: their
profiled time is reported and subtracted ("bound - slices"). A second derived file, ``V free``, gives every V a
32-wide product instead (K' = 32): the time of everything else in the FiPS file, so that ``0.95 x dense - V free``
is the time the sparse V may take for the acceptance's 0.95x.

    flock /tmp/fips-timing.lock .venv/bin/python benchmarks/decode_bound.py \\
        --fips FIPS_INT8_DIR --dense DENSE_INT8_DIR --out benchmarks/results/decode_bound

FIPS_INT8_DIR = ``fips export fips-demo/model.pt --weights int8``; DENSE_INT8_DIR = ``fips export
smollm2-135m --weights int8`` (same treatment of every non-MLP weight). Timing: one decode step (batch 1,
one new token, a 64-position past), the four sessions in one process, interleaved rounds, at 1 and 2
threads (spinning on, prepacking on as the files' contracts ask); then one profiled session per model for
the per-node breakdown (onnxruntime's profiler: node times, not wall).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def bound_model(fips_onnx: Path, out: Path, free: bool = False) -> dict:
    """Write the ideal-kernel bound of ``fips_onnx`` to ``out`` (``free``: every V a 32-wide product instead, what
    the rest of the FiPS file costs); returns the factors' kept and position counts."""
    import onnx
    from onnx import helper, numpy_helper as nh
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m = onnx.load(str(fips_onnx))
    inits = {i.name: i for i in m.graph.initializer}
    rng = np.random.default_rng(0)
    nodes, drop, kept, positions, kprime = [], set(), 0, 0, 0
    for n in m.graph.node:
        if n.op_type != "QSparseMatMul":
            nodes.append(n)
            continue
        at = {a.name: a.i for a in n.attribute}
        rows, cols, tb = at["rows"], at["cols"], at["transB"]
        mask = nh.to_array(inits[n.input[3]])
        nnz = int(np.unpackbits(mask, count=rows * cols, bitorder="little").sum())
        n_out = rows if tb else cols
        kp = 32 if free else max(32, int(np.ceil(nnz / n_out / 32)) * 32)
        kept, positions, kprime = kept + nnz, positions + rows * cols, kprime + kp * n_out
        st, en, ax, w = (f"{n.name}.bound.{s}" for s in ("start", "end", "axis", "W"))
        m.graph.initializer.extend([nh.from_array(np.array([0], np.int64), st),
                                    nh.from_array(np.array([kp], np.int64), en),
                                    nh.from_array(np.array([-1], np.int64), ax),
                                    nh.from_array((rng.standard_normal((kp, n_out)) * 0.02).astype(np.float32), w)])
        nodes.append(helper.make_node("Slice", [n.input[0], st, en, ax], [f"{n.name}.bound.sliced"],
                                      name=f"{n.name}/BoundSlice"))
        nodes.append(helper.make_node("MatMul", [f"{n.name}.bound.sliced", w], list(n.output),
                                      name=f"{n.name}/BoundMatMul"))
        drop.update(n.input[1:4])
    if not positions:
        raise SystemExit(f"error: {fips_onnx} has no fips.QSparseMatMul node (not a FiPS --weights int8 export)")
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [i for i in m.graph.initializer if i.name not in drop]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(m, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                             nodes_to_include=[n.name for n in nodes if n.name.endswith("/BoundMatMul")])
    q.process()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    onnx.save(q.model.model, str(tmp))
    os.replace(tmp, out)
    return {"kept": kept, "positions": positions, "density": kept / positions, "bound_matrix_entries": kprime}


def group_of(name: str, op: str) -> str:
    if op == "QSparseMatMul":
        return "sparse V (fips.QSparseMatMul)"
    if "/BoundSlice" in name:
        return "bound Slice (artefact)"
    if "/BoundMatMul" in name:  # MatMulNBitsQuantizer suffixes the node's name
        return "sparse V (bound: MatMulNBits of the kept count)"
    if ".mlp" in name and op == "MatMulNBits":
        return "MLP MatMulNBits (dense W / FiPS basis x·U, t·Uᵀ)"
    if ".mlp" in name:
        return "MLP other (activation, product)"
    return "outside the MLPs"


def session(path: Path, threads: int, profile_dir: str | None = None):
    import onnxruntime as ort
    from fips_rt.runtime.session import session_options
    so, facts = session_options(threads=threads, kernel="auto", provider="cpu", prepacking=True)
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, path.parent.name)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), facts


def timing(models: dict[str, Path], threads: int, rounds: int, steps: int, width: int) -> dict:
    from serve_step_profile import feeds_for
    sess = {k: session(p, threads)[0] for k, p in models.items()}
    feeds = {k: feeds_for(s, 1, width, np.random.default_rng(0)) for k, s in sess.items()}
    for k, s in sess.items():
        for _ in range(5):
            s.run(None, feeds[k])
    per = defaultdict(list)
    for _ in range(rounds):
        for k, s in sess.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                per[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50_ms": statistics.median(v), "p95_ms": float(np.percentile(v, 95)), "n": len(v)}
            for k, v in per.items()}


def profile(path: Path, threads: int, runs: int, width: int) -> dict:
    from serve_step_profile import feeds_for
    tmp = tempfile.mkdtemp(prefix="fips-bound-prof-")
    s, _ = session(path, threads, tmp)
    feeds = feeds_for(s, 1, width, np.random.default_rng(0))
    for _ in range(runs):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    groups, counts, nrun = defaultdict(float), defaultdict(int), 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            nrun += 1
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        g = group_of(ev["name"][: -len("_kernel_time")], ev.get("args", {}).get("op_name", "?"))
        groups[g] += ev["dur"]
        counts[g] += 1
    nrun = max(nrun, 1)
    return {g: {"ms": groups[g] / nrun / 1e3, "nodes": counts[g] // nrun} for g in sorted(groups, key=lambda x: -groups[x])}


def to_markdown(res: dict) -> str:
    mc = res["machine"]
    lines = ["# FiPS int8 decode step: measured, dense int8, and the ideal-kernel bound (benchmarks/decode_bound.py)", "",
             f"Machine: {mc.get('cpu_model')} ({mc.get('cpus')} CPUs), onnxruntime {mc.get('onnxruntime')}, commit "
             f"{mc.get('git_commit', '')[:12]}{' (+ uncommitted changes)' if res.get('dirty_tree') else ''}; load average before {res['load_before']} / after {res['load_after']}; "
             f"nothing else of this project running. FiPS: `{res['fips']}` (density of V {res['facts']['density']:.3f}, "
             f"{res['facts']['kept']:,} kept of {res['facts']['positions']:,} positions); dense: `{res['dense']}`.", "",
             "One decode step (batch 1, a 64-position past), the four sessions in one process, "
             f"{res['rounds']} interleaved rounds x {res['steps']} steps, prepacking on, spinning on. The bound replaces "
             "each sparse V by onnxruntime's MatMulNBits (8 bits, block 32, accuracy_level 4) over a dense matrix of "
             "its kept-entry count, fed by a Slice (the Slice is the bound's artefact: its profiled time is subtracted "
             "in `bound - slices`).", "",
             "| threads | dense int8 p50 ms | FiPS int8 p50 ms (/dense) | bound p50 ms (/dense) | bound - slices (/dense) "
             "| V free p50 ms (/dense) | V's time: FiPS - V free | V's budget for 0.95x: 0.95 dense - V free |",
             "|---|---|---|---|---|---|---|---|"]
    for th, r in res["runs"].items():
        d, f, b, z = (r["timing"][k]["p50_ms"] for k in ("dense-int8", "fips-int8", "bound", "V free"))
        sl = r["profile"]["bound"].get("bound Slice (artefact)", {}).get("ms", 0.0)
        lines.append(f"| {th} | {d:.2f} | {f:.2f} ({f / d:.3f}) | {b:.2f} ({b / d:.3f}) | {b - sl:.2f} ({(b - sl) / d:.3f}) "
                     f"| {z:.2f} ({z / d:.3f}) | {f - z:.2f} ms | {0.95 * d - z:.2f} ms |")
    lines += ["", "Per-node profile (ms per step, onnxruntime's profiler; node count per step in brackets):", ""]
    for th, r in res["runs"].items():
        groups = sorted({g for p in r["profile"].values() for g in p})
        lines += [f"**{th} thread(s)**", "", "| nodes | dense int8 | FiPS int8 | bound | V free |", "|---|---|---|---|---|"]
        for g in groups:
            cells = []
            for k in ("dense-int8", "fips-int8", "bound", "V free"):
                e = r["profile"][k].get(g)
                cells.append(f"{e['ms']:.3f} ({e['nodes']})" if e else "–")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        mlp = {k: sum(e["ms"] for g, e in p.items() if g.startswith(("MLP", "sparse V"))) for k, p in r["profile"].items()}
        lines += ["", f"MLP node time: dense {mlp['dense-int8']:.3f} ms, FiPS {mlp['fips-int8']:.3f} ms "
                  f"({mlp['fips-int8'] / mlp['dense-int8']:.3f}x), bound {mlp['bound']:.3f} ms "
                  f"({mlp['bound'] / mlp['dense-int8']:.3f}x).", ""]
    lines += [res["reading"], ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["runs"]), figsize=(5.5 * len(res["runs"]), 4), squeeze=False)
    keys = ("dense-int8", "fips-int8", "bound", "V free")
    for ax, (th, r) in zip(axes[0], res["runs"].items()):
        groups = sorted({g for p in r["profile"].values() for g in p})
        bottom = np.zeros(len(keys))
        for g in groups:
            vals = np.array([r["profile"][k].get(g, {}).get("ms", 0.0) for k in keys])
            ax.bar(keys, vals, bottom=bottom, label=g)
            bottom += vals
        for i, k in enumerate(keys):
            ax.text(i, bottom[i], f"wall p50 {r['timing'][k]['p50_ms']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{th} thread(s): node ms per decode step")
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fips", required=True, type=Path, help="a FiPS --weights int8 export (folder or .onnx)")
    ap.add_argument("--dense", required=True, type=Path, help="the dense --weights int8 export (folder or .onnx)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fips-decode-bound",
                    help="where the bound model is written")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md, OUT.png")
    args = ap.parse_args()
    from fips_rt.runtime.session import resolve_model_path
    from qkernel_bench import machine
    fips_onnx, _ = resolve_model_path(args.fips)
    dense_onnx, _ = resolve_model_path(args.dense)
    bound_onnx, free_onnx = args.work / "bound" / "model.onnx", args.work / "free" / "model.onnx"
    facts = bound_model(fips_onnx, bound_onnx)
    bound_model(fips_onnx, free_onnx, free=True)
    models = {"dense-int8": dense_onnx, "fips-int8": fips_onnx, "bound": bound_onnx, "V free": free_onnx}
    import subprocess
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30).stdout.strip()
    res = {"machine": machine(), "dirty_tree": bool(dirty), "fips": str(args.fips), "dense": str(args.dense), "facts": facts,
           "rounds": args.rounds, "steps": args.steps, "load_before": [round(x, 2) for x in os.getloadavg()], "runs": {}}
    for th in args.threads:
        r = {"timing": timing(models, th, args.rounds, args.steps, 64),
             "profile": {k: profile(p, th, args.steps, 64) for k, p in models.items()}}
        res["runs"][str(th)] = r
        print(th, json.dumps({k: round(v["p50_ms"], 2) for k, v in r["timing"].items()}), file=sys.stderr)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    best = {k: min(r["timing"][k]["p50_ms"] for r in res["runs"].values()) for k in models}
    res["best_p50_ms"] = best
    res["reading"] = (f"Best p50 over the thread counts: dense int8 {best['dense-int8']:.2f} ms, FiPS int8 "
                      f"{best['fips-int8']:.2f} ms ({best['fips-int8'] / best['dense-int8']:.3f}x), bound "
                      f"{best['bound']:.2f} ms ({best['bound'] / best['dense-int8']:.3f}x, Slice artefact included), V free "
                      f"{best['V free']:.2f} ms ({best['V free'] / best['dense-int8']:.3f}x).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=2)), (".md", to_markdown(res))):
        p = args.out.with_suffix(suffix)
        p.with_suffix(suffix + ".tmp").write_text(text)
        os.replace(p.with_suffix(suffix + ".tmp"), p)
    plot(res, args.out.with_suffix(".png"))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
