"""Quantized sparse V (fips.QSparseMatMul, issue 12): reconstruction error and kernel speed, side by side.

Two parts, one command (JSON + markdown under benchmarks/results/qkernel_bench.*):

- ``quality``: every FiPS V factor of a real checkpoint (default: the ``fips demo`` SmolLM2-135M
  checkpoint, MLP budget 0.5) quantized by ``quantize_sparse`` at int8 (per row, g=64, g=32) and
  int4 (g=32, g=64, g=128, per row): relative Frobenius error of V, of the linear's actual weight
  U·V, and of the output on random Gaussian inputs; bytes per kept value (codes + scales).
- ``speed``: single-node sessions on the real V shapes (576 x 1536, the checkpoint's own masks and
  values), T = 1 and T = 16 tokens, transB 0 (gate/up) and 1 (down): fp32 ``fips.SparseMatMul``,
  int8 / int4 ``fips.QSparseMatMul`` (native kernel), and onnxruntime's ``MatMulNBits`` (8 and 4
  bits, block 32, accuracy levels 0 and 4, prepacking on) of the dense equivalent weight V (so the
  same product, dense). Median of interleaved rounds; ms per call, weight bytes streamed per call,
  GB/s-equivalent (weight bytes / time) and the ratio to MatMulNBits of the same bits.

    flock /tmp/fips-timing.lock .venv/bin/python benchmarks/qkernel_bench.py --out benchmarks/results/qkernel_bench

- ``micro`` (alone, ``--part micro``): the issue-12 target, one int8 per-row node (576 x 1536, density 0.47,
  synthetic) exact and with ``activation_bits=8`` against MatMulNBits 8 bits accuracy_level 4, per node:

    .venv/bin/python benchmarks/qkernel_bench.py --part micro --out benchmarks/results/qkernel_bench_micro
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "/work/artifacts/demo_idle/model.pt"
CONFIGS = [(8, 0), (8, 64), (8, 32), (4, 32), (4, 64), (4, 128), (4, 0)]


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["loadavg"] = list(os.getloadavg())
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                            timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def load_factors(path: str, limit: int | None = None):
    """[(linear path, orientation, V rows, cols, values float32, mask uint8, U float32)] of a FiPS checkpoint."""
    from fips_rt.checkpoint import read_checkpoint
    ck = read_checkpoint(path)
    t = ck["tensors"]
    out = []
    for lin in ck["header"]["structure"]["fips_linears"][:limit]:
        p = lin["path"]
        rows, cols = lin["shape"]
        out.append((p, lin["orientation"], rows, cols, t[p + ".values"].numpy().astype(np.float32),
                    t[p + ".mask"].numpy().astype(np.uint8), t[lin["basis"]].numpy().astype(np.float32)))
    return out


def quality(factors, seed: int = 0) -> dict:
    from fips_rt.exporter.sparse_op import quantize_sparse
    rng = np.random.default_rng(seed)
    res = {}
    for bits, g in CONFIGS:
        acc = {"v_err2": 0.0, "v_norm2": 0.0, "w_err2": 0.0, "w_norm2": 0.0, "y_err2": 0.0, "y_norm2": 0.0,
               "nnz": 0, "value_bytes": 0, "scale_bytes": 0, "mask_bytes": 0}
        worst = 0.0
        for _, orient, rows, cols, values, mask, u in factors:
            q = quantize_sparse(values, mask, rows, cols, bits, g)
            keep = np.unpackbits(mask, count=rows * cols, bitorder="little").astype(bool)
            dv = np.zeros(rows * cols, np.float64)
            dv[keep] = q.dequantize().astype(np.float64) - values
            dv = dv.reshape(rows, cols)
            v = np.zeros(rows * cols, np.float64)
            v[keep] = values
            v = v.reshape(rows, cols)
            acc["v_err2"] += float((dv ** 2).sum())
            acc["v_norm2"] += float((v ** 2).sum())
            worst = max(worst, float(np.sqrt((dv ** 2).sum() / max((v ** 2).sum(), 1e-30))))
            u64 = u.astype(np.float64)
            acc["w_err2"] += float(((u64 @ dv) ** 2).sum())
            acc["w_norm2"] += float(((u64 @ v) ** 2).sum())
            x = rng.standard_normal((32, rows if orient == "in" else cols))
            if orient == "in":   # y = x @ V
                acc["y_err2"] += float(((x @ dv) ** 2).sum())
                acc["y_norm2"] += float(((x @ v) ** 2).sum())
            else:                # y = h @ V^T
                acc["y_err2"] += float(((x @ dv.T) ** 2).sum())
                acc["y_norm2"] += float(((x @ v.T) ** 2).sum())
            acc["nnz"] += q.nnz
            nb = q.nbytes
            acc["value_bytes"] += nb["values"]
            acc["scale_bytes"] += nb["scales"]
            acc["mask_bytes"] += nb["mask"]
        res[f"int{bits}-" + ("row" if g == 0 else f"g{g}")] = {
            "bits": bits, "group_size": g,
            "rel_err_V": float(np.sqrt(acc["v_err2"] / acc["v_norm2"])),
            "rel_err_V_worst_factor": worst,
            "rel_err_UV": float(np.sqrt(acc["w_err2"] / acc["w_norm2"])),
            "rel_err_output_random": float(np.sqrt(acc["y_err2"] / acc["y_norm2"])),
            "bits_per_kept_value": 8 * (acc["value_bytes"] + acc["scale_bytes"]) / acc["nnz"],
            "mask_bits_per_kept_value": 8 * acc["mask_bytes"] / acc["nnz"],
            "nnz": acc["nnz"], "value_bytes": acc["value_bytes"], "scale_bytes": acc["scale_bytes"],
            "mask_bytes": acc["mask_bytes"],
        }
        print(json.dumps({k: res[list(res)[-1]][k] for k in ("bits", "group_size", "rel_err_V", "rel_err_UV",
                                                               "bits_per_kept_value")}), file=sys.stderr)
    return res


# ---------------------------------------------------------------------------- speed
SPEED_Q = [(8, 0), (8, 64), (4, 32), (4, 64)]


def _graph(nodes, inputs, outputs, inits, opset=18, functions=()):
    from onnx import helper
    g = helper.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("fips", 1),
                                            helper.make_opsetid("com.microsoft", 1)], functions=list(functions))
    m.ir_version = 9
    return m


def _io(k: int, n_out: int, count: int):
    """The graph inputs (A [t, k]) and outputs (Y0.. [t, n_out]) of `count` nodes all reading A."""
    from onnx import TensorProto, helper
    return ([helper.make_tensor_value_info("A", TensorProto.FLOAT, ["t", k])],
            [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["t", n_out]) for i in range(count)])


def _qsparse_case(qms, rows: int, cols: int, trans_b: int, bits: int, group_size: int, **attrs):
    """(nodes, initializers): one fips.QSparseMatMul per (quantized V, mask) in `qms`, node i reading A and
    q{i}, s{i}, m{i} into Y{i}; `attrs`: extra node attributes (activation_bits)."""
    from onnx import helper, numpy_helper
    nodes, inits = [], []
    for i, (q, mask) in enumerate(qms):
        inits += [numpy_helper.from_array(q.qvalues, f"q{i}"), numpy_helper.from_array(q.scales, f"s{i}"),
                  numpy_helper.from_array(mask, f"m{i}")]
        nodes.append(helper.make_node("QSparseMatMul", ["A", f"q{i}", f"s{i}", f"m{i}"], [f"Y{i}"], domain="fips",
                                      rows=rows, cols=cols, transB=trans_b, bits=bits, group_size=group_size, **attrs))
    return nodes, inits


def _dense_case(denses, trans_b: int):
    """(nodes, initializers): MatMul(A, W{i}) per dense V [rows, cols], W = V (transB 0) or V^T (1), float32."""
    from onnx import helper, numpy_helper
    nodes, inits = [], []
    for i, dense in enumerate(denses):
        w = np.ascontiguousarray((dense.T if trans_b else dense).astype(np.float32))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["A", f"w{i}"], [f"Y{i}"]))
    return nodes, inits


def _sessions(models: dict, threads: int, lib: str) -> dict:
    """{name: CPU InferenceSession} of {name: model bytes}; the fips variants with the kernel library
    registered. Prepacking on (onnxruntime's default): the MatMulNBits kernels need it."""
    import onnxruntime as ort
    sessions = {}
    for name, data in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        if name.startswith("fips"):
            so.register_custom_ops_library(lib)
        sessions[name] = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sessions


def _interleaved_times(sessions: dict, feeds: dict, rounds: int, calls: int) -> dict:
    """{name: [seconds per call, one per round]}: every round runs each session `calls` times, in turn."""
    times = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds)
            times[n].append((time.perf_counter() - t0) / calls)
    return times


