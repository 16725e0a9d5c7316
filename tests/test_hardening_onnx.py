"""Crafted fips.SparseMatMul files (issue 10): refused by every path, never a crash, never an output.

The rule (docs/sparse-op.md) is enforced three times, independently: by the Python validation pass
that every runtime entry point runs before onnxruntime (runtime/validate.py), by the native kernel
(runtime/kernels, checked here with the validation pass bypassed), and by the function body in a
plain onnxruntime with no fips-rt library at all (exporter/sparse_op.py). Each crafted case of
``fips_rt.exporter.sparse_cases.CRAFTED`` goes through all of them; valid files still give the
same result on both kernel paths. The last test runs the native-kernel tests once more against an
AddressSanitizer build of the library, in a subprocess.
Seeded, bounded; no wall-clock assertions.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, numpy_helper  # noqa: E402

from fips_rt.exporter.sparse_cases import CRAFTED, crafted_case, random_sparse, single_node_model  # noqa: E402
from fips_rt.runtime import native  # noqa: E402
from fips_rt.runtime.session import FipsRuntimeError, create_session  # noqa: E402
from fips_rt.runtime.validate import ModelValidationError, validate_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(CRAFTED)
VARIANTS = [(18, TensorProto.FLOAT), (17, TensorProto.FLOAT), (18, TensorProto.FLOAT16), (17, TensorProto.FLOAT16)]
VARIANT_IDS = ["opset18-fp32", "opset17-fp32", "opset18-fp16", "opset17-fp16"]


@pytest.fixture(scope="module")
def library():
    path = native.library_path()
    if path is None:
        pytest.skip("no native kernel library (no compiler)")
    return path


def _write(model, tmp_path, name="model.onnx") -> Path:
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def _quiet_options(lib=None):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return so


def _outcome(model_bytes, a, lib=None) -> str:
    """'load' / 'run' (where onnxruntime raised) or 'output' (it returned one: the failure)."""
    try:
        sess = ort.InferenceSession(model_bytes, _quiet_options(lib), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime's own exception types
        return "load"
    try:
        sess.run(None, {"A": a})
    except Exception:  # noqa: BLE001
        return "run"
    return "output"


# ---------------------------------------------------------------------------- entry points
@pytest.mark.parametrize("kernel", ["native", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_create_session_refuses(case, kernel, tmp_path, library):
    model, _ = crafted_case(case)
    path = _write(model, tmp_path)
    with pytest.raises(FipsRuntimeError) as e:
        create_session(path, kernel=kernel, provider="cpu", threads=1)
    msg = str(e.value)
    assert "\n" not in msg and "fips.SparseMatMul node" in msg and "invalid model" in msg, msg


@pytest.mark.parametrize("case", ["wrap_rows_cols", "short_mask", "long_mask", "wrong_a_shape"])
def test_model_load_refuses(case, tmp_path):
    from fips_rt.runtime import Model
    model, _ = crafted_case(case, opset=17, elem_type=TensorProto.FLOAT16)
    path = _write(model, tmp_path)
    with pytest.raises(FipsRuntimeError, match="invalid model"):
        Model.load(path, kernel="auto", provider="cpu", threads=1)


@pytest.mark.parametrize("case", ["wrap_rows_cols", "short_values", "mask_2d"])
def test_fips_bench_cli_refuses_in_one_line(case, tmp_path):
    model, _ = crafted_case(case)
    path = _write(model, tmp_path)
    res = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "bench", str(path), "--repetitions", "1",
                          "--warmup", "0", "--threads", "1", "--prompt-lengths", "1", "--decode-tokens", "0"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    # the reason, one line (the CLI names it in its progress log and in its final error)
    lines = [ln for ln in res.stderr.splitlines() if "invalid model" in ln]
    assert lines and all("fips.SparseMatMul node" in ln for ln in lines), out
    assert lines[-1].startswith(str(path)), out


def test_fips_serve_cli_refuses_in_one_line(tmp_path):
    model, _ = crafted_case("long_mask")
    path = _write(model, tmp_path)
    res = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "serve", str(path), "--port", "0",
                          "--threads", "1", "--provider", "cpu"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "invalid model" in lines[0] and "mask has 61 bytes" in lines[0], out


def test_fips_eval_of_an_onnx_file_refuses(tmp_path):
    """``fips eval MODEL.onnx`` (evaluated in onnxruntime) goes through Model.load too."""
    import fips_rt.cli as cli
    if not hasattr(cli, "_is_onnx"):
        pytest.skip("this fips has no onnx evaluation")
    model, _ = crafted_case("wrap_rows_cols")
    path = _write(model, tmp_path)
    res = subprocess.run([sys.executable, "-c", "from fips_rt.cli import main; main()", "eval", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    assert "invalid model" in out and "rows * cols" in out, out


def test_valid_exported_nodes_pass_the_validation(tmp_path):
    _, values, mask = random_sparse(24, 20)
    for tb in (0, 1):
        assert validate_model(data=single_node_model(24, 20, tb, values, mask).SerializeToString()) == 1


# ---------------------------------------------------------------------------- plain onnxruntime
@pytest.mark.parametrize("opset,elem_type", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", CASES)
def test_plain_onnxruntime_never_returns_an_output(case, opset, elem_type):
    """No fips-rt at all: the function body of an invalid node raises at load or at run time."""
    model, a = crafted_case(case, opset=opset, elem_type=elem_type)
    assert _outcome(model.SerializeToString(), a) in ("load", "run")


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("case", ["short_mask", "long_mask", "short_values", "long_values", "mask_2d", "mask_int8"])
def test_plain_onnxruntime_with_weights_fed_at_run_time(case, opset):
    """values and mask as graph inputs (nothing to check before the run): the body raises at run time."""
    model, a = crafted_case(case, opset=opset)
    feeds = {"A": a}
    for t in model.graph.initializer:
        feeds[t.name] = numpy_helper.to_array(t)
    fed = single_node_model(24, 20, 0, feeds["values"], feeds["mask"], opset=opset, weights_as_inputs=True)
    try:  # a declared wrong dtype already fails at load
        sess = ort.InferenceSession(fed.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime's own exception types
        assert case == "mask_int8"
        return
    with pytest.raises(Exception):  # noqa: B017
        sess.run(None, feeds)


def test_plain_onnxruntime_valid_results(library):
    """Valid nodes: the hardened body and the native kernel agree with numpy (fp32 and fp16, both opsets)."""
    for opset, elem_type in VARIANTS:
        np_type = np.float32 if elem_type == TensorProto.FLOAT else np.float16
        for tb, (rows, cols), lead in ((0, (37, 45), (2, 3)), (1, (37, 45), (2, 3)), (0, (8, 1), (1, 4)),
                                       (1, (1, 9), (3, 1)), (0, (5, 7), (2, 0)), (1, (5, 7), (0, 3))):
            dense, values, mask = random_sparse(rows, cols, seed=rows + tb, dtype=np_type)
            a = np.random.default_rng(tb).standard_normal((*lead, cols if tb else rows)).astype(np_type)
            model = single_node_model(rows, cols, tb, values, mask, a_dims=["b", "s", cols if tb else rows],
                                      elem_type=elem_type, opset=opset)
            ref = a.astype(np.float64) @ (dense.T if tb else dense).astype(np.float64)
            tol = 1e-4 if np_type is np.float32 else 2e-2
            for lib in (None, library):
                y = ort.InferenceSession(model.SerializeToString(), _quiet_options(lib),
                                         providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
                assert y.shape == ref.shape and y.dtype == np_type
                assert ref.size == 0 or np.abs(y.astype(np.float64) - ref).max() <= tol * max(1.0, np.abs(ref).max())


# ---------------------------------------------------------------------------- native kernel
@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("body", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_native_kernel_refuses(case, body, elem_type, library):
    """The library registered straight with onnxruntime (no validation pass): an error, no crash.
    (float16 nodes run on the float32 kernel through Casts onnxruntime inserts.)"""
    model, a = crafted_case(case, body=body, elem_type=elem_type)
    assert _outcome(model.SerializeToString(), a, library) in ("load", "run")


@pytest.mark.parametrize("case", ["short_mask", "long_mask", "short_values", "long_values", "mask_2d",
                                  "wrap_rows_cols", "transB_2"])
def test_native_kernel_refuses_at_creation(case, library):
    """Attributes and constant (initializer) weights are checked when the kernel is created."""
    model, a = crafted_case(case, body=False)
    assert _outcome(model.SerializeToString(), a, library) == "load"


def test_native_kernel_checks_weights_fed_at_run_time(library):
    rows, cols = 24, 20
    _, values, mask = random_sparse(rows, cols)
    model = single_node_model(rows, cols, 0, values, mask, body=False, weights_as_inputs=True, a_dims=["n", "k"])
    sess = ort.InferenceSession(model.SerializeToString(), _quiet_options(library), providers=["CPUExecutionProvider"])
    a = np.ones((2, rows), np.float32)
    assert sess.run(None, {"A": a, "values": values, "mask": mask})[0].shape == (2, cols)
    bad = {"short mask": (values, mask[:-1]), "long mask": (values, np.append(mask, 0).astype(np.uint8)),
           "short values": (values[:-1], mask), "long values": (np.append(values, 1).astype(np.float32), mask),
           "2-D mask": (values, mask.reshape(2, -1)), "2-D values": (values.reshape(1, -1), mask)}
    for what, (v, m) in bad.items():
        try:
            sess.run(None, {"A": a, "values": v, "mask": m})
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            assert "fips.SparseMatMul" in str(e), (what, str(e))
        else:
            pytest.fail(f"{what}: the kernel returned an output")
    with pytest.raises(Exception, match="last dimension"):
        sess.run(None, {"A": np.ones((2, rows + 1), np.float32), "values": values, "mask": mask})


# ---------------------------------------------------------------------------- external data, malformed files
def _external_model(tmp_path, **override):
    _, values, mask = random_sparse(24, 20)
    model = single_node_model(24, 20, 0, values, mask)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        if t.name == "mask":
            entries = {e.key: e.value for e in t.external_data}
            entries.update(override)
            del t.external_data[:]
            for k, v in entries.items():
                e = t.external_data.add()
                e.key, e.value = k, v
    onnx.save(m, str(path))
    return path


def test_external_data_valid(tmp_path):
    assert validate_model(_external_model(tmp_path)) == 1


@pytest.mark.parametrize("override,match", [
    ({"location": "../outside.data"}, "inside the model folder"),
    ({"location": "/etc/passwd"}, "inside the model folder"),
    ({"location": "missing.data"}, "inside the model folder"),
    ({"offset": "-8"}, "negative"),
    ({"offset": str(2 ** 62)}, "beyond the end"),
    ({"length": "7"}, "needs 60"),
    ({"length": "abc"}, "not integers"),
])
def test_external_data_attacks_refused(tmp_path, override, match):
    (tmp_path.parent / "outside.data").write_bytes(b"\xff" * 4096)
    path = _external_model(tmp_path, **override)
    with pytest.raises(ModelValidationError, match=match):
        validate_model(path)
    with pytest.raises(FipsRuntimeError, match=match):
        create_session(path, kernel="reference", provider="cpu", threads=1)


def test_symlink_out_of_the_model_folder_refused(tmp_path):
    path = _external_model(tmp_path)
    outside = tmp_path.parent / "elsewhere.data"
    shutil.copy(tmp_path / "model.onnx.data", outside)
    (tmp_path / "model.onnx.data").unlink()
    (tmp_path / "model.onnx.data").symlink_to(outside)
    with pytest.raises(ModelValidationError, match="inside the model folder"):
        validate_model(path)


def test_mutated_bytes_give_one_line_or_pass():
    """Seeded truncations and byte flips of a valid file: the pass raises ModelValidationError (one
    line) or accepts, never another exception."""
    _, values, mask = random_sparse(24, 20)
    data = bytearray(single_node_model(24, 20, 1, values, mask).SerializeToString())
    rng = np.random.default_rng(10)
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(400):
        mutated = bytearray(data)
        if i % 3 == 0:
            mutated = mutated[: int(rng.integers(0, len(mutated)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        try:
            validate_model(data=bytes(mutated))
            outcomes["accepted"] += 1
        except ModelValidationError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["accepted"] > 0, outcomes


def test_subgraph_nodes_are_checked():
    """A crafted node inside an If branch is found too."""
    from onnx import helper
    inner, _ = crafted_case("short_mask")
    branch = helper.make_graph(list(inner.graph.node), "then", [], [helper.make_tensor_value_info("Y", 1, None)],
                               initializer=list(inner.graph.initializer))
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["Y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [cond, *inner.graph.input], [helper.make_tensor_value_info("Y", 1, None)])
    model = helper.make_model(graph, opset_imports=list(inner.opset_import), functions=list(inner.functions))
    with pytest.raises(ModelValidationError, match="mask has 59 bytes"):
        validate_model(data=model.SerializeToString())


def test_the_runtime_needs_no_onnx_package():
    """validate.py and session.py import neither onnx nor google.protobuf (a later issue drops onnx)."""
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['torch'] = None\n"
            "from fips_rt.runtime.validate import validate_model\n"
            "from fips_rt.runtime import session\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---------------------------------------------------------------------------- AddressSanitizer
def _asan_runtime() -> list[str] | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        p = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(p) or not os.path.exists(p):
            return None
        libs.append(p)
    return libs


def test_kernel_tests_clean_under_address_sanitizer(tmp_path):
    """The native-kernel tests and the crafted cases, once, against a -fsanitize=address build of the
    library (native.py's custom-flags build, its own cache entry), in a subprocess with libasan
    preloaded (libstdc++ too, so that ASan finds the real __cxa_throw). Leak detection is off
    (Python itself leaks at exit)."""
    preload = _asan_runtime()
    if preload is None or shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        pytest.skip("gcc with libasan is needed")
    flags = " ".join(native.ASAN_FLAGS)
    lib = native.library_path(extra_flags=flags)
    assert lib is not None and lib != native.library_path()
    assert b"__asan_init" in lib.read_bytes()
    env = dict(os.environ, FIPS_RT_CXXFLAGS=flags, LD_PRELOAD=" ".join(preload),
               ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0", FIPS_SPARSE_SERIAL="0")
    selection = [
        "tests/test_native_kernel.py::test_odd_shapes",
        "tests/test_native_kernel.py::test_smollm2_shapes",
        "tests/test_native_kernel.py::test_token_counts_hit_every_block_path",
        "tests/test_native_kernel.py::test_all_zero_and_all_one_masks",
        "tests/test_native_kernel.py::test_weights_as_graph_inputs",
        "tests/test_native_kernel.py::test_float16_nodes_run_with_the_library_registered",
        "tests/test_native_kernel.py::test_bad_inputs_raise_clear_errors",
        # the portable level and the best one this CPU has, each in its own (ASan-preloaded) process
        "tests/test_native_kernel.py::test_each_kernel_level_matches_the_reference[portable]",
        "tests/test_native_kernel.py::test_each_kernel_level_matches_the_reference[auto]",
        "tests/test_hardening_onnx.py::test_native_kernel_refuses",
        "tests/test_hardening_onnx.py::test_native_kernel_refuses_at_creation",
        "tests/test_hardening_onnx.py::test_native_kernel_checks_weights_fed_at_run_time",
        # fips.QSparseMatMul (tests/test_quant_kernel.py): every kernel kind in-process (the best level),
        # the portable level in its own process, crafted and run-time-fed inputs
        "tests/test_quant_kernel.py::test_native_reference_and_float64_agree",
        "tests/test_quant_kernel.py::test_each_kernel_level_matches_float64[portable]",
        "tests/test_quant_kernel.py::test_native_kernel_refuses_at_creation",
        "tests/test_quant_kernel.py::test_native_and_body_check_weights_fed_at_run_time",
        "tests/test_quant_kernel.py::test_weights_fed_at_run_time",
        # the int8-activation (VNNI) kernels where the CPU has them: their task split and tails
        "tests/test_quant_kernel.py::test_activation_bits_8_is_the_stated_quantization",
        "tests/test_quant_kernel.py::test_activation_bits_8_heavy_tailed_and_empty_rows",
        "tests/test_quant_kernel.py::test_activation_bits_8_deterministic_across_thread_counts",
    ]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    out = res.stdout + res.stderr
    assert "ERROR: AddressSanitizer" not in out, out[-6000:]
    assert res.returncode == 0, out[-6000:]
    summary = [ln for ln in res.stdout.splitlines() if ln.strip()][-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, summary


def test_weights_stored_as_int32_data_or_float_data():
    """A mask in int32_data (varints) and values in float_data are read as onnxruntime reads them."""
    _, values, mask = random_sparse(24, 20, density=0.6)
    model = single_node_model(24, 20, 0, values, mask)
    inits = {t.name: t for t in model.graph.initializer}
    inits["mask"].ClearField("raw_data")
    inits["mask"].int32_data.extend(int(x) for x in mask)
    inits["values"].ClearField("raw_data")
    inits["values"].float_data.extend(float(x) for x in values)
    assert validate_model(data=model.SerializeToString()) == 1
    inits["mask"].int32_data[3] = 300
    with pytest.raises(ModelValidationError, match="out of range"):
        validate_model(data=model.SerializeToString())
    inits["mask"].int32_data[3] = int(mask[3])
    inits["mask"].int32_data.append(0)
    with pytest.raises(ModelValidationError, match="holds 61 entries"):
        validate_model(data=model.SerializeToString())
    del inits["mask"].int32_data[-1]
    del inits["values"].float_data[-1]
    with pytest.raises(ModelValidationError, match="values: holds"):
        validate_model(data=model.SerializeToString())
