"""Fuzz single fips.SparseMatMul nodes: thousands of seeded random variants on every path.

Each case is one node with random attributes (rows, cols, transB: small valid values, edge values,
values whose products wrap around 2**64, wrong types, missing), random mask / values lengths and
dtypes, a random A shape (declared and fed), opset 17 or 18, float32 or float16, weights as
initializers or fed at run time. It is run

- ``validate``: the Python validation pass of the runtime's entry points (runtime/validate.py);
- ``native``: onnxruntime with the native kernel library registered directly (the validation pass
  bypassed), with or without the function body in the file;
- ``reference``: a plain onnxruntime, no fips-rt library: the function body (exporter/sparse_op.py).

and compared with an independent oracle of the rule of docs/sparse-op.md (written here, not
imported). Outcomes per path: ``refused`` (an exception; for an invalid node: refused cleanly),
``correct`` (a valid node's output matches numpy), ``wrong`` (a valid node, a different output),
``accepted_invalid`` (an invalid node returned an output: a failure), ``over_refused`` (a valid node
refused), ``crashed`` (the worker process died), ``hung`` (no answer within the hang guard).
The validation pass only sees the file, so for weights fed at run time (or an A it cannot know)
"accepted" is expected there: counted as ``deferred``.

A fraction (``--quant``, default 0.25) of the cases are ``fips.QSparseMatMul`` nodes instead (int8 / int4
codes with scales: random bits, group_size, code and scale dtypes and lengths, missing attributes, on top
of the same attribute / mask / A draws), judged by the same oracle extended with the quantized rule.

Cases run in worker subprocesses (a crash or a hang costs one case: the worker is replaced) under
an address-space limit, so a runaway allocation fails instead of taking the machine down.

    nice -n 10 python benchmarks/fuzz_onnx.py --cases 3000 --out benchmarks/results/fuzz_onnx
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANG_S = 30.0
MAX_MASK_BYTES = 1 << 16
EDGE = [0, 1, -1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 62,
        2 ** 63 - 1, -(2 ** 63), 46341, 46340]


# ---------------------------------------------------------------------------- case generation
def _wrap_pair(rng):
    rows = int(rng.integers(257, 5000))
    nch = -(-(2 ** 64) // rows)
    return rows, 128 * nch - int(rng.integers(0, 2))


def make_case(seed: int) -> dict:
    """A JSON-able description of one node variant (everything drawn from ``seed``)."""
    import numpy as np
    rng = np.random.default_rng([seed, 10])
    kind = rng.random()
    if kind < 0.45:                                  # small and valid-looking
        rows, cols = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    elif kind < 0.6:
        rows, cols = int(rng.choice(EDGE)), int(rng.integers(1, 70))
        if rng.random() < 0.5:
            rows, cols = cols, rows
    elif kind < 0.75:
        rows, cols = int(rng.choice(EDGE)), int(rng.choice(EDGE))
    elif kind < 0.85:
        rows, cols = _wrap_pair(rng)
        if rng.random() < 0.5:
            rows, cols = cols, rows
    else:
        rows, cols = int(rng.integers(-(2 ** 63), 2 ** 63 - 1)), int(rng.integers(-5, 2 ** 40))
    tb_draw = rng.random()
    trans_b = 0 if tb_draw < 0.4 else 1 if tb_draw < 0.8 else int(rng.choice([2, -1, 3, 2 ** 32, -(2 ** 63)]))
    attr_mode = rng.choice(["ok"] * 17 + ["float_transB", "missing_rows", "missing_transB"])
    bits = rows * cols
    correct_nbytes = -(-bits // 8) if 0 <= bits else None
    m_draw = rng.random()
    if correct_nbytes is not None and correct_nbytes <= MAX_MASK_BYTES and m_draw < 0.7:
        nbytes = correct_nbytes
    elif correct_nbytes is not None and correct_nbytes <= MAX_MASK_BYTES and m_draw < 0.85:
        nbytes = max(0, correct_nbytes + int(rng.choice([-1, 1, 2, -2])))
    else:
        nbytes = int(rng.integers(0, 64))
    mask_dtype = str(rng.choice(["uint8"] * 18 + ["int8", "float32"]))
    mask_2d = bool(rng.random() < 0.04)
    density = float(rng.choice([0.0, 0.3, 1.0, rng.random()]))
    v_draw = rng.random()
    values_delta = 0 if v_draw < 0.8 else int(rng.choice([-1, 1, 5, -3]))
    elem = str(rng.choice(["float32", "float16"]))
    values_dtype = elem if rng.random() < 0.95 else str(rng.choice(["float64", "float16", "float32"]))
    k_need = cols if trans_b == 1 else rows
    a_draw = rng.random()
    if 0 < k_need <= 4096 and a_draw < 0.8:
        a_last = k_need
    elif a_draw < 0.9 and 0 < k_need + 1 <= 4096:
        a_last = k_need + 1
    else:
        a_last = int(rng.integers(1, 64))
    a_lead = [int(x) for x in rng.integers(0, 4, size=int(rng.integers(0, 3)))]
    return {"seed": seed, "rows": rows, "cols": cols, "transB": trans_b, "attr_mode": str(attr_mode),
            "nbytes": nbytes, "mask_dtype": mask_dtype, "mask_2d": mask_2d, "density": density,
            "values_delta": values_delta, "elem": elem, "values_dtype": values_dtype, "a_shape": a_lead + [a_last],
            "declare_a": bool(rng.random() < 0.7), "opset": int(rng.choice([17, 18])),
            "weights_as_inputs": bool(rng.random() < 0.2), "body_for_native": bool(rng.random() < 0.5)}


def oracle(c: dict, mask_bytes, n_values: int) -> bool:
    """The rule of docs/sparse-op.md, written independently of runtime/validate.py."""
    if c["attr_mode"] in ("float_transB", "missing_rows"):
        return False
    rows, cols = c["rows"], c["cols"]
    tb = 0 if c["attr_mode"] == "missing_transB" else c["transB"]
    if not (rows >= 1 and cols >= 1 and rows * cols < 2 ** 31 and tb in (0, 1)):
        return False
    n = rows * cols
    if c["mask_dtype"] != "uint8" or c["mask_2d"] or len(mask_bytes) != (n + 7) // 8:
        return False
    kept = sum(bin(b).count("1") for b in mask_bytes[: n // 8]) + (
        bin(mask_bytes[n // 8] & ((1 << (n % 8)) - 1)).count("1") if n % 8 else 0)
    if c["values_dtype"] != c["elem"] or n_values != kept:
        return False
    return len(c["a_shape"]) >= 1 and c["a_shape"][-1] == (cols if tb == 1 else rows)


def build(c: dict):
    """(model bytes for the reference path, model bytes for the native path, feeds, valid, expected)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from fips_rt.exporter.sparse_op import sparse_matmul_function
    rng = np.random.default_rng([c["seed"], 11])
    raw = (rng.random(c["nbytes"] * 8) < c["density"]).astype(np.uint8)
    mask_u8 = np.packbits(raw, bitorder="little") if c["nbytes"] else np.zeros(0, np.uint8)
    rows, cols = c["rows"], c["cols"]
    n = rows * cols
    kept = int(np.unpackbits(mask_u8, bitorder="little")[: max(0, min(n, 8 * c["nbytes"]))].sum()) if c["nbytes"] else 0
    n_values = max(0, kept + c["values_delta"])
    values = (rng.standard_normal(n_values) * 0.1).astype(c["values_dtype"])
    if c["mask_dtype"] == "uint8":
        mask = mask_u8
    elif c["mask_dtype"] == "int8":
        mask = mask_u8.view(np.int8)
    else:
        mask = mask_u8.astype(np.float32)
    if c["mask_2d"] and mask.size % 2 == 0 and mask.size:
        mask = mask.reshape(2, -1)
    elif c["mask_2d"]:
        mask = mask.reshape(1, -1)
    elem_type = TensorProto.FLOAT if c["elem"] == "float32" else TensorProto.FLOAT16
    np_elem = np.float32 if c["elem"] == "float32" else np.float16
    a = rng.standard_normal(c["a_shape"]).astype(np_elem)
    valid = oracle(c, mask_u8.tobytes() if mask.ndim == 1 else b"", n_values) and mask.ndim == 1
    expected = None
    if valid:
        tb = 0 if c["attr_mode"] == "missing_transB" else c["transB"]
        keep = np.unpackbits(mask_u8, bitorder="little")[:n].astype(bool)
        dense = np.zeros(n, np.float64)
        dense[keep] = values.astype(np.float64)
        dense = dense.reshape(rows, cols)
        expected = a.astype(np.float64) @ (dense.T if tb else dense)

    a_dims = [f"d{i}" for i in range(len(c["a_shape"]) - 1)] + [c["a_shape"][-1]] if c["declare_a"] else None
    inputs = [helper.make_tensor_value_info("A", elem_type, a_dims)]
    feeds = {"A": a}
    inits = []
    if c["weights_as_inputs"]:
        inputs += [helper.make_tensor_value_info("values", helper.np_dtype_to_tensor_dtype(values.dtype), None),
                   helper.make_tensor_value_info("mask", helper.np_dtype_to_tensor_dtype(mask.dtype), None)]
        feeds.update(values=values, mask=mask)
    else:
        inits = [numpy_helper.from_array(values, "values"), numpy_helper.from_array(mask, "mask")]
    node = helper.make_node("SparseMatMul", ["A", "values", "mask"], ["Y"], domain="fips")
    attrs = {"rows": rows, "cols": cols, "transB": c["transB"]}
    if c["attr_mode"] == "float_transB":
        attrs["transB"] = float(c["transB"])
    elif c["attr_mode"] == "missing_rows":
        del attrs["rows"]
    elif c["attr_mode"] == "missing_transB":
        del attrs["transB"]
    for k, v in attrs.items():
        node.attribute.append(helper.make_attribute(k, v))
    graph = helper.make_graph([node], "fuzz", inputs, [helper.make_tensor_value_info("Y", elem_type, None)],
                              initializer=inits)

    def model(body):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c["opset"]), helper.make_opsetid("fips", 1)],
                              functions=[sparse_matmul_function(elem_type, c["opset"])] if body else [])
        m.ir_version = 8 if c["opset"] <= 17 else 9
        return m.SerializeToString()

    return model(True), model(c["body_for_native"]), feeds, valid, expected