def speed_models(factors, trans_b: int):
    """{variant: (model bytes, weight bytes)}: one node per factor of the given orientation, all reading
    the same A (every weight streamed once per call, as in a decode step)."""
    from onnx import helper, numpy_helper
    from fips_rt.exporter.sparse_op import quantize_sparse
    sel = [f for f in factors if (f[1] == "out") == bool(trans_b)]
    rows, cols = sel[0][2], sel[0][3]
    sel = [f for f in sel if (f[2], f[3]) == (rows, cols)]  # one A for all: the common shape (576 x 1536)
    k = cols if trans_b else rows
    n_out = rows if trans_b else cols
    a_in, outs = _io(k, n_out, len(sel))
    models = {}
    # fp32 SparseMatMul
    nodes, inits, wbytes = [], [], 0
    for i, (_, _, r, c, values, mask, _) in enumerate(sel):
        inits += [numpy_helper.from_array(values, f"v{i}"), numpy_helper.from_array(mask, f"m{i}")]
        nodes.append(helper.make_node("SparseMatMul", ["A", f"v{i}", f"m{i}"], [f"Y{i}"], domain="fips", rows=r,
                                      cols=c, transB=trans_b))
        wbytes += values.nbytes + mask.nbytes
    models["fips fp32"] = (_graph(nodes, a_in, outs, inits).SerializeToString(), wbytes)
    for bits, g in SPEED_Q:
        qms = [(quantize_sparse(values, mask, r, c, bits, g), mask) for _, _, r, c, values, mask, _ in sel]
        nodes, inits = _qsparse_case(qms, rows, cols, trans_b, bits, g)
        wbytes = sum(sum(q.nbytes.values()) for q, _ in qms)
        models[f"fips int{bits} " + ("row" if g == 0 else f"g{g}")] = (_graph(nodes, a_in, outs, inits).SerializeToString(),
                                                                      wbytes)
    # dense equivalent weight: MatMul(A, W) with W [k, n_out], quantized by onnxruntime's MatMulNBits
    denses = []
    for _, _, r, c, values, mask, _ in sel:
        keep = np.unpackbits(mask, count=r * c, bitorder="little").astype(bool)
        dense = np.zeros(r * c, np.float32)
        dense[keep] = values
        denses.append(dense.reshape(r, c))
    nodes, inits = _dense_case(denses, trans_b)
    dense_model = _graph(nodes, a_in, outs, inits)
    models["dense fp32 MatMul"] = (dense_model.SerializeToString(), sum(t.raw_data.__len__() for t in inits))
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import copy
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    for bits in (8, 4):
        for acc in (0, 4):
            qz = MatMulNBitsQuantizer(copy.deepcopy(dense_model), bits=bits, block_size=32, is_symmetric=True,
                                      accuracy_level=acc)
            qz.process()
            m = qz.model.model
            wb = sum(len(t.raw_data) for t in m.graph.initializer)
            assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) == len(sel)
            models[f"MatMulNBits {bits}b bs32 acc{acc}"] = (m.SerializeToString(), wb)
    return models, len(sel), k


