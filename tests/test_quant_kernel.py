"""fips.QSparseMatMul (issue 12): quantize_sparse, the function body, the native kernels, the validation pass.

Three paths compute every quantized product: the native kernel library (runtime/kernels, at every
kernel level this CPU has, each forced in its own process), the reference function body in a plain
onnxruntime (what ``kernel="reference"`` runs), and a float64 numpy product of the dequantized V.
Crafted files (exporter.sparse_cases.QCRAFTED) are refused by the validation pass, the native kernel
and the function body. A memory test loads an export whose dense-equivalent V is 384 MB.
Seeded; no wall-clock assertions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fips_rt.exporter.sparse_cases import (QCRAFTED, qcrafted_case, random_qsparse, random_sparse,  # noqa: E402
                                           single_qnode_model)
from fips_rt.exporter.sparse_op import (DEFAULT_GROUP_SIZE, QuantizedSparse, pack_int4, quantize_sparse,  # noqa: E402
                                        unpack_int4)
from fips_rt.runtime import native  # noqa: E402
from fips_rt.runtime.session import FipsRuntimeError, create_session  # noqa: E402
from fips_rt.runtime.validate import ModelValidationError, validate_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
TOKENS = (1, 3, 16, 64, 200)
KINDS = [(8, 0), (8, 32), (8, 5), (4, 0), (4, 32), (4, 64), (4, 7)]


@pytest.fixture(scope="module")
def library():
    path = native.library_path()
    if path is None:
        pytest.skip("no native kernel library (no compiler)")
    return str(path)


def _opts(lib=None, threads=2):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = threads
    if lib is not None:
        so.register_custom_ops_library(lib)
    return so


def _session(model, lib=None, threads=2):
    return ort.InferenceSession(model.SerializeToString(), _opts(lib, threads), providers=["CPUExecutionProvider"])


def _rel(y, ref):
    return float(np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0


# ---------------------------------------------------------------------------- quantize_sparse
@pytest.mark.parametrize("bits,group", KINDS)
def test_quantize_sparse_layout_and_error(bits, group):
    _, values, mask = random_sparse(37, 45, 0.4, seed=bits + group)
    q = quantize_sparse(values, mask, 37, 45, bits, group)
    assert isinstance(q, QuantizedSparse) and q.nnz == values.size and q.bits == bits and q.group_size == group
    if bits == 8:
        assert q.qvalues.dtype == np.int8 and q.qvalues.size == q.nnz and np.abs(q.qvalues).max() <= 127
    else:
        assert q.qvalues.dtype == np.uint8 and q.qvalues.size == -(-q.nnz // 2)
        assert np.abs(q.codes()).max() <= 7
    assert q.scales.dtype == np.float32 and q.scales.size == (37 if group == 0 else -(-q.nnz // group))
    err = np.linalg.norm(q.dequantize() - values) / np.linalg.norm(values)
    assert err < (0.01 if bits == 8 else 0.2), err
    with pytest.raises(AttributeError):
        q.bits = 4  # frozen


def test_quantize_sparse_defaults_and_refusals():
    _, values, mask = random_sparse(24, 20, 0.5)
    for bits in (8, 4):
        assert quantize_sparse(values, mask, 24, 20, bits).group_size == DEFAULT_GROUP_SIZE[bits]
    for kwargs, match in [(dict(bits=6), "bits"), (dict(bits=8, group_size=-1), "group_size"),
                          (dict(bits=8, group_size=1.5), "group_size")]:
        with pytest.raises(ValueError, match=match):
            quantize_sparse(values, mask, 24, 20, **kwargs)
    with pytest.raises(ValueError, match="keeps"):
        quantize_sparse(values[:-1], mask, 24, 20, 8)
    with pytest.raises(ValueError, match="mask"):
        quantize_sparse(values, mask[:-1], 24, 20, 8)
    with pytest.raises(ValueError, match="finite"):
        quantize_sparse(np.full_like(values, np.nan), mask, 24, 20, 8)


def test_int4_packing_round_trip():
    q = np.arange(-8, 8, dtype=np.int8).repeat(3)[:47]
    p = pack_int4(q)
    assert p.size == 24 and (p[0] & 0x0F) == (q[0] & 0x0F) and (p[0] >> 4) == (q[1] & 0x0F)
    assert np.array_equal(unpack_int4(p, q.size), q)


def test_all_zero_rows_and_groups():
    """A row (or group) of zeros gets scale 0 and dequantizes to zeros."""
    _, values, mask = random_sparse(16, 24, 0.6)
    values[:20] = 0
    for bits, g in ((8, 0), (4, 4)):
        q = quantize_sparse(values, mask, 16, 24, bits, g)
        assert np.all(q.dequantize()[:16] == 0) and np.isfinite(q.scales).all()


# ---------------------------------------------------------------------------- three paths agree
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bits,group", KINDS)
@pytest.mark.parametrize("rows,cols", [(96, 264), (37, 45)], ids=["aligned", "unaligned"])
def test_native_reference_and_float64_agree(bits, group, trans_b, rows, cols, library):
    q, dense = random_qsparse(rows, cols, bits, group, density=0.4, seed=rows + bits + group)
    model = single_qnode_model(rows, cols, trans_b, q.qvalues, q.scales, q.mask, bits=bits, group_size=group,
                               a_dims=["b", "t", cols if trans_b else rows])
    nat, ref = _session(model, library), _session(model)
    for t in TOKENS:
        a = np.random.default_rng(t).standard_normal((1, t, cols if trans_b else rows)).astype(np.float32)
        want = a.astype(np.float64) @ (dense.T if trans_b else dense)
        y_nat = nat.run(None, {"A": a})[0]
        y_ref = ref.run(None, {"A": a})[0]
        assert y_nat.shape == y_ref.shape == want.shape
        assert _rel(y_nat, want) <= TOL and _rel(y_ref, want) <= TOL, (t, _rel(y_nat, want), _rel(y_ref, want))


def test_smollm2_shape_fips_like_profile(library):
    """576 x 1536 (the SmolLM2 V), density falling to empty rows, through create_session on both paths."""
    rows, cols = 576, 1536
    rng = np.random.default_rng(3)
    keep = rng.random((rows, cols)) < np.clip(0.8 * (1 - np.arange(rows) / 500), 0, None)[:, None]
    keep[[3, 7, 8, 9, 10]] = False
    mask = np.packbits(keep.reshape(-1), bitorder="little")
    values = rng.standard_normal(int(keep.sum())).astype(np.float32) * 0.05
    for bits in (8, 4):
        q = quantize_sparse(values, mask, rows, cols, bits)
        dense = np.zeros(rows * cols)
        dense[keep.reshape(-1)] = q.dequantize()
        dense = dense.reshape(rows, cols)
        for tb in (0, 1):
            model = single_qnode_model(rows, cols, tb, q.qvalues, q.scales, mask, bits=bits, group_size=q.group_size)
            a = rng.standard_normal((20, cols if tb else rows)).astype(np.float32)
            want = a.astype(np.float64) @ (dense.T if tb else dense)
            for t in (1, 20):
                y = _session(model, library).run(None, {"A": a[:t]})[0]
                assert _rel(y, want[:t]) <= TOL


def test_weights_fed_at_run_time(library):
    """qvalues, scales and mask as graph inputs: the kernel builds its tables per call."""
    rows, cols = 40, 56
    q, dense = random_qsparse(rows, cols, 4, 16, seed=1)
    model = single_qnode_model(rows, cols, 0, q.qvalues, q.scales, q.mask, bits=4, group_size=16,
                               weights_as_inputs=True)
    a = np.random.default_rng(0).standard_normal((3, rows)).astype(np.float32)
    feeds = {"A": a, "qvalues": q.qvalues, "scales": q.scales, "mask": q.mask}
    for lib in (library, None):
        y = _session(model, lib).run(None, feeds)[0]
        assert _rel(y, a.astype(np.float64) @ dense) <= TOL


def test_deterministic_across_thread_counts(library):
    q, _ = random_qsparse(576, 1536, 8, 0, density=0.5)
    model = single_qnode_model(576, 1536, 0, q.qvalues, q.scales, q.mask, bits=8, group_size=0)
    a = np.random.default_rng(5).standard_normal((2, 576)).astype(np.float32)
    outs = [_session(model, library, threads=n).run(None, {"A": a})[0] for n in (1, 2, 3)]
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])


def test_sparse_and_quantized_ops_in_one_model(library, tmp_path):
    """Both ops of the domain in one file: the validation pass counts both, both paths run it."""
    from onnx import TensorProto, helper, numpy_helper
    from fips_rt.exporter.sparse_op import qsparse_matmul_function, sparse_matmul_function
    dense1, values, mask = random_sparse(24, 32, 0.5)
    q, dense2 = random_qsparse(32, 16, 8, 0)
    nodes = [helper.make_node("SparseMatMul", ["A", "v", "m"], ["H"], domain="fips", rows=24, cols=32, transB=0),
             helper.make_node("QSparseMatMul", ["H", "q", "s", "qm"], ["Y"], domain="fips", rows=32, cols=16,
                              transB=0, bits=8, group_size=0)]
    inits = [numpy_helper.from_array(x, n) for x, n in ((values, "v"), (mask, "m"), (q.qvalues, "q"),
                                                        (q.scales, "s"), (q.mask, "qm"))]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["n", 24])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fips", 1)],
                          functions=[sparse_matmul_function(TensorProto.FLOAT, 18), qsparse_matmul_function(18)])
    m.ir_version = 9
    path = tmp_path / "two.onnx"
    onnx.save(m, str(path))
    assert validate_model(path) == 2
    a = np.random.default_rng(0).standard_normal((3, 24)).astype(np.float32)
    want = a.astype(np.float64) @ dense1.astype(np.float64) @ dense2
    for kernel in ("native", "reference"):
        sess, info = create_session(path, kernel=kernel, provider="cpu", threads=1)
        assert info.kernel == kernel and _rel(sess.run(None, {"A": a})[0], want) <= TOL


# ---------------------------------------------------------------------------- kernel levels
_LEVEL_SCRIPT = textwrap.dedent("""
    import json, numpy as np, onnxruntime as ort
    from fips_rt.exporter.sparse_cases import random_qsparse, single_qnode_model
    from fips_rt.runtime import native
    lib = str(native.library_path())
    worst = 0.0
    for bits, g in {kinds!r}:
        for tb in (0, 1):
            for rows, cols in ((96, 264), (37, 45), (64, 128), (41, 192)):
                q, dense = random_qsparse(rows, cols, bits, g, density=0.4, seed=rows + bits + g)
                m = single_qnode_model(rows, cols, tb, q.qvalues, q.scales, q.mask, bits=bits, group_size=g)
                so = ort.SessionOptions(); so.register_custom_ops_library(lib); so.intra_op_num_threads = 2
                s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for t in {tokens!r}:
                    a = np.random.default_rng(t).standard_normal((t, cols if tb else rows)).astype(np.float32)
                    want = a.astype(np.float64) @ (dense.T if tb else dense)
                    y = s.run(None, {{"A": a}})[0]
                    worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()))
    print(json.dumps({{"worst": worst, **native.kernel_info()}}))