# ---------------------------------------------------------------------------- fips.QSparseMatMul cases
def make_qcase(seed: int) -> dict:
    """A QSparseMatMul variant: the SparseMatMul draws (float32 A) plus bits, group_size and the codes / scales."""
    import numpy as np
    c = make_case(seed)
    rng = np.random.default_rng([seed, 12])
    c.update(quant=True, elem="float32", values_dtype="float32")
    c["bits"] = int(rng.choice([8, 4])) if rng.random() < 0.9 else int(rng.choice([6, 0, -1, 16, 2 ** 32 + 8]))
    c["group_size"] = (int(rng.choice([0, 0, 32, 64, 16, 7, 1, 3, 2 ** 31 - 1])) if rng.random() < 0.9
                       else int(rng.choice([-1, -(2 ** 40), 2 ** 31])))
    want = "int8" if c["bits"] != 4 else "uint8"
    c["q_dtype"] = want if rng.random() < 0.9 else str(rng.choice(["int8", "uint8", "float32", "int32"]))
    c["q_delta"] = 0 if rng.random() < 0.8 else int(rng.choice([-1, 1, 2, -2]))
    c["s_delta"] = 0 if rng.random() < 0.8 else int(rng.choice([-1, 1, 3]))
    c["s_dtype"] = "float32" if rng.random() < 0.95 else "float16"
    c["s_2d"] = bool(rng.random() < 0.03)
    if c["attr_mode"] == "ok" and rng.random() < 0.1:
        c["attr_mode"] = str(rng.choice(["missing_bits", "missing_group"]))
    return c