def time_models(models, k: int, tokens: int, rounds: int, calls: int, threads: int, lib: str) -> dict:
    sessions = _sessions({name: data for name, (data, _) in models.items()}, threads, lib)
    a = np.random.default_rng(0).standard_normal((tokens, k)).astype(np.float32)
    feeds = {"A": a}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    times = _interleaved_times(sessions, feeds, rounds, calls)
    return {n: float(np.median(v)) for n, v in times.items()}


def speed(factors, lib: str, rounds: int, threads: int) -> dict:
    out = {}
    for trans_b in (0, 1):
        models, nnodes, k = speed_models(factors, trans_b)
        for tokens in (1, 16):
            calls = 20 if tokens == 1 else 5
            med = time_models(models, k, tokens, rounds, calls, threads, lib)
            key = f"transB={trans_b} T={tokens}"
            rows = {}
            for name, t in med.items():
                wb = models[name][1]
                rows[name] = {"ms_per_call": t * 1e3, "ms_per_node": t * 1e3 / nnodes, "weight_bytes": wb,
                              "GBps_equiv": wb / t / 1e9}
            for name, r in rows.items():
                bits = 8 if "int8" in name or "8b" in name else 4 if ("int4" in name or "4b" in name) else None
                if bits is not None:
                    best = min(rows[f"MatMulNBits {bits}b bs32 acc{a}"]["ms_per_call"] for a in (0, 4))
                    r["ratio_to_best_MatMulNBits_same_bits"] = r["ms_per_call"] / best
            out[key] = {"nodes": nnodes, "tokens": tokens, "rows": rows}
            print(key, json.dumps({n: round(r["ms_per_call"], 3) for n, r in rows.items()}), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- mask coding
def mask_costs(factors) -> dict:
    """What the bitmask costs per kept value, and what denser codings would: the per-row entropy bound
    (sum over rows of cols * H(row density)) and lzma of the mask bytes (measured, not a kernel format)."""
    import lzma
    nnz = mask_bits = 0
    ent = 0.0
    lz = 0
    for _, _, rows, cols, _, mask, _ in factors:
        keep = np.unpackbits(mask, count=rows * cols, bitorder="little").reshape(rows, cols)
        per_row = keep.sum(1)
        p = per_row / cols
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(p > 0, p * np.log2(p), 0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0))
        ent += float((h * cols).sum())
        nnz += int(per_row.sum())
        mask_bits += 8 * mask.size
        lz += 8 * len(lzma.compress(mask.tobytes(), preset=9))
    return {"nnz": nnz, "density": nnz / sum(f[2] * f[3] for f in factors),
            "bitmask_bits_per_kept": mask_bits / nnz, "row_entropy_bound_bits_per_kept": ent / nnz,
            "lzma_bits_per_kept": lz / nnz}