""").format(kinds=KINDS, tokens=TOKENS)


def _cpu_levels():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_native_kernel import _cpu_levels as levels
    return levels()


def _run_at_level(script: str, level: str, extra: dict) -> dict:
    """Runs `script` in a fresh process with FIPS_SPARSE_ISA=level (and the `extra` environment; the library
    chooses its level once per process) and returns the JSON of its last line; skips where the CPU cannot run
    that level."""
    if level not in _cpu_levels():
        pytest.skip(f"this CPU cannot run the {level} kernel level")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, FIPS_SPARSE_ISA=level, **extra), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("level,extra", [("portable", {}), ("avx2", {}), ("avx512", {}),
                                         ("avx512", {"FIPS_QSPARSE_NO_VBMI2": "1"})],
                         ids=["portable", "avx2", "avx512", "avx512-without-vbmi2"])
def test_each_kernel_level_matches_float64(level, extra, library):
    """Every quantized kernel at every level this CPU runs, forced in a fresh process (the library chooses
    its level once): relative error <= 1e-4 against the float64 product of the dequantized V. At the
    AVX-512 level the int8 per-row kernels use VBMI2 where the CPU has it; the F-only form is run too."""
    out = _run_at_level(_LEVEL_SCRIPT, level, extra)
    assert out["isa"] == level and out["worst"] <= TOL, out


_LACKS_SCRIPT = textwrap.dedent("""
    import sys
    from fips_rt.runtime.session import FipsRuntimeError, create_session
    try:
        create_session(sys.argv[1], kernel="auto", provider="cpu", threads=1)
        print("loaded")
    except FipsRuntimeError as e:
        print("ERR", str(e).replace("\\n", " | "))