def _q_need(bits: int, group: int, rows: int, kept: int) -> tuple[int, int]:
    """(code entries, scales) a node with these attributes needs (int8 layout for invalid bits)."""
    codes = -(-kept // 2) if bits == 4 else kept
    scales = rows if group <= 0 else -(-kept // group)
    return codes, scales


def oracle_q(c: dict, mask_bytes, n_codes: int, n_scales: int) -> bool:
    """The QSparseMatMul rule of docs/sparse-op.md, written independently of runtime/validate.py."""
    if c["attr_mode"] in ("float_transB", "missing_rows", "missing_bits", "missing_group"):
        return False
    rows, cols = c["rows"], c["cols"]
    tb = 0 if c["attr_mode"] == "missing_transB" else c["transB"]
    if not (rows >= 1 and cols >= 1 and rows * cols < 2 ** 31 and tb in (0, 1)):
        return False
    if c["bits"] not in (4, 8) or not 0 <= c["group_size"] < 2 ** 31:
        return False
    n = rows * cols
    if c["mask_dtype"] != "uint8" or c["mask_2d"] or len(mask_bytes) != (n + 7) // 8:
        return False
    kept = sum(bin(b).count("1") for b in mask_bytes[: n // 8]) + (
        bin(mask_bytes[n // 8] & ((1 << (n % 8)) - 1)).count("1") if n % 8 else 0)
    need_codes = kept if c["bits"] == 8 else (kept + 1) // 2
    need_scales = rows if c["group_size"] == 0 else (kept + c["group_size"] - 1) // c["group_size"]
    if c["q_dtype"] != ("int8" if c["bits"] == 8 else "uint8") or n_codes != need_codes:
        return False
    if c["s_dtype"] != "float32" or c["s_2d"] or n_scales != need_scales:
        return False
    return len(c["a_shape"]) >= 1 and c["a_shape"][-1] == (cols if tb == 1 else rows)


def build_q(c: dict):
    """As :func:`build`, for a QSparseMatMul case."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from fips_rt.exporter.sparse_op import qsparse_matmul_function, unpack_int4
    rng = np.random.default_rng([c["seed"], 13])
    raw = (rng.random(c["nbytes"] * 8) < c["density"]).astype(np.uint8)
    mask_u8 = np.packbits(raw, bitorder="little") if c["nbytes"] else np.zeros(0, np.uint8)
    rows, cols = c["rows"], c["cols"]
    n = rows * cols
    kept = int(np.unpackbits(mask_u8, bitorder="little")[: max(0, min(n, 8 * c["nbytes"]))].sum()) if c["nbytes"] else 0
    need_codes, need_scales = _q_need(c["bits"], c["group_size"], rows if 0 < rows <= MAX_MASK_BYTES * 8 else 4, kept)
    n_codes = max(0, need_codes + c["q_delta"])
    n_scales = max(0, need_scales + c["s_delta"])
    codes_u8 = rng.integers(0, 256, n_codes, dtype=np.uint8)
    codes = {"int8": codes_u8.view(np.int8), "uint8": codes_u8, "float32": codes_u8.astype(np.float32),
             "int32": codes_u8.astype(np.int32)}[c["q_dtype"]]
    scales = (rng.random(n_scales) * 0.1).astype(c["s_dtype"])
    if c["s_2d"]:
        scales = scales.reshape(1, -1)
    mask = {"uint8": mask_u8, "int8": mask_u8.view(np.int8), "float32": mask_u8.astype(np.float32)}[c["mask_dtype"]]
    if c["mask_2d"]:
        mask = mask.reshape(2, -1) if mask.size % 2 == 0 and mask.size else mask.reshape(1, -1)
    a = rng.standard_normal(c["a_shape"]).astype(np.float32)
    valid = oracle_q(c, mask_u8.tobytes() if mask.ndim == 1 else b"", n_codes, n_scales) and mask.ndim == 1
    expected = None
    if valid:
        tb = 0 if c["attr_mode"] == "missing_transB" else c["transB"]
        keep = np.unpackbits(mask_u8, bitorder="little")[:n].astype(bool)
        q = codes.astype(np.float64) if c["bits"] == 8 else unpack_int4(codes, kept).astype(np.float64)
        if c["group_size"] == 0:
            grp = np.repeat(np.arange(rows), keep.reshape(rows, cols).sum(1))
        else:
            grp = np.arange(kept) // c["group_size"]
        dense = np.zeros(n, np.float64)
        dense[keep] = q * scales.astype(np.float64)[grp]
        dense = dense.reshape(rows, cols)
        expected = a.astype(np.float64) @ (dense.T if tb else dense)
    a_dims = [f"d{i}" for i in range(len(c["a_shape"]) - 1)] + [c["a_shape"][-1]] if c["declare_a"] else None
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_dims)]
    feeds = {"A": a}
    weights = {"qvalues": codes, "scales": scales, "mask": mask}
    inits = []
    if c["weights_as_inputs"]:
        inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                   for k, v in weights.items()]
        feeds.update(weights)
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    node = helper.make_node("QSparseMatMul", ["A", "qvalues", "scales", "mask"], ["Y"], domain="fips")
    attrs = {"rows": rows, "cols": cols, "transB": c["transB"], "bits": c["bits"], "group_size": c["group_size"]}
    if c["attr_mode"] == "float_transB":
        attrs["transB"] = float(c["transB"])
    for mode, key in (("missing_rows", "rows"), ("missing_transB", "transB"), ("missing_bits", "bits"),
                      ("missing_group", "group_size")):
        if c["attr_mode"] == mode:
            del attrs[key]
    for k, v in attrs.items():
        node.attribute.append(helper.make_attribute(k, v))
    graph = helper.make_graph([node], "fuzz", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)

    def model(body):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c["opset"]), helper.make_opsetid("fips", 1)],
                              functions=[qsparse_matmul_function(c["opset"])] if body else [])
        m.ir_version = 8 if c["opset"] <= 17 else 9
        return m.SerializeToString()

    return model(True), model(c["body_for_native"]), feeds, valid, expected


# ---------------------------------------------------------------------------- worker
PATHS = ("validate", "reference", "native")  # the native kernel last: a crash there keeps the others' results


def _run_one(c: dict, lib: str, emit) -> None:
    """Runs the paths of one case in order, calling ``emit(path, result)`` after each."""
    import numpy as np
    import onnxruntime as ort
    from fips_rt.runtime.validate import ModelValidationError, validate_model
    ref_bytes, native_bytes, feeds, valid, expected = (build_q if c.get("quant") else build)(c)
    emit("case", {"valid": valid, "deferred": c["weights_as_inputs"] or not c["declare_a"]})
    try:
        validate_model(data=ref_bytes)
        emit("validate", "accepted")
    except ModelValidationError:
        emit("validate", "refused")

    def run(model_bytes, with_lib):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.intra_op_num_threads = 1
        if with_lib:
            so.register_custom_ops_library(lib)
        try:
            sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            y = sess.run(None, feeds)[0]
        except Exception:  # noqa: BLE001 - onnxruntime's own exception types
            return "refused"
        if not valid:
            return "accepted_invalid"
        tol = 1e-4 if y.dtype == np.float32 else 3e-2
        ok = y.shape == expected.shape and (y.size == 0 or np.abs(y.astype(np.float64) - expected).max()
                                            <= tol * max(1.0, float(np.abs(expected).max())))
        return "correct" if ok else "wrong"

    emit("reference", run(ref_bytes, False))
    emit("native", run(native_bytes, True))


def worker(lib: str, mem_limit: int) -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    except (ImportError, ValueError, OSError):
        pass

    def emit(path, result):
        sys.stdout.write(json.dumps({"path": path, "result": result}) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        _run_one(json.loads(line), lib, emit)


# ---------------------------------------------------------------------------- parent
class Pool:
    """One worker subprocess at a time; replaced after a crash or a hang."""

    def __init__(self, lib: str, mem_limit: int):
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--lib", lib,
                    "--mem-limit", str(mem_limit)]
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        # a reader thread: lines (None at EOF) into a queue the parent waits on with the hang guard
        self.lines = queue.Queue()

        def pump(stream, q):
            for line in stream:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def run(self, c: dict) -> dict:
        """{"valid", "deferred", and a result per path}; a path the worker did not finish is "crashed"
        or "hung", the paths after it "not_run"."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        r = {"seed": c["seed"], "valid": None, "deferred": False}
        try:
            self.proc.stdin.write(json.dumps(c) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._lost(r, "crashed")
        while not all(p in r for p in PATHS):
            try:
                line = self.lines.get(timeout=HANG_S)
            except queue.Empty:
                self.proc.kill()
                self.proc.wait()
                return self._lost(r, "hung")
            if line is None:
                self.proc.wait()
                r["returncode"] = self.proc.returncode
                return self._lost(r, "crashed")
            msg = json.loads(line)
            if msg["path"] == "case":
                r.update(msg["result"])
            else:
                r[msg["path"]] = msg["result"]
        return r

    def _lost(self, r, what):
        self.proc = None
        pending = [p for p in PATHS if p not in r]
        for i, p in enumerate(pending):
            r[p] = what if i == 0 else "not_run"
        return r

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def classify(r: dict, path: str) -> str:
    got = r[path]
    if got in ("crashed", "hung", "not_run"):
        return got
    if path == "validate":
        if r["valid"]:
            return "over_refused" if got == "refused" else "accepted_valid"
        if got == "refused":
            return "refused_cleanly"
        return "deferred" if r["deferred"] else "accepted_invalid"
    if got == "refused":
        return "over_refused" if r["valid"] else "refused_cleanly"
    return got  # correct / wrong / accepted_invalid


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
    import onnxruntime
    info["onnxruntime"] = onnxruntime.__version__
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", type=float, default=0.25, help="fraction of fips.QSparseMatMul cases (every 1/q-th)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--mem-limit", type=int, default=4 << 30, help="address-space limit of a worker (bytes)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", default=None, help="kernel library to fuzz (default: build / take the cached one)")
    args = ap.parse_args()
    if args.worker:
        worker(args.lib, args.mem_limit)
        return
    sys.path.insert(0, str(ROOT))
    from fips_rt.runtime import native
    lib = Path(args.lib) if args.lib else native.library_path()
    if lib is None or not lib.is_file():
        sys.exit("the native kernel library could not be built")
    pool = Pool(str(lib), args.mem_limit)
    t0 = time.time()
    counts = {p: Counter() for p in ("validate", "native", "reference")}  # table order
    failures = []
    valid_n = 0
    qcounts = {p: Counter() for p in ("validate", "native", "reference")}
    q_every = round(1 / args.quant) if args.quant > 0 else 0
    q_n = q_valid = 0
    for i in range(args.cases):
        quant = bool(q_every) and i % q_every == q_every - 1
        c = (make_qcase if quant else make_case)(args.seed * 1_000_003 + i)
        q_n += quant
        r = pool.run(c)
        valid_n += bool(r.get("valid"))
        q_valid += bool(quant and r.get("valid"))
        for p in counts:
            k = classify(r, p)
            counts[p][k] += 1
            if quant:
                qcounts[p][k] += 1
            if k in ("crashed", "hung", "not_run", "wrong", "accepted_invalid", "over_refused"):
                failures.append({"path": p, "outcome": k, "case": c})
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{args.cases} cases, {time.time() - t0:.0f} s", file=sys.stderr)
    pool.close()
    summary = {
        "tried": args.cases, "valid_by_oracle": valid_n, "invalid_by_oracle": args.cases - valid_n,
        "seed": args.seed, "hang_guard_s": HANG_S, "worker_mem_limit_bytes": args.mem_limit,
        "wall_s": round(time.time() - t0, 1), "machine": machine(), "library": str(lib),
        "paths": {p: dict(sorted(v.items())) for p, v in counts.items()},
        "quantized_cases": q_n, "quantized_valid_by_oracle": q_valid,
        "quantized_paths": {p: dict(sorted(v.items())) for p, v in qcounts.items()},
        "failures": failures[:50], "failure_count": len(failures),
    }
    print(json.dumps({k: summary[k] for k in ("tried", "valid_by_oracle", "paths", "failure_count")}, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(summary))


def to_markdown(s: dict) -> str:
    keys = ["refused_cleanly", "correct", "accepted_valid", "deferred", "over_refused", "wrong", "accepted_invalid",
            "crashed", "hung", "not_run"]
    m = s["machine"]
    lines = [
        "# fips.SparseMatMul / fips.QSparseMatMul node fuzzing (benchmarks/fuzz_onnx.py)", "",
        f"{s['tried']} seeded node variants (seed {s['seed']}; {s['valid_by_oracle']} valid by the rule of "
        f"docs/sparse-op.md, {s['invalid_by_oracle']} invalid), each in a worker subprocess with a "
        f"{s['hang_guard_s']:.0f} s hang guard and a {s['worker_mem_limit_bytes'] >> 30} GiB address-space limit. "
        f"{m.get('cpu_model')} ({m.get('cpus')} CPUs), onnxruntime {m.get('onnxruntime')}, Python {m.get('python')}, "
        f"commit {str(m.get('git_commit', ''))[:12]} (+ working tree); {s['wall_s']:.0f} s.", "",
        "Paths: `validate` = the runtime's validation pass (what `create_session`, `Model.load`, `fips bench`, "
        "`fips serve` run first); `native` = the kernel library registered straight with onnxruntime (validation "
        "bypassed); `reference` = a plain onnxruntime with no fips-rt library (the function body).", "",
        "| outcome | " + " | ".join(s["paths"]) + " |", "|---|" + "---|" * len(s["paths"]),
    ]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(s["paths"][p].get(k, 0)) for p in s["paths"]) + " |")
    if s.get("quantized_cases"):
        lines += ["", f"Of these, {s['quantized_cases']} are fips.QSparseMatMul nodes ({s['quantized_valid_by_oracle']} "
                  "valid by the rule), counted again on their own:", "",
                  "| outcome (QSparseMatMul) | " + " | ".join(s["quantized_paths"]) + " |",
                  "|---|" + "---|" * len(s["quantized_paths"])]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(str(s["quantized_paths"][p].get(k, 0)) for p in s["quantized_paths"])
                         + " |")
    lines += ["", "refused_cleanly: an invalid node raised (no output); correct: a valid node's output matched numpy; "
              "accepted_valid: the validation pass let a valid node through; deferred: an invalid node the validation "
              "pass cannot judge from the file (weights fed at run time, A's last dimension not declared), left to "
              "the kernels, which refused it (see their columns); over_refused / wrong / accepted_invalid / crashed / "
              "hung: failures (not_run: a path that did not run because the worker died on an earlier one of the same case).",
              "",
              f"Failures: {s['failure_count']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