# ---------------------------------------------------------------------------- micro (issue 12 target)
def micro(rounds: int, threads: int, nodes: int, lib: str, rows: int = 576, cols: int = 1536,
          density: float = 0.47) -> dict:
    """Per-node time of fips.QSparseMatMul int8 per-row (exact, and activation_bits=8) against MatMulNBits 8 bits,
    block 32, accuracy_level 4, prepacking on, of the same dense shape: sessions of `nodes` nodes (random V of
    the SmolLM2 shape, all reading one A), interleaved rounds in one process, T = 1 and 16, both orientations.
    Also the act8 output's error against the float64 product."""
    import logging
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from fips_rt.exporter.sparse_op import quantize_sparse
    logging.getLogger().setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    facs = []
    for _ in range(nodes):
        keep = rng.random((rows, cols)) < density
        mask = np.packbits(keep.reshape(-1), bitorder="little")
        q = quantize_sparse((rng.standard_normal(int(keep.sum())) * 0.05).astype(np.float32), mask, rows, cols, 8, 0)
        dense = np.zeros(rows * cols)
        dense[keep.reshape(-1)] = q.dequantize()
        facs.append((q, dense.reshape(rows, cols)))
    out = {}
    for tb in (0, 1):
        k, n_out = (cols, rows) if tb else (rows, cols)
        a_in, outs = _io(k, n_out, nodes)
        models = {}
        for name, extra in (("fips int8 row (exact)", {}), ("fips int8 row, activation_bits=8", {"activation_bits": 8})):
            nl, inits = _qsparse_case([(q, q.mask) for q, _ in facs], rows, cols, tb, 8, 0, **extra)
            models[name] = _graph(nl, a_in, outs, inits)
        nl, inits = _dense_case([dense for _, dense in facs], tb)
        qz = MatMulNBitsQuantizer(_graph(nl, a_in, outs, inits), bits=8, block_size=32, is_symmetric=True,
                                  accuracy_level=4)
        qz.process()
        models["MatMulNBits 8b bs32 acc4"] = qz.model.model
        sessions = _sessions({name: m.SerializeToString() for name, m in models.items()}, threads, lib)
        for tokens in (1, 16):
            a = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
            feeds = {"A": a}
            errs = {}
            for name, s in sessions.items():
                ys = s.run(None, feeds)
                if name.startswith("fips"):
                    worst = 0.0
                    for y, (_, dense) in zip(ys, facs):
                        want = a.astype(np.float64) @ (dense.T if tb else dense)
                        worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()))
                    errs[name] = worst
            calls = 40 if tokens == 1 else 8
            times = {nm: [t / nodes for t in v] for nm, v in _interleaved_times(sessions, feeds, rounds, calls).items()}
            base = float(np.median(times["MatMulNBits 8b bs32 acc4"]))
            key = f"transB={tb} T={tokens}"
            out[key] = {nm: {"us_per_node": float(np.median(v)) * 1e6, "ratio": float(np.median(v)) / base,
                             "max_rel_err_vs_float64": errs.get(nm)} for nm, v in times.items()}
            print(key, json.dumps({nm: round(r["ratio"], 3) for nm, r in out[key].items()}), file=sys.stderr)
    return out