""")


def test_a_level_the_cpu_lacks_is_a_one_line_error(tmp_path, library):
    """A quantized export with FIPS_SPARSE_ISA forcing a level the CPU lacks (simulated): one line."""
    q, _ = random_qsparse(24, 32, 4, 32)
    path = tmp_path / "q.onnx"
    onnx.save(single_qnode_model(24, 32, 0, q.qvalues, q.scales, q.mask, bits=4, group_size=32), str(path))
    env = dict(os.environ, FIPS_SPARSE_ISA="avx512", FIPS_SPARSE_TEST_CPU_LACKS="avx512f")
    res = subprocess.run([sys.executable, "-c", _LACKS_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("ERR native sparse kernel: FIPS_SPARSE_ISA=avx512 needs avx512f, which this CPU lacks")
    assert " | " not in line


# ---------------------------------------------------------------------------- crafted inputs
def _outcome(model, a, lib=None) -> str:
    try:
        sess = _session(model, lib, threads=1)
    except Exception:  # noqa: BLE001 - onnxruntime's own exception types
        return "load"
    try:
        sess.run(None, {"A": a})
    except Exception:  # noqa: BLE001
        return "run"
    return "output"


@pytest.mark.parametrize("case", sorted(QCRAFTED))
def test_crafted_refused_by_every_path(case, library, tmp_path):
    model, a = qcrafted_case(case)
    with pytest.raises(ModelValidationError):
        validate_model(data=model.SerializeToString())
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FipsRuntimeError) as e:
        create_session(path, kernel="reference", provider="cpu", threads=1)
    assert "\n" not in str(e.value) and "fips.QSparseMatMul node" in str(e.value)
    assert _outcome(model, a) in ("load", "run")                   # the function body, plain onnxruntime
    for opset in (17,):
        m17, a17 = qcrafted_case(case, opset=opset)
        assert _outcome(m17, a17) in ("load", "run")
    nobody, _ = qcrafted_case(case, body=False)
    assert _outcome(nobody, a, library) in ("load", "run")         # the native kernel alone
    assert _outcome(model, a, library) in ("load", "run")


@pytest.mark.parametrize("case", ["q_short_scales", "q_long_scales", "q_short_qvalues", "q_long_qvalues",
                                  "q_int4_short", "q_int4_long", "q_short_mask", "q_long_mask", "q_bits_6",
                                  "q_group_negative", "q_int8_codes_for_int4", "q_uint8_codes_for_int8",
                                  "q_wrap_rows_cols", "q_transB_2"])
def test_native_kernel_refuses_at_creation(case, library):
    """Attributes and constant weights are checked when the kernel is created (the session refuses)."""
    model, a = qcrafted_case(case, body=False)
    assert _outcome(model, a, library) == "load"


def test_native_and_body_check_weights_fed_at_run_time(library):
    rows, cols = 24, 20
    _, values, mask = random_sparse(rows, cols)
    keep = np.unpackbits(mask, count=rows * cols, bitorder="little")
    if keep.sum() % 2 == 0:  # odd nnz: the int4 padding nibble exists
        keep[np.flatnonzero(keep == 0)[0]] = 1
        mask = np.packbits(keep, bitorder="little")
        values = np.ones(int(keep.sum()), np.float32)
    q = quantize_sparse(values, mask, rows, cols, 4, 8)
    model = single_qnode_model(rows, cols, 0, q.qvalues, q.scales, q.mask, bits=4, group_size=8,
                               weights_as_inputs=True, a_dims=["n", "k"])
    a = np.ones((2, rows), np.float32)
    good = {"A": a, "qvalues": q.qvalues, "scales": q.scales, "mask": mask}
    bad = {"short codes": dict(qvalues=q.qvalues[:-1]), "long codes": dict(qvalues=np.append(q.qvalues, np.uint8(0))),
           "short scales": dict(scales=q.scales[:-1]), "long scales": dict(scales=np.append(q.scales, np.float32(1))),
           "short mask": dict(mask=mask[:-1]), "int8 codes": dict(qvalues=q.qvalues.view(np.int8)),
           "2-D scales": dict(scales=q.scales.reshape(1, -1)), "A too wide": dict(A=np.ones((2, rows + 1), np.float32))}
    for lib in (library, None):
        sess = _session(model, lib)
        assert sess.run(None, good)[0].shape == (2, cols)
        for what, change in bad.items():
            try:
                sess.run(None, {**good, **change})
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                if lib is not None and what != "int8 codes":
                    assert "fips.QSparseMatMul" in str(e), (what, str(e))
            else:
                pytest.fail(f"{what}: an output came back ({'native' if lib else 'reference'})")


def test_valid_quantized_nodes_pass_the_validation():
    for bits, g in KINDS:
        q, _ = random_qsparse(24, 20, bits, g)
        for tb in (0, 1):
            m = single_qnode_model(24, 20, tb, q.qvalues, q.scales, q.mask, bits=bits, group_size=g)
            assert validate_model(data=m.SerializeToString()) == 1


# ---------------------------------------------------------------------------- memory
_MEM_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from fips_rt.procmem import proc_status_bytes
    from fips_rt.runtime import native
    path, kernel, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    if kernel == "native":
        so.register_custom_ops_library(str(native.library_path()))
    a1 = np.ones((1, k), np.float32); a64 = np.ones((64, k), np.float32)
    out = {"base": proc_status_bytes("VmRSS")}
    open("/proc/self/clear_refs", "w").write("5")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out["load_peak"] = proc_status_bytes("VmHWM"); out["loaded"] = proc_status_bytes("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    sess.run(None, {"A": a1})
    out["run1_peak"] = proc_status_bytes("VmHWM")
    open("/proc/self/clear_refs", "w").write("5")
    sess.run(None, {"A": a64})
    out["run64_peak"] = proc_status_bytes("VmHWM")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
    """Three QSparseMatMul nodes (int8 per-row and int4 g=32) of V 8192 x 4096 at ~90% sparsity, chained
    through transB 0 / 1: 128 MiB of float32 per dense V (384 MiB in all), ~15 MiB per node in the file."""
    from onnx import TensorProto, helper, numpy_helper
    from fips_rt.exporter.sparse_op import qsparse_matmul_function
    rows, cols = 8192, 4096
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    specs = [(0, 8, 0), (1, 4, 32), (0, 8, 0)]  # (transB, bits, group_size): A 8192 -> 4096 -> 8192 -> 4096
    x = "A"
    for i, (tb, bits, g) in enumerate(specs):
        keep = rng.random(rows * cols, dtype=np.float32) < 0.1
        mask = np.packbits(keep, bitorder="little")
        values = rng.standard_normal(int(keep.sum()), dtype=np.float32) * 0.01
        del keep
        q = quantize_sparse(values, mask, rows, cols, bits, g)
        inits += [numpy_helper.from_array(q.qvalues, f"q{i}"), numpy_helper.from_array(q.scales, f"s{i}"),
                  numpy_helper.from_array(mask, f"m{i}")]
        y = f"Y{i}" if i < len(specs) - 1 else "Y"
        nodes.append(helper.make_node("QSparseMatMul", [x, f"q{i}", f"s{i}", f"m{i}"], [y], domain="fips",
                                      rows=rows, cols=cols, transB=tb, bits=bits, group_size=g))
        x = y
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["n", rows])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fips", 1)],
                          functions=[qsparse_matmul_function(18)])
    m.ir_version = 9
    path = tmp_path_factory.mktemp("qbig") / "big.onnx"
    onnx.save(m, str(path))
    return path, rows * cols * 4, rows


@pytest.mark.parametrize("kernel", ["native", "reference"])
def test_memory_stays_compact(kernel, big_export, library):
    """Native: no dense V at load nor in a decode (T=1) or prefill (T=64) forward: the growth stays far below
    one dense V (128 MiB). Reference (function body): the load stays ~ the file size (nothing folded into a
    float V); a forward holds at most about one node's dense V at a time (the body's transient is ~3.2x one
    V, docs/sparse-op.md; three at once would be >= 3x)."""
    path, dense_v, k = big_export
    file_bytes = path.stat().st_size
    assert validate_model(path) == 3
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(path), kernel, str(k)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    load_growth = m["load_peak"] - m["base"]
    assert load_growth < 2 * file_bytes + (32 << 20), (load_growth, file_bytes)
    assert load_growth < dense_v / 2
    if kernel == "native":
        for key in ("run1_peak", "run64_peak"):
            assert m[key] - m["loaded"] < dense_v / 4, (key, m)
    else:
        assert m["run1_peak"] - m["loaded"] < 4.5 * dense_v, m


# ---------------------------------------------------------------------------- activation_bits = 8
# The opt-in int8-activation kernels (docs/sparse-op.md, "activation_bits"): A quantized per call to int8,
# one scale per block of the reduction axis (transB=1: 128 columns of A; transB=0: 64 rows of A * scales),
# int8 x int8 products accumulated exactly (AVX-512 VNNI). Everywhere else (other code kinds, cols % 64 != 0,
# CPUs without VNNI, the reference body) the product stays exact.
ACT8_TOL = 3e-2  # stated tolerance (max |y - y64| / max |y64|) against the float64 product of the dequantized V
ACT8_SHAPES = [(576, 1536), (96, 256), (37, 64), (130, 192), (5, 128)]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_HAS_VNNI = {"avx512f", "avx512bw", "avx512_vbmi2", "avx512_vnni"} <= _cpu_flags()
_HAS_AVX2 = {"avx2", "fma", "popcnt"} <= _cpu_flags()


def _act8_native(trans_b: int) -> bool:
    """The default native level quantizes A on this CPU: the VNNI kernels (both layouts) or the AVX2 one (transB=1)."""
    return _HAS_VNNI or (trans_b == 1 and _HAS_AVX2)


def _act8_model(rows, cols, tb, q, bits=8, group=0, act_bits=8, **kw):
    from onnx import helper
    m = single_qnode_model(rows, cols, tb, q.qvalues, q.scales, q.mask, bits=bits, group_size=group, **kw)
    m.graph.node[0].attribute.append(helper.make_attribute("activation_bits", act_bits))
    return m


def _quant_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """What the kernel does to A: int8, symmetric, one scale (max |x| / 127) per `block` entries of the last
    axis (the last block what remains), round half to even; returned dequantized, float64."""
    t, k = x.shape
    kp = -(-k // block) * block
    xp = np.zeros((t, kp), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(t, -1, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q * (amax / np.float32(127))).reshape(t, kp)[:, :k].astype(np.float64)


def _act8_emulation(a, q, rows, cols, tb):
    codes = q.codes().astype(np.float64)
    keep = np.unpackbits(q.mask, count=rows * cols, bitorder="little").astype(bool)
    c = np.zeros(rows * cols)
    c[keep] = codes
    c = c.reshape(rows, cols)
    s = q.scales.astype(np.float32)
    if tb:
        return (_quant_blocks(a, 128) @ c.T) * s
    nonempty = keep.reshape(rows, cols).any(1)
    return _quant_blocks(((a * s) * nonempty).astype(np.float32), 64) @ c


@pytest.mark.parametrize("trans_b", [0, 1])
def test_activation_bits_8_is_the_stated_quantization(trans_b, library):
    """activation_bits=8, int8 per-row codes: the native output is the documented computation (numpy emulation
    of the activation quantization, to float32 rounding) where a quantized-activation kernel runs (VNNI: both
    layouts; AVX2: transB=1), and within ACT8_TOL of the
    exact float64 product on every path; the reference body (and activation_bits=0) stay exact."""
    worst = 0.0
    for rows, cols in ACT8_SHAPES:
        q, dense = random_qsparse(rows, cols, 8, 0, density=0.47, seed=rows + cols)
        model, exact_model = _act8_model(rows, cols, trans_b, q), _act8_model(rows, cols, trans_b, q, act_bits=0)
        nat, ref, ex = _session(model, library), _session(model), _session(exact_model, library)
        for t in (1, 3, 4, 5, 16):
            a = np.random.default_rng(t).standard_normal((t, cols if trans_b else rows)).astype(np.float32)
            want = a.astype(np.float64) @ (dense.T if trans_b else dense)
            y = nat.run(None, {"A": a})[0]
            assert _rel(y, want) <= ACT8_TOL, (rows, cols, t, _rel(y, want))
            worst = max(worst, _rel(y, want))
            if _act8_native(trans_b):
                assert _rel(y, _act8_emulation(a, q, rows, cols, trans_b)) <= 1e-5, (rows, cols, t)
            assert _rel(ref.run(None, {"A": a})[0], want) <= TOL
            assert _rel(ex.run(None, {"A": a})[0], want) <= TOL
    if _act8_native(trans_b):
        assert worst > TOL  # the quantized kernels did run
    else:
        assert worst <= TOL


def test_activation_bits_8_heavy_tailed_and_empty_rows(library):
    """Student-t (df 3) activations, rows and 64-row blocks pruned empty, an int8 code of -128: still the
    emulation where a quantized-activation kernel runs and within ACT8_TOL."""
    rows, cols = 200, 320
    rng = np.random.default_rng(7)
    keep = rng.random((rows, cols)) < 0.45
    keep[64:128] = False
    keep[[3, 5, 150]] = False
    mask = np.packbits(keep.reshape(-1), bitorder="little")
    values = (rng.standard_normal(int(keep.sum())) * 0.05).astype(np.float32)
    q = quantize_sparse(values, mask, rows, cols, 8, 0)
    qv = q.qvalues.copy()
    qv[::97] = -128
    q = QuantizedSparse(qv, q.scales, q.mask, rows, cols, 8, 0, q.nnz)
    keep_f = keep.reshape(-1)
    dense = np.zeros(rows * cols)
    dense[keep_f] = q.dequantize()
    dense = dense.reshape(rows, cols)
    for tb in (0, 1):
        sess = _session(_act8_model(rows, cols, tb, q), library)
        for t in (1, 7):
            a = rng.standard_t(3, size=(t, cols if tb else rows)).astype(np.float32)
            want = a.astype(np.float64) @ (dense.T if tb else dense)
            y = sess.run(None, {"A": a})[0]
            assert _rel(y, want) <= ACT8_TOL, (tb, t, _rel(y, want))
            if _act8_native(tb):
                assert _rel(y, _act8_emulation(a, q, rows, cols, tb)) <= 1e-5, (tb, t)


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 0), (4, 32)])
def test_activation_bits_8_other_kinds_stay_exact(bits, group, library):
    """activation_bits=8 on codes the quantized-activation kernels do not take (grouped scales, int4) and on
    cols % 64 != 0: the exact kernels run (<= 1e-4)."""
    for rows, cols, g in ((96, 256, group), (40, 72, 0 if bits == 8 else group)):
        q, dense = random_qsparse(rows, cols, bits, g, density=0.4, seed=rows)
        for tb in (0, 1):
            sess = _session(_act8_model(rows, cols, tb, q, bits=bits, group=g), library)
            a = np.random.default_rng(1).standard_normal((3, cols if tb else rows)).astype(np.float32)
            assert _rel(sess.run(None, {"A": a})[0], a.astype(np.float64) @ (dense.T if tb else dense)) <= TOL


def test_activation_bits_8_deterministic_across_thread_counts(library):
    q, _ = random_qsparse(576, 1536, 8, 0, density=0.5)
    for tb in (0, 1):
        model = _act8_model(576, 1536, tb, q)
        a = np.random.default_rng(5).standard_normal((2, 1536 if tb else 576)).astype(np.float32)
        outs = [_session(model, library, threads=n).run(None, {"A": a})[0] for n in (1, 2, 3)]
        assert all(np.array_equal(o, outs[0]) for o in outs[1:])


_ACT8_LEVEL_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, onnxruntime as ort
    from onnx import helper
    from fips_rt.exporter.sparse_cases import random_qsparse, single_qnode_model
    from fips_rt.runtime import native
    lib = str(native.library_path())
    worst, emul = {}, {}
    for tb in (0, 1):
        worst[tb] = emul[tb] = 0.0
        for rows, cols in ((96, 256), (37, 64), (41, 192)):
            q, dense = random_qsparse(rows, cols, 8, 0, density=0.4, seed=rows)
            m = single_qnode_model(rows, cols, tb, q.qvalues, q.scales, q.mask, bits=8, group_size=0)
            m.graph.node[0].attribute.append(helper.make_attribute("activation_bits", 8))
            so = ort.SessionOptions(); so.register_custom_ops_library(lib); so.intra_op_num_threads = 2
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for t in (1, 5, 16):
                a = np.random.default_rng(t).standard_normal((t, cols if tb else rows)).astype(np.float32)
                want = a.astype(np.float64) @ (dense.T if tb else dense)
                y = s.run(None, {"A": a})[0]
                worst[tb] = max(worst[tb], float(np.abs(y - want).max() / np.abs(want).max()))
                emul[tb] = max(emul[tb], _rel(y, _act8_emulation(a, q, rows, cols, tb)))
    print(json.dumps({"worst": [worst[0], worst[1]], "emulation": [emul[0], emul[1]], **native.kernel_info()}))
""")


