"""The native CPU kernel of fips.SparseMatMul (runtime/kernels) and its loader (runtime/native.py).

Single-node ONNX models are built here with onnx.helper; expected results come from numpy
on the unpacked dense V (float64).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fips_rt.runtime import kernel_build, native  # noqa: E402

TOL = 1e-4


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def random_sparse(rows, cols, density=0.25, seed=0, scale=0.05, mask=None):
    """(dense V, values, packed little-endian mask) with ~density kept entries."""
    rng = np.random.default_rng(seed)
    if mask is None:
        mask = rng.random((rows, cols)) < density
    dense = np.where(mask, rng.standard_normal((rows, cols)) * scale, 0.0).astype(np.float32)
    values = np.ascontiguousarray(dense[mask])
    packed = np.packbits(mask.reshape(-1), bitorder="little")
    return dense, values, packed


def _function_body(rows, cols, trans_b, elem_type):
    """Reference body (standard ops): unpack the bitmask, scatter values, dense MatMul."""
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr))  # noqa: E731
    nodes = [
        c("shifts", np.arange(8, dtype=np.uint8).reshape(1, 8)),
        c("ax1", np.array([1], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["mask2"]),
        helper.make_node("BitShift", ["mask2", "shifts"], ["shifted"], direction="RIGHT"),
        c("one", np.array(1, dtype=np.uint8)),
        helper.make_node("BitwiseAnd", ["shifted", "one"], ["bits2"]),
        c("minus1", np.array([-1], dtype=np.int64)),
        helper.make_node("Reshape", ["bits2", "minus1"], ["bits"]),
        c("zero", np.array([0], dtype=np.int64)),
        c("n", np.array([rows * cols], dtype=np.int64)),
        helper.make_node("Slice", ["bits", "zero", "n"], ["bits_n"]),
        helper.make_node("Cast", ["bits_n"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("NonZero", ["keep"], ["nz"]),
        helper.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
        helper.make_node("Shape", ["keep"], ["flat_shape"]),
        helper.make_node("ConstantOfShape", ["flat_shape"], ["zeros"], value=helper.make_tensor("z", elem_type, [1], [0])),
        helper.make_node("ScatterND", ["zeros", "idx", "values"], ["flat"]),
        c("vshape", np.array([rows, cols], dtype=np.int64)),
        helper.make_node("Reshape", ["flat", "vshape"], ["V"]),
    ]
    if trans_b:
        nodes += [helper.make_node("Transpose", ["V"], ["Vt"], perm=[1, 0]), helper.make_node("MatMul", ["A", "Vt"], ["Y"])]
    else:
        nodes += [helper.make_node("MatMul", ["A", "V"], ["Y"])]
    return helper.make_function(
        "fips", "SparseMatMul", ["A", "values", "mask"], ["Y"], nodes, [helper.make_opsetid("", 18)],
        attributes=["rows", "cols", "transB"],
    )


def make_model(rows, cols, trans_b, values, packed, a_rank=3, elem_type=TensorProto.FLOAT, body=False,
               weights_as_inputs=False):
    k = cols if trans_b else rows
    a_dims = [f"d{i}" for i in range(a_rank - 1)] + [k]
    inputs = [helper.make_tensor_value_info("A", elem_type, a_dims)]
    inits = []
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info("values", elem_type, ["nnz"]),
                   helper.make_tensor_value_info("mask", TensorProto.UINT8, ["nbytes"])]
    else:
        inits = [numpy_helper.from_array(values, "values"), numpy_helper.from_array(packed, "mask")]
    node = helper.make_node("SparseMatMul", ["A", "values", "mask"], ["Y"], domain="fips",
                            rows=rows, cols=cols, transB=trans_b)
    graph = helper.make_graph([node], "sparse_matmul", inputs, [helper.make_tensor_value_info("Y", elem_type, None)],
                              initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fips", 1)],
        functions=[_function_body(rows, cols, trans_b, elem_type)] if body else [],
    )
    model.ir_version = 9
    return model


def session(model, kernel="native", threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.disable_prepacking", "1")
    taken = native.register(so, kernel)
    assert taken == ("native" if kernel == "native" else "reference")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def expected(a, dense, trans_b):
    w = dense.astype(np.float64)
    return a.astype(np.float64) @ (w.T if trans_b else w)


def run_native(rows, cols, trans_b, a_shape, density=0.25, seed=0, mask=None):
    dense, values, packed = random_sparse(rows, cols, density, seed, mask=mask)
    sess = session(make_model(rows, cols, trans_b, values, packed, a_rank=len(a_shape)))
    a = np.random.default_rng(seed + 1).standard_normal(a_shape).astype(np.float32)
    y = sess.run(None, {"A": a})[0]
    return y, expected(a, dense, trans_b)


@pytest.fixture(scope="module", autouse=True)
def built_library():
    path = native.library_path()
    assert path is not None and path.is_file(), "the native kernel library could not be built"
    return path


# ---------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("tokens", [1, 512])
def test_smollm2_shapes(trans_b, tokens):
    k = 1536 if trans_b else 1024
    y, ref = run_native(1024, 1536, trans_b, (1, tokens, k))
    assert y.shape == (1, tokens, 1024 if trans_b else 1536)
    assert np.abs(y - ref).max() <= TOL


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("tokens", [2, 3, 5, 8, 9, 15, 16, 31, 32, 33, 70, 130])
def test_token_counts_hit_every_block_path(trans_b, tokens):
    k = 1536 if trans_b else 1024
    y, ref = run_native(1024, 1536, trans_b, (tokens, k), seed=tokens)
    assert np.abs(y - ref).max() <= TOL


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("rows,cols", [(37, 45), (45, 37), (50, 301), (3, 7), (1, 1), (64, 264), (130, 520), (300, 77)])
@pytest.mark.parametrize("a_shape_lead", [(1, 3), (2, 3), (4,), (1,), (9,), (1, 40), (0,), (2, 0)])
def test_odd_shapes(trans_b, rows, cols, a_shape_lead):
    k = cols if trans_b else rows
    y, ref = run_native(rows, cols, trans_b, (*a_shape_lead, k), seed=rows * cols)
    assert y.shape == (*a_shape_lead, rows if trans_b else cols)
    if y.size:
        assert np.abs(y - ref).max() <= TOL


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("rows,cols", [(1024, 1536), (37, 45)])
def test_all_zero_and_all_one_masks(trans_b, fill, rows, cols):
    mask = np.full((rows, cols), fill)
    for tokens in (1, 20):
        y, ref = run_native(rows, cols, trans_b, (1, tokens, cols if trans_b else rows), mask=mask)
        assert np.abs(y - ref).max() <= TOL
        if not fill:
            assert not y.any()


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("tokens", [1, 3, 8, 12, 20, 40, 512])
def test_fips_like_row_profile(trans_b, tokens):
    """A pruned FiPS V: density falls from ~75% in the first rows to nothing in the last third,
    with some empty rows and empty 4-row blocks in between (the row skips, the nnz-balanced
    splits and the prefetch of the few-token kernels)."""
    rows, cols = 1024, 1536
    rng = np.random.default_rng(tokens)
    density = np.clip(0.75 * (1 - np.arange(rows) / 660), 0, None)[:, None]
    mask = rng.random((rows, cols)) < density
    mask[[5, 9, 10, 11, 12, 300]] = False
    mask[1000, 7] = True  # one lone entry far into the empty tail
    y, ref = run_native(rows, cols, trans_b, (tokens, cols if trans_b else rows), mask=mask, seed=tokens)
    assert np.abs(y - ref).max() <= TOL
    if trans_b:
        assert not y[:, [5, 9, 10, 11, 12, 300]].any() and not y[:, 700:1000].any()


@pytest.mark.parametrize("density", [0.02, 0.5, 0.9])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_other_densities(density, trans_b):
    for tokens in (1, 17):
        y, ref = run_native(256, 520, trans_b, (tokens, 520 if trans_b else 256), density=density)
        assert np.abs(y - ref).max() <= TOL


@pytest.mark.parametrize("trans_b", [0, 1])
def test_weights_as_graph_inputs(trans_b):
    """A mask that is not an initializer: the kernel builds its offset tables per call."""
    rows, cols = 100, 77
    dense, values, packed = random_sparse(rows, cols, seed=3)
    sess = session(make_model(rows, cols, trans_b, values, packed, a_rank=2, weights_as_inputs=True))
    a = np.random.default_rng(4).standard_normal((5, cols if trans_b else rows)).astype(np.float32)
    y = sess.run(None, {"A": a, "values": values, "mask": packed})[0]
    assert np.abs(y - expected(a, dense, trans_b)).max() <= TOL
    dense2, values2, packed2 = random_sparse(rows, cols, seed=5)  # other weights, same session
    y2 = sess.run(None, {"A": a, "values": values2, "mask": packed2})[0]
    assert np.abs(y2 - expected(a, dense2, trans_b)).max() <= TOL


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("tokens", [1, 2, 100])
def test_deterministic_across_runs_and_thread_counts(trans_b, tokens):
    rows, cols = 1024, 1536
    _, values, packed = random_sparse(rows, cols)
    model = make_model(rows, cols, trans_b, values, packed)
    a = np.random.default_rng(7).standard_normal((1, tokens, cols if trans_b else rows)).astype(np.float32)
    outs = [session(model, threads=n).run(None, {"A": a})[0] for n in (1, 2, 2, 3)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def _cpu_levels() -> list[str]:
    """The kernel levels this CPU can run (from /proc/cpuinfo; what the library's dispatcher checks)."""
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


_LEVEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_native_kernel as t
    from fips_rt.runtime import native
    worst = 0.0
    for trans_b in (0, 1):
        for rows, cols, lead in [(1024, 1536, (1, 1)), (1024, 1536, (1, 40)), (37, 45, (2, 3)), (50, 301, (7,)),
                                 (64, 264, (3,)), (96, 520, (1, 4)), (256, 520, (17,)), (1024, 1536, (2, 8))]:
            y, ref = t.run_native(rows, cols, trans_b, (*lead, cols if trans_b else rows))
            worst = max(worst, float(np.abs(y - ref).max()))
    print(json.dumps({{"worst": worst, **native.kernel_info()}}))
    """
).format(tests=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env,level", [
    ({"FIPS_SPARSE_ISA": "portable"}, "portable"),
    ({"FIPS_SPARSE_FORCE_SCALAR": "1"}, "portable"),
    ({"FIPS_SPARSE_ISA": "avx2"}, "avx2"),
    ({"FIPS_SPARSE_ISA": "avx512"}, "avx512"),
    ({"FIPS_SPARSE_ISA": "avx512", "FIPS_SPARSE_EXPAND": "register"}, "avx512"),
    ({"FIPS_SPARSE_ISA": "auto"}, None),
], ids=["portable", "force-scalar", "avx2", "avx512", "avx512-register-expand", "auto"])
def test_each_kernel_level_matches_the_reference(env, level):
    """Every level this CPU can run, forced through the environment in a fresh process (the library
    chooses once), gives the reference result within 1e-4 and reports the level it runs; "auto" picks
    the best one. The AVX-512 kernels' register-expand form is the one AMD CPUs get."""
    levels = _cpu_levels()
    if level is not None and level not in levels:
        pytest.skip(f"this CPU cannot run the {level} kernel level (it has: {', '.join(levels)})")
    res = subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == (level or levels[-1])
    assert out["worst"] <= TOL


_LACKS_SCRIPT = textwrap.dedent(
    """
    import onnxruntime as ort
    from fips_rt.runtime import native, session
    from fips_rt.runtime.session import FipsRuntimeError
    lib = native.library_path()
    try:  # onnxruntime's own error: the library refuses to register
        ort.SessionOptions().register_custom_ops_library(str(lib))
        print("ORT: registered")
    except Exception as e:
        print("ORT:", str(e).replace("\\n", " | "))
    for call in (lambda: native.register(ort.SessionOptions(), "auto"),
                 lambda: session.register_kernel(ort.SessionOptions(), "auto")):
        try:
            call()
            print("PY: registered")
        except FipsRuntimeError as e:
            print("PY:", str(e).replace("\\n", " | "))
    """
)


@pytest.mark.parametrize("env,says", [
    ({"FIPS_SPARSE_ISA": "avx512", "FIPS_SPARSE_TEST_CPU_LACKS": "avx512f"},
     ("FIPS_SPARSE_ISA=avx512 needs ", "avx512f", ", which this CPU lacks (levels it can run: portable")),
    ({"FIPS_SPARSE_ISA": "avx2", "FIPS_SPARSE_TEST_CPU_LACKS": "fma,avx512f"},
     ("FIPS_SPARSE_ISA=avx2 needs ", "fma", ", which this CPU lacks (levels it can run: portable)")),
    ({"FIPS_SPARSE_ISA": "sse9"}, ("FIPS_SPARSE_ISA=sse9 is not one of auto, portable, avx2, avx512",)),
], ids=["avx512-missing", "fma-missing", "unknown-level"])
def test_a_level_the_cpu_lacks_is_a_one_line_error(env, says):
    """A forced level the CPU lacks (simulated with the test-only FIPS_SPARSE_TEST_CPU_LACKS where the
    CPU has it): an onnxruntime error status at registration, and a one-line FipsRuntimeError from
    native.register and from the session layer even with kernel="auto" (never a silent fallback)."""
    if platform.machine().lower() not in ("x86_64", "amd64") and env["FIPS_SPARSE_ISA"] != "sse9":
        says = ("this build of the kernel library has only the levels portable",)  # no x86 levels built
    res = subprocess.run([sys.executable, "-c", _LACKS_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3, res.stdout
    assert lines[0].startswith("ORT:") and "fips_sparse: kernel level: FIPS_SPARSE_ISA=" in lines[0], lines[0]
    assert lines[1].startswith("PY: native sparse kernel: FIPS_SPARSE_ISA="), lines[1]
    assert lines[2] == lines[1]  # the session layer passes it on as it is
    for line in lines:
        assert all(part in line for part in says) and " | " not in line, line


# ---------------------------------------------------------------------------------------
# which path onnxruntime takes
# ---------------------------------------------------------------------------------------
def test_native_kernel_is_what_runs_the_node():
    """No function body in the model: without the library onnxruntime cannot run the node."""
    rows, cols = 64, 40
    dense, values, packed = random_sparse(rows, cols)
    model = make_model(rows, cols, 0, values, packed, a_rank=2, body=False)
    with pytest.raises(Exception, match="SparseMatMul"):
        session(model, kernel="reference")
    sess = session(model, kernel="native")
    a = np.ones((2, rows), np.float32)
    assert np.abs(sess.run(None, {"A": a})[0] - expected(a, dense, 0)).max() <= TOL


def test_reference_path_uses_function_body():
    rows, cols = 64, 40
    dense, values, packed = random_sparse(rows, cols)
    model = make_model(rows, cols, 1, values, packed, a_rank=2, body=True)
    a = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    for kernel in ("reference", "native"):
        y = session(model, kernel=kernel).run(None, {"A": a})[0]
        assert np.abs(y - expected(a, dense, 1)).max() <= TOL


@pytest.mark.parametrize("body", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_float16_nodes_run_with_the_library_registered(trans_b, body):
    """The library has only a float32 kernel (plus a schema-only float16 declaration, see
    fips_sparse.cc). With it registered a float16 node must still load and run. onnxruntime
    (1.32) does not use the function body here: it wraps the node in Casts and runs the
    float32 kernel, so the result is the float32 product rounded to float16."""
    rows, cols = 37, 45
    dense, values, packed = random_sparse(rows, cols, scale=0.5)
    values16 = values.astype(np.float16)
    a = np.random.default_rng(1).standard_normal((2, 3, cols if trans_b else rows)).astype(np.float16)
    ref = expected(a.astype(np.float32), _dense_from(values16.astype(np.float32), packed, rows, cols), trans_b)
    model = make_model(rows, cols, trans_b, values16, packed, elem_type=TensorProto.FLOAT16, body=body)
    y = session(model, kernel="native").run(None, {"A": a})[0]
    assert y.dtype == np.float16 and y.shape == ref.shape
    assert np.abs(y.astype(np.float64) - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_float16_node_uses_function_body_without_the_library():
    rows, cols = 37, 45
    dense, values, packed = random_sparse(rows, cols, scale=0.5)
    values16 = values.astype(np.float16)
    a = np.random.default_rng(1).standard_normal((4, rows)).astype(np.float16)
    ref = expected(a.astype(np.float32), _dense_from(values16.astype(np.float32), packed, rows, cols), 0)
    model = make_model(rows, cols, 0, values16, packed, a_rank=2, elem_type=TensorProto.FLOAT16, body=True)
    y = session(model, kernel="reference").run(None, {"A": a})[0]
    assert y.dtype == np.float16
    assert np.abs(y.astype(np.float64) - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())


def _dense_from(values, packed, rows, cols):
    keep = np.unpackbits(packed, count=rows * cols, bitorder="little").astype(bool).reshape(rows, cols)
    out = np.zeros((rows, cols), np.float32)
    out[keep] = values
    return out


def test_bad_inputs_raise_clear_errors():
    rows, cols = 16, 24
    _, values, packed = random_sparse(rows, cols)
    model = make_model(rows, cols, 0, values, packed, a_rank=2)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "k"  # let a wrong K through
    sess = session(model)
    with pytest.raises(Exception, match="last dimension"):
        sess.run(None, {"A": np.ones((2, rows + 1), np.float32)})
    wrong = make_model(rows, cols, 0, values[:-1], packed, a_rank=2)
    with pytest.raises(Exception, match="values has"):
        session(wrong).run(None, {"A": np.ones((2, rows), np.float32)})


# ---------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------
def _hide_compiler(monkeypatch, tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("FIPS_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FIPS_RT_PREBUILT", "0")  # the compile-on-first-use path, even where a prebuilt library is
    monkeypatch.delenv("FIPS_RT_NO_NATIVE", raising=False)


def test_library_path_without_compiler_warns_and_returns_none(monkeypatch, tmp_path):
    _hide_compiler(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert native.library_path() is None
    assert native.library_path(build=False) is None


def test_no_native_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FIPS_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FIPS_RT_NO_NATIVE", "1")
    with pytest.warns(RuntimeWarning, match="FIPS_RT_NO_NATIVE"):
        assert native.library_path() is None


def test_register_modes_without_compiler(monkeypatch, tmp_path):
    _hide_compiler(monkeypatch, tmp_path)
    so = ort.SessionOptions()
    with pytest.raises(RuntimeError, match="unavailable"):
        native.register(so, "native")
    with pytest.warns(RuntimeWarning, match="reference"):
        assert native.register(so, "auto") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.register(so, "reference") == "reference"
    with pytest.raises(ValueError):
        native.register(so, "fast")


def test_build_into_fresh_cache(monkeypatch, tmp_path):
    """A fresh cache directory gets <ort version>-<hash>/libfips_sparse.so, reused afterwards."""
    monkeypatch.setenv("FIPS_RT_CACHE", str(tmp_path))
    monkeypatch.setenv("FIPS_RT_PREBUILT", "0")
    monkeypatch.delenv("FIPS_RT_NO_NATIVE", raising=False)
    path = native.library_path()
    assert path is not None and path.name == native.LIBRARY_NAME
    assert path.parent.parent == tmp_path / "kernels"
    assert path.parent.name.startswith(ort.__version__ + "-")
    assert not [p for p in path.parent.iterdir() if p.name != native.LIBRARY_NAME]  # no temp files left
    mtime = path.stat().st_mtime_ns
    assert native.library_path() == path and path.stat().st_mtime_ns == mtime
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.register(ort.SessionOptions(), "auto") == "native"


def test_compile_error_warns(monkeypatch, tmp_path):
    """A compiler that fails: None and a warning, not an exception."""
    fake = tmp_path / "bin"
    fake.mkdir()
    cxx = fake / "badcxx"
    cxx.write_text("#!/bin/sh\necho 'fake: error: nothing works' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FIPS_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FIPS_RT_PREBUILT", "0")
    monkeypatch.delenv("FIPS_RT_NO_NATIVE", raising=False)
    with pytest.warns(RuntimeWarning, match="compilation failed"):
        assert native.library_path() is None


# ---------------------------------------------------------------------------------------
# the prebuilt library and the build plan (runtime/kernel_build.py)
# ---------------------------------------------------------------------------------------
def _as_prebuilt(monkeypatch, tmp_path, lib, sources_id=None):
    """Put a copy of `lib` where the package's prebuilt library goes (optionally with another
    embedded sources id), and hide the compiler: what an installed wheel sees."""
    data = lib.read_bytes()
    if sources_id is not None:
        old = kernel_build.read_sources_id(lib).encode()
        assert len(sources_id) == len(old)
        data = data.replace(kernel_build.SOURCES_ID_PREFIX + old, kernel_build.SOURCES_ID_PREFIX + sources_id.encode())
    pre = tmp_path / "pkg" / native.LIBRARY_NAME
    pre.parent.mkdir()
    pre.write_bytes(data)
    monkeypatch.setattr(native, "PREBUILT_PATH", pre)
    _hide_compiler(monkeypatch, tmp_path)
    monkeypatch.delenv("FIPS_RT_PREBUILT")
    monkeypatch.delenv("FIPS_RT_CXXFLAGS", raising=False)
    return pre


def test_prebuilt_library_is_used_without_a_compiler(monkeypatch, tmp_path, built_library):
    pre = _as_prebuilt(monkeypatch, tmp_path, built_library)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library_path() == pre and native.library_path(build=False) == pre
    rows, cols = 50, 301
    dense, values, packed = random_sparse(rows, cols)
    sess = session(make_model(rows, cols, 1, values, packed, a_rank=2))
    a = np.random.default_rng(2).standard_normal((5, cols)).astype(np.float32)
    assert np.abs(sess.run(None, {"A": a})[0] - expected(a, dense, 1)).max() <= TOL
    info = native.kernel_info()
    assert info["path"] == str(pre) and info["build"] == "prebuilt" and info["isa"] in info["levels"]
    monkeypatch.setenv("FIPS_RT_PREBUILT", "0")  # refused on request: then a compiler is needed
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert native.library_path() is None


def test_prebuilt_library_from_other_sources_is_not_used(monkeypatch, tmp_path, built_library):
    """A source checkout whose in-place library predates an edit of the sources: not loaded (it
    would run old code); the runtime compiles instead, or says why it cannot."""
    _as_prebuilt(monkeypatch, tmp_path, built_library, sources_id="0" * 64)
    with pytest.warns(RuntimeWarning, match="built from other sources"):
        assert native.library_path() is None


def test_library_embeds_its_sources_hash(built_library):
    assert kernel_build.read_sources_id(built_library) == kernel_build.sources_hash(native.SOURCES_DIR)


def test_no_march_native_and_one_object_per_level():
    units = kernel_build.compile_units(native.SOURCES_DIR, "x86_64-linux-gnu")
    levels = [u for u in units if u[0] == "sparse_kernels.cc"]
    assert [u[1] for u in levels] == ["sparse_kernels.portable.o", "sparse_kernels.avx2.o", "sparse_kernels.avx512.o"]
    assert not any(f.startswith("-m") for f in levels[0][2])  # portable: the target's baseline
    assert {"-mavx2", "-mfma"} <= set(levels[1][2]) and "-mavx512f" not in levels[1][2]
    assert {"-mavx512f", "-mavx2", "-mfma"} <= set(levels[2][2])
    assert units.index(levels[0]) > max(units.index(u) for u in units if u[0] in kernel_build.COMMON_SOURCES)
    # every source compiled per level (the fips.QSparseMatMul kernels too), and every baseline object
    # (common + portable levels) linked before any x86 level's
    for src in kernel_build.LEVEL_SOURCES:
        assert [u[1] for u in units if u[0] == src] == [f"{src[:-3]}.{lv}.o" for lv in ("portable", "avx2", "avx512")]
    x86 = [i for i, u in enumerate(units) if u[1].endswith((".avx2.o", ".avx512.o"))]
    assert max(i for i, u in enumerate(units) if not u[1].endswith((".avx2.o", ".avx512.o"))) < min(x86)
    for _, _, flags in units:
        assert not any("march" in f or "mtune" in f for f in flags)
    assert [u[1] for u in kernel_build.compile_units(native.SOURCES_DIR, "aarch64-linux-gnu")
            if u[0] == "sparse_kernels.cc"] == ["sparse_kernels.portable.o"]


# x86 instructions beyond the x86-64 baseline (VEX/EVEX-encoded ones all start with "v")
_NON_BASELINE = re.compile(r"^(v[a-z0-9]+|popcnt|lzcnt|tzcnt|andn|shlx|shrx|sarx|bzhi|pdep|pext|rorx|kmov[bwdq])$")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 kernel levels")
def test_only_the_level_namespaces_hold_simd_code(built_library):
    """Everything that can run before the level is chosen -- registration, validation, the tables,
    the dispatcher, and any C++-library function the objects share -- must be baseline x86-64 code:
    AVX instructions may appear only in fips::avx2 / fips::avx512 (checked on the disassembly)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is needed to read the library's code")
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(built_library)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    func, bad, in_levels = None, {}, 0
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if func is None or len(parts) < 2 or not parts[1].split():
            continue
        simd = _NON_BASELINE.match(parts[1].split()[0]) or re.search(r"%[yz]mm|%k[0-7]", line)
        if not simd:
            continue
        if "fips::avx2::" in func or "fips::avx512::" in func:
            in_levels += 1
        else:
            bad[func] = bad.get(func, 0) + 1
    assert not bad, f"non-baseline instructions outside the level namespaces: {bad}"
    assert in_levels > 1000  # the check sees the levels' code


def test_portable_level_cross_builds_for_aarch64(tmp_path):
    """The portable level + the dispatcher (+ registration and tables) build for aarch64 with Debian's
    cross compiler (g++-aarch64-linux-gnu, installed by .ci/run). A build check: nothing runs it."""
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        if os.environ.get("FIPS_RT_REQUIRE_CROSS", "").strip() not in ("", "0"):
            pytest.fail("FIPS_RT_REQUIRE_CROSS is set but aarch64-linux-gnu-g++ is not on PATH")
        pytest.skip("no aarch64 cross compiler (Debian: apt-get install g++-aarch64-linux-gnu; .ci/run does)")
    machine = kernel_build.target_machine([cxx])
    assert machine.startswith("aarch64")
    lib = kernel_build.build([cxx], native.SOURCES_DIR, tmp_path / native.LIBRARY_NAME, machine=machine)
    data = lib.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    assert int.from_bytes(data[18:20], "little") == 183  # e_machine: EM_AARCH64
    assert kernel_build.read_sources_id(lib) == kernel_build.sources_hash(native.SOURCES_DIR)
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                              timeout=60).stdout
        for name in ("RegisterCustomOps", "FipsSparseKernelIsa", "FipsSparseKernelLevels"):
            assert re.search(rf"\bT {name}$", syms, re.M), (name, syms)
        assert "avx" not in subprocess.run([nm, "-C", str(lib)], capture_output=True, text=True,
                                           timeout=60).stdout