def micro_markdown(res: dict) -> str:
    lines = ["# fips.QSparseMatMul int8 per-row vs MatMulNBits-8 (accuracy_level 4), one node (benchmarks/qkernel_bench.py --part micro)",
             "", f"V {res['rows']} x {res['cols']}, density {res['density']}, int8 codes with per-row scales; "
             f"{res['nodes']} nodes per session (distinct random V, one A), per-node time = call time / nodes; "
             f"{res['threads']} threads; median of {res['rounds']} interleaved rounds; MatMulNBits: the dense "
             "equivalent weight, 8 bits, block 32, symmetric, accuracy_level 4, prepacking on.",
             f"Machine: {res['machine'].get('cpu_model')} ({res['machine'].get('cpus')} CPUs), load average before / "
             f"after {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}" +
             (" (a shared, loaded machine: ratios only)" if max(res['load_before'][0], res['load_after'][0]) > 1.5 else ""),
             "", "| shape | variant | us / node | ratio to MatMulNBits-8 acc4 | max rel. err vs float64 |", "|---|---|---|---|---|"]
    for key, rows in res["micro"].items():
        for name, r in rows.items():
            err = r["max_rel_err_vs_float64"]
            lines.append(f"| {key} | {name} | {r['us_per_node']:.1f} | {r['ratio']:.2f} | "
                         f"{'' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- report
def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# fips.QSparseMatMul: quantized sparse V, error and kernel speed (benchmarks/qkernel_bench.py)", "",
             f"Checkpoint: `{res['checkpoint']}` ({res.get('factors', '?')} V factors, SmolLM2-135M FiPS, MLP budget 0.5). "
             f"{m.get('cpu_model')} ({m.get('cpus')} CPUs), onnxruntime {m.get('onnxruntime')}, commit "
             f"{str(m.get('git_commit', ''))[:12]} (+ working tree).", ""]
    if "quality" in res:
        lines += ["## Reconstruction error (all V factors of the checkpoint)", "",
                  "Relative Frobenius error of V, of the linear's weight U·V, and of the output on random Gaussian "
                  "inputs (x·V or h·V^T, 32 rows per factor); bits per kept value = codes + scales (the mask comes "
                  "on top, same for all).", "",
                  "| config | bits / kept value | rel. err V | rel. err U·V | rel. err output (random x) | worst factor (V) |",
                  "|---|---|---|---|---|---|"]
        for name, q in res["quality"].items():
            lines.append(f"| {name} | {q['bits_per_kept_value']:.2f} | {q['rel_err_V']:.4f} | {q['rel_err_UV']:.4f} | "
                         f"{q['rel_err_output_random']:.4f} | {q['rel_err_V_worst_factor']:.4f} |")
    if "mask" in res:
        mk = res["mask"]
        lines += ["", f"Mask: density {mk['density']:.3f}; the bitmask costs {mk['bitmask_bits_per_kept']:.2f} bits per "
                  f"kept value; the per-row entropy bound is {mk['row_entropy_bound_bits_per_kept']:.2f} and lzma "
                  f"(preset 9) of the mask bytes gives {mk['lzma_bits_per_kept']:.2f} (measured, not adopted: the "
                  "kernels need random access per row).", ""]
    if "speed" in res:
        sp = res["speed"]
        lines += ["## Kernel speed (real V shapes 576 x 1536, the checkpoint's masks and values)", "",
                  f"One session per variant holding every factor of one orientation as its own node (all read the "
                  f"same A, every weight streamed once per call), {res['threads']} threads, median of "
                  f"{res['rounds']} interleaved rounds. MatMulNBits: the dense equivalent weight (zeros where V is "
                  "pruned) quantized by onnxruntime's MatMulNBitsQuantizer (symmetric, block 32), prepacking on. "
                  "GB/s-equivalent = the variant's own weight bytes / time. Ratio: to the faster MatMulNBits "
                  "accuracy level of the same bits (< 1: FiPS faster).",
                  "", f"Load average before / after: {res.get('load_before')} / {res.get('load_after')}"
                  + (" (a loaded machine: provisional timings)" if max(res.get('load_before', [0])[0],
                                                                      res.get('load_after', [0])[0]) > 1.5 else ""),
                  ""]
        for key, block in sp.items():
            lines += [f"### {key} ({block['nodes']} nodes)", "", "| variant | ms / call | ms / node | weight MB | GB/s-equiv | "
                      "ratio to MatMulNBits (same bits) |", "|---|---|---|---|---|---|"]
            for name, r in block["rows"].items():
                ratio = r.get("ratio_to_best_MatMulNBits_same_bits")
                lines.append(f"| {name} | {r['ms_per_call']:.3f} | {r['ms_per_node']:.4f} | {r['weight_bytes'] / 1e6:.2f} | "
                             f"{r['GBps_equiv']:.1f} | {'' if ratio is None else f'{ratio:.2f}'} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Bars: ms per node of every variant, per (transB, T) block; quality: error against bits per kept value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = list(res.get("speed", {}).items())
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(4.2 * (len(blocks) + 1), 4.2))
    for ax, (key, block) in zip(axes, blocks):
        names = list(block["rows"])
        vals = [block["rows"][n]["ms_per_node"] for n in names]
        colors = ["tab:blue" if n.startswith("fips") else "tab:gray" for n in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per node (log)")
        ax.set_title(key, fontsize=9)
    ax = axes[-1]
    for name, q in res.get("quality", {}).items():
        ax.scatter(q["bits_per_kept_value"], q["rel_err_V"], color="tab:red" if q["bits"] == 4 else "tab:green")
        ax.annotate(name, (q["bits_per_kept_value"], q["rel_err_V"]), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per kept value (codes + scales)")
    ax.set_ylabel("relative error of V")
    ax.set_title("quantize_sparse on the checkpoint's V", fontsize=9)
    fig.suptitle("fips.QSparseMatMul vs MatMulNBits (loaded machine: provisional timings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=CHECKPOINT)
    ap.add_argument("--part", choices=["all", "quality", "speed", "micro"], default="all",
                    help="quality (no timing), speed (run it under flock /tmp/fips-timing.lock) or both; a part run "
                         "alone keeps the other part of an existing OUT.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=8, help="--part micro: nodes per session")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png (--part micro: OUT.json, OUT.md)")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json (no measurement)")
    args = ap.parse_args()
    if args.plot_only:
        if not args.out:
            sys.exit("--plot-only needs --out")
        plot(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out).with_suffix(".png"))
        return
    sys.path.insert(0, str(ROOT))
    if args.part == "micro":
        from fips_rt.runtime import native
        lib = native.library_path()
        if lib is None:
            sys.exit("the native kernel library could not be built")
        res = {"machine": machine(), "rows": 576, "cols": 1536, "density": 0.47, "nodes": args.nodes,
               "threads": args.threads, "rounds": args.rounds, "load_before": list(os.getloadavg())}
        res["micro"] = micro(args.rounds, args.threads, args.nodes, str(lib))
        res["load_after"] = list(os.getloadavg())
        res["kernel"] = native.kernel_info(lib)
        print(micro_markdown(res))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
            out.with_suffix(".md").write_text(micro_markdown(res))
        return
    res: dict = {}
    if args.out and Path(args.out).with_suffix(".json").is_file() and args.part != "all":
        res = json.loads(Path(args.out).with_suffix(".json").read_text())
    factors = load_factors(args.checkpoint)
    res.update(checkpoint=args.checkpoint, factors=len(factors), machine=machine())
    if args.part in ("all", "quality"):
        res["quality"] = quality(factors)
        res["mask"] = mask_costs(factors)
    if args.part in ("all", "speed"):
        from fips_rt.runtime import native
        lib = native.library_path()
        if lib is None:
            sys.exit("the native kernel library could not be built")
        res["load_before"] = list(os.getloadavg())
        res["speed"] = speed(factors, str(lib), args.rounds, args.threads)
        res["load_after"] = list(os.getloadavg())
        res.update(rounds=args.rounds, threads=args.threads, kernel=native.kernel_info(lib))
    print(to_markdown(res))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(res, indent=1) + "\n"), (".md", to_markdown(res))):
            tmp = out.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out.with_suffix(suffix))
        plot(res, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