@pytest.mark.parametrize("level,extra", [("portable", {}), ("avx2", {}), ("avx2", {"FIPS_QSPARSE_NO_ACT8": "1"}),
                                         ("avx512", {}), ("avx512", {"FIPS_QSPARSE_NO_VNNI": "1"}),
                                         ("avx512", {"FIPS_QSPARSE_NO_ACT8": "1"})],
                         ids=["portable", "avx2", "avx2-no-act8", "avx512", "avx512-without-vnni", "avx512-no-act8"])
def test_activation_bits_8_at_each_kernel_level(level, extra, library):
    """Which layouts each level quantizes A in: AVX-512 with VNNI both, AVX2 (and AVX-512 without VNNI) transB=1,
    portable and FIPS_QSPARSE_NO_ACT8=1 none. A quantizing layout is the documented computation (the numpy
    emulation to 1e-5) and within ACT8_TOL of the float64 product; the others are exact."""
    import inspect
    helpers = "\n".join(inspect.getsource(f) for f in (_rel, _quant_blocks, _act8_emulation))
    out = _run_at_level("import numpy as np\n" + helpers + _ACT8_LEVEL_SCRIPT, level, extra)
    assert out["isa"] == level
    for tb in (0, 1):
        if "FIPS_QSPARSE_NO_ACT8" in extra or level == "portable":
            quantizes = False
        elif level == "avx512" and _HAS_VNNI and "FIPS_QSPARSE_NO_VNNI" not in extra:
            quantizes = True
        else:
            quantizes = tb == 1
        if quantizes:
            assert TOL < out["worst"][tb] <= ACT8_TOL, (tb, out)
            assert out["emulation"][tb] <= 1e-5, (tb, out)
        else:
            assert out["worst"][tb] <= TOL, (tb, out)


