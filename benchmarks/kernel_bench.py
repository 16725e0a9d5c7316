"""Micro-benchmark: dense MLP (onnxruntime MatMul) vs FiPS MLP on the native sparse kernel.

Shapes of one SmolLM2-135M FiPS MLP: d=576, r=1024, d_ff=1536, V 75% zeros (unstructured).

    dense : y = x + (silu(x Wg) * (x Wu)) Wd             Wg, Wu [576,1536], Wd [1536,576]
    sparse: t = x U1 ; g = SparseMatMul(t, Vg) ; u = SparseMatMul(t, Vu)
            s = SparseMatMul(silu(g) * u, Vd, transB=1) ; y = x + Gemm(s, U2, transB=1)
            U1, U2 [576,1024] dense, Vg, Vu, Vd [1024,1536] sparse (values + bitmask)

The dense weights are the products of the sparse model's (Wg = U1 Vg, ..., Wd = Vd^T U2^T), so
both graphs compute the same function (checked). Both sessions use the same SessionOptions
(intra_op_num_threads=2, session.disable_prepacking=1; the library is registered on it).

--layers L chains L such MLPs with distinct weights (U shared by groups of --group-size
layers, as FiPS does): with L=1 all weights stay in the CPU caches; with L=8 they do not
(dense 85 MB), which is the regime of a whole-model decode step.

Timing: dense and sparse are measured in alternating rounds (the machine may be shared), after
warm-up; the median and the 10th percentile of the per-call wall times are reported.

    python benchmarks/kernel_bench.py                      # writes benchmarks/results/kernel_bench.{json,md}
    python benchmarks/kernel_bench.py --tokens 1 --layers 1 --rounds 3 --no-write
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
try:
    from fips_rt.runtime import bench as rt_bench
    from fips_rt.runtime import native
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(REPO))
    import importlib.util

    def _load(name, file):
        spec = importlib.util.spec_from_file_location(name, REPO / "runtime" / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    native = _load("fips_native", "native.py")
    rt_bench = _load("fips_runtime_bench", "bench.py")

D, R, DFF = 576, 1024, 1536
SPARSITY = 0.75


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def _sparse_weight(rng, rows, cols, density):
    mask = rng.random((rows, cols)) < density
    dense = np.where(mask, rng.standard_normal((rows, cols)) * 0.03, 0.0).astype(np.float32)
    return dense, np.ascontiguousarray(dense[mask]), np.packbits(mask.reshape(-1), bitorder="little")


def make_weights(layers, group_size, seed=0):
    rng = np.random.default_rng(seed)
    us = {}
    out = []
    for layer in range(layers):
        g = layer // group_size
        if g not in us:
            us[g] = tuple((rng.standard_normal((D, R)) * 0.04).astype(np.float32) for _ in range(2))
        u1, u2 = us[g]
        vs = [_sparse_weight(rng, R, DFF, 1.0 - SPARSITY) for _ in range(3)]
        out.append({"group": g, "U1": u1, "U2": u2, "V": vs})
    return out


def _silu(nodes, x, name):
    nodes += [helper.make_node("Sigmoid", [x], [f"{name}_sig"]), helper.make_node("Mul", [x, f"{name}_sig"], [name])]


def dense_model(weights, tokens):
    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(weights):
        (vg, _, _), (vu, _, _), (vd, _, _) = w["V"]
        wg, wu, wd = w["U1"] @ vg, w["U1"] @ vu, vd.T @ w["U2"].T
        for name, arr in (("Wg", wg), ("Wu", wu), ("Wd", wd)):
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), f"{name}{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"Wg{i}"], [f"g{i}"]), helper.make_node("MatMul", [cur, f"Wu{i}"], [f"u{i}"])]
        _silu(nodes, f"g{i}", f"a{i}")
        nodes += [helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"h{i}"]), helper.make_node("MatMul", [f"h{i}", f"Wd{i}"], [f"m{i}"]),
                  helper.make_node("Add", [cur, f"m{i}"], [f"y{i}"])]  # residual, as in the transformer
        cur = f"y{i}"
    return _model(nodes, inits, cur, tokens, opsets=[("", 18)])


def sparse_model(weights, tokens):
    nodes, inits, cur = [], [], "x"
    inits.append(numpy_helper.from_array(np.array([-1, R], dtype=np.int64), "flat_r"))
    seen_groups = set()
    for i, w in enumerate(weights):
        g = w["group"]
        if g not in seen_groups:
            seen_groups.add(g)
            inits += [numpy_helper.from_array(w["U1"], f"U1_{g}"), numpy_helper.from_array(w["U2"], f"U2_{g}")]
        for name, (_, values, packed) in zip(("Vg", "Vu", "Vd"), w["V"]):
            inits += [numpy_helper.from_array(values, f"{name}{i}_values"), numpy_helper.from_array(packed, f"{name}{i}_mask")]

        def spmm(a, v, out, trans_b):
            return helper.make_node("SparseMatMul", [a, f"{v}{i}_values", f"{v}{i}_mask"], [out], domain="fips",
                                    rows=R, cols=DFF, transB=trans_b)

        nodes += [
            helper.make_node("MatMul", [cur, f"U1_{g}"], [f"t{i}"]),
            spmm(f"t{i}", "Vg", f"g{i}", 0),
            spmm(f"t{i}", "Vu", f"u{i}", 0),
        ]
        _silu(nodes, f"g{i}", f"a{i}")
        nodes += [
            helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"h{i}"]),
            spmm(f"h{i}", "Vd", f"s{i}", 1),
            helper.make_node("Reshape", [f"s{i}", "flat_r"], [f"s2d{i}"]),
            helper.make_node("Gemm", [f"s2d{i}", f"U2_{g}"], [f"y2d{i}"], transB=1),
            helper.make_node("Shape", [cur], [f"shape{i}"]),
            helper.make_node("Reshape", [f"y2d{i}", f"shape{i}"], [f"m{i}"]),
            helper.make_node("Add", [cur, f"m{i}"], [f"y{i}"]),
        ]
        cur = f"y{i}"
    return _model(nodes, inits, cur, tokens, opsets=[("", 18), ("fips", 1)])


def _model(nodes, inits, out, tokens, opsets):
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, D])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, tokens, D])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 9
    return model.SerializeToString()


def weight_bytes(weights):
    dense = len(weights) * 3 * D * DFF * 4
    groups = {w["group"] for w in weights}
    sparse = len(groups) * 2 * D * R * 4 + sum(v[1].nbytes + v[2].nbytes for w in weights for v in w["V"])
    return dense, sparse


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def time_pair(sessions, x, reps, rounds, warmup):
    """Per-call wall times of each session, measured in alternating rounds (ABAB..., the order
    flipped every round) so that both see the same machine conditions."""
    feeds = {"x": x}
    times = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    items = list(sessions.items())
    for r in range(rounds):
        for name, s in items if r % 2 == 0 else items[::-1]:
            for _ in range(reps):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        v = sorted(v)
        out[k] = {"median": statistics.median(v) * 1e3, "p10": v[len(v) // 10] * 1e3, "n": len(v)}
    return out


def cpu_time_pair(sessions, x, reps, rounds):
    """Median CPU time per call of the calling thread (sessions with intra_op_num_threads=1
    run every node on it): unaffected by time the process spends descheduled on a shared
    machine, unlike wall time."""
    feeds = {"x": x}
    per_call = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    items = list(sessions.items())
    for r in range(rounds):
        for name, s in items if r % 2 == 0 else items[::-1]:
            t0 = time.thread_time()
            for _ in range(reps):
                s.run(None, feeds)
            per_call[name].append((time.thread_time() - t0) / reps)
    return {k: statistics.median(v) * 1e3 for k, v in per_call.items()}


def _loadavg():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(lib_path):
    """``fips_rt.runtime.bench.machine_info`` (CPU model, SIMD flags, ...) plus the kernel's ISA and the load."""
    base = rt_bench.machine_info()
    isa = None
    if lib_path is not None:
        try:
            fn = ctypes.CDLL(str(lib_path)).FipsSparseKernelIsa
            fn.restype = ctypes.c_char_p
            isa = fn().decode()
        except (OSError, AttributeError):
            pass
    return {
        "cpu": base["cpu_model"],
        "cpu_flags": base["cpu_flags"],
        "logical_cpus": base["logical_cpus"],
        "onnxruntime": ort.__version__,
        "python": base["python"],
        "numpy": np.__version__,
        "kernel_isa": isa,
        "loadavg_start": _loadavg(),
    }


