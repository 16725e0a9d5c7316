"""The multi-row decode kernels of fips.SparseMatMul (9..16 tokens: one token of each sequence of a
``fips serve`` batch) at every kernel level this CPU runs, against a float64 reference and against the
few-token kernels they replace (``FIPS_SPARSE_MULTIROW=0``). The level and the switch are read once
per process, so each combination runs in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fips_rt.runtime import native  # noqa: E402

TOL = 1e-4
TOKENS = (5, 8, 9, 12, 16, 17)
# (rows, cols): the SmolLM2 V; cols % 16 == 8 (the 8-column tail of the 16-column mask steps);
# cols % 8 != 0 (rows not byte-aligned: the straddling mask reads); a matrix smaller than a task split
SHAPES = ((1024, 1536), (64, 264), (130, 77), (7, 40))

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from fips_rt.runtime import native

    def model(rows, cols, trans_b, values, packed, k):
        node = helper.make_node("SparseMatMul", ["A", "values", "mask"], ["Y"], domain="fips", rows=rows,
                                cols=cols, transB=trans_b)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(values, "values"),
                                           numpy_helper.from_array(packed, "mask")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fips", 1)])
        m.ir_version = 9
        return m.SerializeToString()

    def sess(data, threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.disable_prepacking", "1")
        assert native.register(so, "native") == "native"
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    out = {"worst": 0.0, "nondeterministic": [], "results": {}}
    for rows, cols in json.loads(sys.argv[1]):
        rng = np.random.default_rng(rows * 7 + cols)
        # FiPS-like: dense first rows, an empty tail, a few empty rows in between
        density = np.clip(0.75 * (1 - np.arange(rows) / max(1, 0.65 * rows)), 0, None)[:, None]
        mask = rng.random((rows, cols)) < np.maximum(density, 0.02)
        mask[rows // 3] = False
        dense = np.where(mask, rng.standard_normal((rows, cols)) * 0.05, 0).astype(np.float32)
        values = np.ascontiguousarray(dense[mask])
        packed = np.packbits(mask.reshape(-1), bitorder="little")
        for trans_b in (0, 1):
            k = cols if trans_b else rows
            data = model(rows, cols, trans_b, values, packed, k)
            s1, s2, s3 = sess(data, 1), sess(data, 2), sess(data, 3)
            for t in json.loads(sys.argv[2]):
                a = rng.standard_normal((t, k)).astype(np.float32)
                ref = a.astype(np.float64) @ (dense.T if trans_b else dense).astype(np.float64)
                y = s2.run(None, {"A": a})[0]
                out["worst"] = max(out["worst"], float(np.abs(y - ref).max()))
                if not (np.array_equal(y, s1.run(None, {"A": a})[0]) and np.array_equal(y, s3.run(None, {"A": a})[0])):
                    out["nondeterministic"].append([rows, cols, trans_b, t])
                out["results"][f"{rows}x{cols}/{trans_b}/{t}"] = y.tolist() if y.size <= 4096 else float(y.sum())
    print(json.dumps({"kernel": native.kernel_info(), **out}))
    """
)


def _levels() -> list[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    levels = ["portable"]
    if {"avx2", "fma", "popcnt"} <= flags:
        levels.append("avx2")
        if "avx512f" in flags:
            levels.append("avx512")
    return levels


def _run(level: str, multirow: str) -> dict:
    env = dict(os.environ, FIPS_SPARSE_ISA=level, FIPS_SPARSE_MULTIROW=multirow)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(SHAPES), json.dumps(TOKENS)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def _library():
    if native.library_path() is None:
        pytest.skip("the native kernel library is unavailable")


@pytest.mark.parametrize("level", ["portable", "avx2", "avx512"])
def test_multirow_kernels_match_the_reference_and_the_few_token_kernels(level):
    """At 5..17 tokens (below, inside and above the multi-row range), every shape class, both products:
    within 1e-4 of float64, bitwise the same for 1, 2 and 3 threads, and within 1e-4 of the few-token
    kernels (FIPS_SPARSE_MULTIROW=0; the portable level has one code path, so both settings agree bitwise)."""
    if level not in _levels():
        pytest.skip(f"this CPU cannot run the {level} kernel level")
    on, off = _run(level, "1"), _run(level, "0")
    for r in (on, off):
        assert r["kernel"]["isa"] == level
        assert r["worst"] <= TOL, r["worst"]
        assert r["nondeterministic"] == [], r["nondeterministic"]
    assert on["results"].keys() == off["results"].keys()
    worst = 0.0
    for key, y_on in on["results"].items():
        y_off = off["results"][key]
        if isinstance(y_on, list):
            import numpy as np
            worst = max(worst, float(np.abs(np.asarray(y_on) - np.asarray(y_off)).max()))
        else:  # large outputs are compared through their sums (1024 x 1536 x 17 tokens)
            worst = max(worst, abs(y_on - y_off) / max(1.0, abs(y_off)))
    assert worst <= TOL, worst
    if level == "portable":
        assert on["results"] == off["results"]
    else:  # the two settings take different code at 9..16 tokens only
        same = {k for k in on["results"] if on["results"][k] == off["results"][k]}
        differ = set(on["results"]) - same
        assert all(int(k.rsplit("/", 1)[1]) in (9, 12, 16) for k in differ)