@pytest.mark.parametrize("value", [4, 16, -8, "float", "twice"])
def test_bad_activation_bits_refused_by_every_path(value, library, tmp_path):
    from onnx import helper
    q, _ = random_qsparse(24, 64, 8, 0)
    model = single_qnode_model(24, 64, 0, q.qvalues, q.scales, q.mask, bits=8, group_size=0)
    nobody = single_qnode_model(24, 64, 0, q.qvalues, q.scales, q.mask, bits=8, group_size=0, body=False)
    for m in (model, nobody):
        attrs = m.graph.node[0].attribute
        if value == "float":
            attrs.append(helper.make_attribute("activation_bits", 8.0))
        elif value == "twice":
            attrs.extend([helper.make_attribute("activation_bits", 8), helper.make_attribute("activation_bits", 0)])
        else:
            attrs.append(helper.make_attribute("activation_bits", value))
    with pytest.raises(ModelValidationError, match="activation_bits"):
        validate_model(data=model.SerializeToString())
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FipsRuntimeError, match="activation_bits"):
        create_session(path, kernel="native", provider="cpu", threads=1)
    if value == "twice":  # a repeated attribute: the validation pass refuses it (rule 2)
        return
    a = np.ones((2, 24), np.float32)
    assert _outcome(nobody, a, library) == "load"  # the native kernel alone, at creation
    assert _outcome(model, a) in ("load", "run")   # the function body, plain onnxruntime