HEADER = ("| layers | tokens | weights dense / sparse (MB) | dense ms median (p10) | sparse ms median (p10) "
          "| sparse/dense median (p10) | 1-thread CPU ms dense / sparse (ratio) | max abs diff |")


def _md_row(r):
    cpu = (f"{r['dense_cpu1_ms']:.3f} / {r['sparse_cpu1_ms']:.3f} ({r['ratio_cpu1']:.2f})"
           if "ratio_cpu1" in r else "-")
    return (f"| {r['layers']} | {r['tokens']} | {r['dense_weight_mb']:.1f} / {r['sparse_weight_mb']:.1f} | "
            f"{r['dense_ms']:.3f} ({r['dense_p10_ms']:.3f}) | {r['sparse_ms']:.3f} ({r['sparse_p10_ms']:.3f}) | "
            f"{r['ratio']:.2f} ({r['ratio_p10']:.2f}) | {cpu} | {r['max_abs_diff']:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--group-size", type=int, default=4, help="layers sharing one U1/U2 pair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-cpu-time", action="store_true", help="skip the 1-thread CPU-time measurement")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--multirow", action="store_true",
                    help="A/B of the multi-row decode kernels instead: single SparseMatMul nodes at the SmolLM2 V "
                         "shape, FIPS_SPARSE_MULTIROW=0 vs 1 in alternating fresh processes (writes "
                         "kernel_bench_multirow.{json,md}); --tokens default 1 4 5 8 9 12 16 17")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return multirow_worker(args)
    if args.multirow:
        return multirow_main(args, argv)

    lib = native.library_path()
    if lib is None:
        sys.exit("native kernel library unavailable (see the warning above)")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.disable_prepacking", "1")
    native.register(so, "native")
    so1 = ort.SessionOptions()  # for the CPU-time table: everything on the calling thread
    so1.intra_op_num_threads = 1
    so1.add_session_config_entry("session.disable_prepacking", "1")
    native.register(so1, "native")

    info = machine_info(lib)
    rows = []
    print(f"# fips.SparseMatMul kernel bench - {info['cpu']}, {info['logical_cpus']} logical CPUs, "
          f"onnxruntime {info['onnxruntime']}, kernel {info['kernel_isa']}, threads {args.threads}\n")
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        weights = make_weights(layers, args.group_size)
        wd, ws = weight_bytes(weights)
        for tokens in args.tokens:
            sessions = {
                "dense": ort.InferenceSession(dense_model(weights, tokens), so, providers=["CPUExecutionProvider"]),
                "sparse": ort.InferenceSession(sparse_model(weights, tokens), so, providers=["CPUExecutionProvider"]),
            }
            x = np.random.default_rng(tokens).standard_normal((1, tokens, D)).astype(np.float32)
            yd = sessions["dense"].run(None, {"x": x})[0]
            ys = sessions["sparse"].run(None, {"x": x})[0]
            diff = float(np.abs(yd - ys).max())
            work = layers * tokens  # scale repetitions to roughly constant time per round
            reps = max(1, min(50, int(200 / work)))
            warmup = max(3, reps)
            t = time_pair(sessions, x, reps, args.rounds, warmup)
            row = {"layers": layers, "tokens": tokens,
                   "dense_ms": t["dense"]["median"], "sparse_ms": t["sparse"]["median"],
                   "dense_p10_ms": t["dense"]["p10"], "sparse_p10_ms": t["sparse"]["p10"],
                   "ratio": t["sparse"]["median"] / t["dense"]["median"],
                   "ratio_p10": t["sparse"]["p10"] / t["dense"]["p10"],
                   "max_abs_diff": diff, "calls_per_session": t["dense"]["n"],
                   "dense_weight_mb": wd / 1e6, "sparse_weight_mb": ws / 1e6}
            if not args.no_cpu_time:
                s1 = {"dense": ort.InferenceSession(dense_model(weights, tokens), so1, providers=["CPUExecutionProvider"]),
                      "sparse": ort.InferenceSession(sparse_model(weights, tokens), so1, providers=["CPUExecutionProvider"])}
                c = cpu_time_pair(s1, x, max(1, reps // 2), max(5, args.rounds // 2))
                row.update(dense_cpu1_ms=c["dense"], sparse_cpu1_ms=c["sparse"], ratio_cpu1=c["sparse"] / c["dense"])
            rows.append(row)
            print(_md_row(row), flush=True)
    info["loadavg_end"] = _loadavg()
    if args.no_write:
        return rows
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "shapes": {"d": D, "r": R, "d_ff": DFF, "sparsity": SPARSITY, "group_size": args.group_size},
        "session_options": {"intra_op_num_threads": args.threads, "session.disable_prepacking": "1"},
        "machine": info,
        "rows": rows,
    }
    (args.out / "kernel_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# fips.SparseMatMul kernel micro-benchmark",
        "",
        f"{result['date']} - `python benchmarks/kernel_bench.py` - {info['cpu']}, {info['logical_cpus']} logical "
        f"CPUs ({', '.join(info['cpu_flags'])}), onnxruntime {info['onnxruntime']}, kernel `{info['kernel_isa']}`, "
        f"intra_op_num_threads={args.threads}, prepacking off. Load average at start / end: "
        f"{info['loadavg_start']} / {info['loadavg_end']} (the machine may be shared; dense and sparse are "
        "timed in alternating rounds).",
        "",
        f"One SmolLM2 FiPS MLP: d={D}, r={R}, d_ff={DFF}, V {int(SPARSITY * 100)}% zeros; dense = the equivalent "
        f"dense W (3 x {D}x{DFF}); sparse = MatMul x U1 + 2 SparseMatMul + SparseMatMul(transB) + Gemm(transB). "
        f"`layers` > 1 chains MLPs with distinct weights (U shared per {args.group_size} layers) so the weights do "
        "not fit in the caches. Wall ms per call with intra_op_num_threads=2: median and 10th percentile (p10, "
        "closer to the time on an idle machine) over all calls. '1-thread CPU ms': CPU time per call of sessions "
        "with intra_op_num_threads=1 (same options otherwise), which time spent descheduled does not inflate.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [_md_row(r) for r in rows]
    (args.out / "kernel_bench.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {args.out / 'kernel_bench.json'} and {args.out / 'kernel_bench.md'}")
    return rows


# ---------------------------------------------------------------------------------------
# --multirow: the multi-row (batched decode) kernels against the few-token ones
# ---------------------------------------------------------------------------------------
MR_MATRICES = 8  # distinct V per session: 14 MB of values + masks, streamed from memory as in a decode step


def _spmm_model(vs, trans_b, tokens):
    k = DFF if trans_b else R
    nodes, inits, outs = [], [], []
    for i, (_, values, packed) in enumerate(vs):
        inits += [numpy_helper.from_array(values, f"v{i}"), numpy_helper.from_array(packed, f"m{i}")]
        nodes.append(helper.make_node("SparseMatMul", ["A", f"v{i}", f"m{i}"], [f"y{i}"], domain="fips",
                                      rows=R, cols=DFF, transB=trans_b))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "spmm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [tokens, k])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fips", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def multirow_worker(args):
    """One process, one FIPS_SPARSE_MULTIROW setting: per-matrix ms for every (transB, T); prints JSON."""
    rng = np.random.default_rng(0)
    vs = [_sparse_weight(rng, R, DFF, 1.0 - SPARSITY) for _ in range(MR_MATRICES)]
    out = {}
    for threads in (1, args.threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.disable_prepacking", "1")
        native.register(so, "native")
        for trans_b in (0, 1):
            for tokens in args.tokens:
                sess = ort.InferenceSession(_spmm_model(vs, trans_b, tokens), so, providers=["CPUExecutionProvider"])
                a = np.random.default_rng(tokens).standard_normal((tokens, DFF if trans_b else R)).astype(np.float32)
                ys = sess.run(None, {"A": a})
                ref = [a.astype(np.float64) @ (d.T if trans_b else d).astype(np.float64) for d, _, _ in vs]
                diff = max(float(np.abs(y - r).max()) for y, r in zip(ys, ref))
                clock = time.thread_time if threads == 1 else time.perf_counter
                per = []
                for _ in range(args.rounds):
                    t0 = clock()
                    sess.run(None, {"A": a})
                    per.append((clock() - t0) / MR_MATRICES * 1e3)
                per.sort()
                out[f"{threads}/{trans_b}/{tokens}"] = {"min": per[0], "median": statistics.median(per), "diff": diff}
    print(json.dumps({"isa": machine_info(native.library_path()).get("kernel_isa"), "rows": out}))


def multirow_main(args, argv):
    import subprocess
    tokens = args.tokens if argv and "--tokens" in argv else [1, 4, 5, 8, 9, 12, 16, 17]
    info = machine_info(native.library_path())
    runs = {"0": [], "1": []}
    for rep in range(3):  # alternate the settings so both see the same machine conditions
        for mr in ("0", "1") if rep % 2 == 0 else ("1", "0"):
            cmd = [sys.executable, __file__, "--worker", "1", "--threads", str(args.threads), "--rounds",
                   str(args.rounds), "--tokens", *map(str, tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, FIPS_SPARSE_MULTIROW=mr),
                                 timeout=1800)
            if res.returncode != 0:
                sys.exit(f"worker failed: {res.stderr[-2000:]}")
            runs[mr].append(json.loads(res.stdout.strip().splitlines()[-1]))
    info["loadavg_end"] = _loadavg()
    rows = []
    for threads in (1, args.threads):
        for trans_b in (0, 1):
            for t in tokens:
                key = f"{threads}/{trans_b}/{t}"
                best = {mr: min(r["rows"][key]["min"] for r in runs[mr]) for mr in runs}
                med = {mr: statistics.median(r["rows"][key]["median"] for r in runs[mr]) for mr in runs}
                rows.append({"threads": threads, "transB": trans_b, "tokens": t, "old_min_ms": best["0"],
                             "new_min_ms": best["1"], "old_median_ms": med["0"], "new_median_ms": med["1"],
                             "speedup_min": best["0"] / best["1"], "speedup_median": med["0"] / med["1"],
                             "max_abs_diff": max(r["rows"][key]["diff"] for mr in runs for r in runs[mr])})
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
              "shape": {"rows": R, "cols": DFF, "sparsity": SPARSITY, "matrices": MR_MATRICES},
              "isa": runs["1"][0]["isa"], "rounds": args.rounds, "rows": rows}
    head = ("| threads | transB | tokens | few-token kernels ms (min / median) | multi-row on ms (min / median) "
            "| speedup (min / median) | max abs diff |")
    md = ["# fips.SparseMatMul multi-row decode kernels: A/B", "",
          f"{result['date']} - `python benchmarks/kernel_bench.py --multirow` - {info['cpu']}, {info['logical_cpus']} "
          f"logical CPUs, kernel level `{result['isa']}`, onnxruntime {info['onnxruntime']}. Load average at start / "
          f"end: {info['loadavg_start']} / {info['loadavg_end']} (provisional when above ~1: the machine was shared).",
          "",
          f"Per-matrix time of fips.SparseMatMul at the SmolLM2 V shape ({R}x{DFF}, {int(SPARSITY * 100)}% zeros), "
          f"{MR_MATRICES} distinct matrices per call (streamed from memory, as in a decode step). "
          "FIPS_SPARSE_MULTIROW=0 (the few-token kernels: T/4 or T/8 passes over V) vs 1 (default: 9..16 tokens in "
          "one pass, entry-list loops over one 16-token block; below 9 tokens both settings run the same code), "
          "3 alternating fresh processes each. threads = 1: CPU time of the calling thread (robust to a shared "
          f"machine); threads = {args.threads}: wall time.", "", head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['threads']} | {r['transB']} | {r['tokens']} | {r['old_min_ms']:.3f} / {r['old_median_ms']:.3f} | "
                  f"{r['new_min_ms']:.3f} / {r['new_median_ms']:.3f} | {r['speedup_min']:.2f}x / "
                  f"{r['speedup_median']:.2f}x | {r['max_abs_diff']:.1e} |")
    print("\n".join(md))
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_bench_multirow.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "kernel_bench_multirow.md").write_text("\n".join(md) + "\n")
    return rows


if __name__ == "__main__":
    main()
