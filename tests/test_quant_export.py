"""Quantized exports (fips export --weights int8|int4): the graph onnxruntime's MatMulNBitsQuantizer made,
the shared embedding, fips.QSparseMatMul for FiPS V, the contract's quantization/session records, the
--prepacking plumbing, `fips info` bytes per part, and one-line errors for bad flags. Tiny random Llama
(tied embedding) models, FiPS and dense."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from fips_rt.runtime import contract as C
from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir

pytestmark = needs_exporter

LAYERS = 4  # fips_rt.testing.tiny_model
# quantization tolerance on the logits of a 12-token prompt against the fp32 export of the same model:
# mean |difference| / standard deviation of the fp32 logits (measured: int8 ~0.01, int4 ~0.1)
TOLERANCE = {"int8": 0.04, "int4": 0.3}
PROMPT = [5, 17, 300, 4096, 12, 7, 99, 1000, 3, 45, 600, 2]


def _ops(folder):
    import onnx
    m = onnx.load(str(folder / "model.onnx"))
    return m, Counter(n.op_type for n in m.graph.node)


def _logits(folder, **kw):
    from fips_rt.runtime import Model
    m = Model.load(folder, threads=1, kernel="reference", **kw)
    return m, np.asarray(m.sequence_logits(PROMPT), np.float64)


@pytest.mark.parametrize("kind", ["fips", "dense"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_export_runs_close_to_fp32(kind, weights):
    folder = tiny_lm_dir(kind, weights=weights)
    proto, ops = _ops(folder)
    # every weight product went to MatMulNBits: attention (q, k, v, o) per layer, the tied head, the dense
    # MLPs' gate/up/down, and the FiPS basis products x·U and t·Uᵀ (8-bit, the default); FiPS V's are
    # QSparseMatMul
    mlp_nodes = 3 if kind == "dense" else 2  # FiPS: x·U (shared by gate and up) and t·Uᵀ per layer
    assert ops["MatMulNBits"] == LAYERS * (4 + mlp_nodes) + 1
    inits = {t.name for t in proto.graph.initializer}
    float_products = [n.input[1] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert float_products == [] and ops["Gemm"] == 0  # no float weight product left
    # int8 per-row V with int8 activations: gate and up fused into one node per layer (exporter.layers._fused_gate_up)
    fused = kind == "fips" and weights == "int8"
    assert ops["QSparseMatMul"] == ((2 if fused else 3) * LAYERS if kind == "fips" else 0) and ops["SparseMatMul"] == 0
    assert ops["Split"] == (LAYERS if fused else 0)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    bits = {8: "int8", 4: "int4"}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":  # (the basis products: 8-bit whatever --weights says)
            want = "int8" if n.input[1].startswith("fips.basis.") else weights
            assert bits[next(a.i for a in n.attribute if a.name == "bits")] == want
    m, got = _logits(folder)
    assert m.info.prepacking is True and m.info.prepacking_source == "contract"
    _, ref = _logits(tiny_lm_dir(kind))
    err = np.abs(got - ref).mean() / ref.std()
    assert err < TOLERANCE[weights], err
    if weights == "int8":  # (int4 on a random model with near-flat logits: top-1 is noise)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    c = C.read_contract(folder)
    q = c.quantization
    assert (q.weights, q.block_size, q.accuracy_level, q.embedding) == (weights, 32, 4, "shared-with-head")
    assert q.matmul_nbits_nodes == ops["MatMulNBits"] and "MatMulNBitsQuantizer" in q.quantizer
    assert c.session.prepacking is True and c.format_version == C.FORMAT_VERSION == 2
    assert c.sparse_op.quantized_nodes == ops["QSparseMatMul"]
    assert (q.sparse_bits is not None) == (kind == "fips")
    assert q.basis_weights == ("int8" if kind == "fips" else None)


def test_shared_embedding_reads_exactly_the_heads_quantized_rows():
    """The tied table is one copy: GatherBlockQuantized on the head's MatMulNBits tensors returns the
    rows MatMulNBits multiplies with (checked by running both on the file's own initializers)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    proto, _ = _ops(tiny_lm_dir("dense", weights="int4"))
    inits = {t.name: t for t in proto.graph.initializer}
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gbq.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    k, n_rows = attrs["K"], attrs["N"]
    unsq = next(n for n in proto.graph.node if n.output[0] == gbq.input[2])
    nodes = [helper.make_node("MatMulNBits", ["eye", head.input[1], head.input[2]], ["wt"], domain="com.microsoft",
                              **attrs),
             helper.make_node("Unsqueeze", [unsq.input[0], unsq.input[1]], ["s3"]),
             helper.make_node("GatherBlockQuantized", [gbq.input[0], "ids", "s3"], ["rows"], domain="com.microsoft",
                              **{a.name: helper.get_attribute_value(a) for a in gbq.attribute})]
    used = [inits[x] for x in (head.input[1], head.input[2], unsq.input[1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("eye", TensorProto.FLOAT, [k, k]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("wt", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], used)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 1, 77, n_rows - 1], np.int64)
    wt, rows = s.run(None, {"eye": np.eye(k, dtype=np.float32), "ids": ids})
    # the same codes and scales (the product of a code with its scale may differ by one rounding)
    np.testing.assert_allclose(rows.reshape(len(ids), -1)[:, :k], wt[:, ids].T, rtol=1e-6, atol=1e-6)
    assert not any(t.name.startswith("model.embed_tokens") for t in proto.graph.initializer)  # no float table


def test_contract_quantization_round_trips_and_is_strict():
    record = json.loads((tiny_lm_dir("fips", weights="int8") / C.CONFIG_FILE).read_text())
    c = C.ExportContract.from_json(copy.deepcopy(record))
    assert c.to_json() == record

    def refused(d, match):
        with pytest.raises(C.ContractError, match=match) as e:
            C.ExportContract.from_json(d)
        assert "\n" not in str(e.value)

    for key, value, match in [("weights", "int3", "weights"), ("block_size", 33, "block_size"),
                              ("block_size", None, "block_size"), ("accuracy_level", 5, "accuracy_level"),
                              ("accuracy_level", "4", "accuracy_level must be an integer"),
                              ("sparse_bits", 4, "sparse_bits"), ("embedding", "magic", "embedding"),
                              ("basis_weights", "int4", "basis_weights"),
                              ("extra", 1, "unknown key 'quantization.extra'")]:
        d = copy.deepcopy(record)
        d["quantization"][key] = value
        refused(d, match)
    d = copy.deepcopy(record)
    d["session"]["prepacking"] = "yes"
    refused(d, "prepacking must be true or false")
    for key in ("quantization", "session"):
        d = copy.deepcopy(record)
        del d[key]
        refused(d, f"missing key '{key}'")
    d = copy.deepcopy(record)
    d["dtype"] = "fp16"
    refused(d, "compute in fp32")
    d = copy.deepcopy(record)
    d["sparse_op"]["quantized_nodes"] = -1
    refused(d, "out of range")
    # a version-1 record (no quantization/session keys) still reads: float weights, prepacking off
    old = json.loads((tiny_lm_dir("fips") / C.CONFIG_FILE).read_text())
    for key in ("quantization", "session"):
        del old[key]
    del old["sparse_op"]["quantized_nodes"]
    old["format_version"] = 1
    c1 = C.ExportContract.from_json(copy.deepcopy(old))
    assert c1.quantization.weights == "fp32" and c1.session.prepacking is False and c1.to_json() == old
    old["session"] = {"prepacking": True}  # version-2 keys in a version-1 file are unknown keys
    refused(old, "unknown key 'session'")


def test_prepacking_options_follow_the_contract_unless_overridden(tmp_path):
    from fips_rt.runtime.session import FipsRuntimeError, create_session
    q8, f32 = tiny_lm_dir("dense", weights="int8"), tiny_lm_dir("dense")
    for folder, mode, want, source in [(q8, "auto", True, "contract"), (q8, "off", False, "user"),
                                       (f32, "auto", False, "contract"), (f32, "on", True, "user"),
                                       (q8, False, False, "user")]:
        _, info = create_session(folder, threads=1, kernel="reference", provider="cpu", prepacking=mode)
        assert (info.prepacking, info.prepacking_source) == (want, source)
        assert ("session.disable_prepacking" in info.config_entries) == (not want)
    with pytest.raises(FipsRuntimeError, match="prepacking must be one of"):
        create_session(q8, threads=1, kernel="reference", provider="cpu", prepacking="sometimes")
    # fips bench: each side's options in the JSON and the markdown
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "bench", str(q8), "--baseline", str(f32),
                        "-r", "1", "-w", "0", "--prompt-lengths", "4", "--decode-tokens", "2", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, env=runtime_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["compressed"]["session_options"]["prepacking"] is True and r["compressed"]["weights"] == "int8"
    assert r["baseline"]["session_options"]["prepacking"] is False and r["baseline"]["weights"] == "fp32"
    assert "prepacking on (contract)" in p.stdout and "prepacking off (contract)" in p.stdout
    p = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "bench", str(q8), "--prepacking", "maybe"],
                       capture_output=True, text=True, env=runtime_env(), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--prepacking" in p.stderr


def test_fips_info_shows_bytes_per_part():
    from fips_rt.exporter.parts import onnx_parts
    fq, dq = onnx_parts(tiny_lm_dir("fips", weights="int8")), onnx_parts(tiny_lm_dir("dense", weights="int8"))
    for r in (fq, dq):
        assert sum(r["parts"].values()) == r["total"] and r["tied_embedding_head"]
        assert r["parts"]["embedding + head (tied)"] > 0 and r["parts"]["attention"] > 0 and r["parts"]["norms"] > 0
        assert r["parts"]["embedding"] == r["parts"]["head"] == 0
    assert all(fq["parts"][k] > 0 for k in ("mlp: U", "mlp: V values", "mlp: V scales", "mlp: V mask"))
    assert fq["parts"]["mlp: dense"] == 0 and dq["parts"]["mlp: V values"] == 0
    assert fq["parts"]["attention"] == dq["parts"]["attention"]  # the same treatment outside the MLPs
    assert fq["mlp_bytes"] < dq["mlp_bytes"]
    from click.testing import CliRunner

    from fips_rt.cli import cli
    res = CliRunner().invoke(cli, ["info", str(tiny_lm_dir("fips", weights="int4")), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["quantization"]["weights"] == "int4" and d["parts"]["mlp: V values"] > 0


@pytest.mark.parametrize("args,match", [
    (["--weights", "fp32", "--block-size", "32"], "apply to --weights int8/int4"),
    (["--weights", "int8", "--dtype", "fp16"], "computes in fp32"),
    (["--weights", "fp16", "--dtype", "fp32"], "contradicts"),
    (["--weights", "int5"], "--weights"),
    (["--weights", "int4", "--block-size", "64"], "--block-size"),
    (["--weights", "int4", "--accuracy-level", "3"], "--accuracy-level"),
])
def test_bad_export_flags_are_one_line_errors(tmp_path, args, match):
    from click.testing import CliRunner
    from fips_rt.exporter.cli import export_command
    res = CliRunner().invoke(export_command, ["no-such-model", str(tmp_path / "m.onnx")] + args)
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    lines = [x for x in res.output.strip().splitlines() if x.startswith(("Error", "error"))]
    assert len(lines) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_two_outputs_or_none_are_refused(tmp_path):
    from click.testing import CliRunner
    from fips_rt.exporter.cli import export_command
    res = CliRunner().invoke(export_command, ["x", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx")])
    assert res.exit_code == 2 and "two outputs" in res.output
    res = CliRunner().invoke(export_command, ["x"])
    assert res.exit_code == 2 and "no output given" in res.output


def test_block_128_pads_the_shared_embedding():
    """d = 64 < block 128: MatMulNBits pads K to whole blocks; the shared embedding slices the padding off."""
    folder = tiny_lm_dir("dense", weights="int8", block_size=128, accuracy_level=1)
    proto, ops = _ops(folder)
    assert ops["Slice"] >= 1 and ops["GatherBlockQuantized"] == 1
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    assert next(a.i for a in gbq.attribute if a.name == "block_size") == 128
    q = C.read_contract(folder).quantization
    assert (q.block_size, q.accuracy_level) == (128, 1)
    _, got = _logits(folder)
    _, ref = _logits(tiny_lm_dir("dense"))
    assert np.abs(got - ref).mean() / ref.std() < TOLERANCE["int8"]


def test_int8_basis_quantizes_balanced_u_in_two_layouts():
    """The default basis_weights="int8": x·U and t·Uᵀ through 8-bit MatMulNBits, U in two layouts, written
    after the exact rescaling of exporter/balance.py (U·diag(s), V's rows / s)."""
    folder = tiny_lm_dir("fips", weights="int4")
    proto, ops = _ops(folder)
    assert ops["MatMulNBits"] == LAYERS * 6 + 1 and ops["Gemm"] == 0
    basis = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("fips.basis.")]
    assert len(basis) == 2 * LAYERS and all(next(a.i for a in n.attribute if a.name == "bits") == 8 for n in basis)
    assert len({n.input[1] for n in basis}) == 4  # 2 groups x (U for x·U, Uᵀ for t·Uᵀ)
    assert C.read_contract(folder).quantization.basis_weights == "int8"
    _, got = _logits(folder)
    _, ref = _logits(tiny_lm_dir("fips"))
    assert np.abs(got - ref).mean() / ref.std() < TOLERANCE["int4"]


def test_fp32_basis_option_keeps_one_float_u():
    """basis_weights="fp32": U stays fp32, one copy (x·U a MatMul, t·Uᵀ a Gemm on the same initializer)."""
    folder = tiny_lm_dir("fips", weights="int8", basis_weights="fp32")
    proto, ops = _ops(folder)
    assert ops["MatMulNBits"] == LAYERS * 4 + 1
    inits = {t.name for t in proto.graph.initializer}
    float_products = [n.input[1] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert all(w.startswith("fips.basis.") for w in float_products)
    assert len(float_products) == 2 * LAYERS and ops["Gemm"] == LAYERS
    assert len(set(float_products)) == 2  # one U per group of 2 layers
    assert C.read_contract(folder).quantization.basis_weights == "fp32"
    _, got = _logits(folder)
    _, ref = _logits(tiny_lm_dir("fips"))
    assert np.abs(got - ref).mean() / ref.std() < TOLERANCE["int8"]


def _qsparse_attrs(folder):
    proto, _ = _ops(folder)
    return [(n.input[1], {a.name: a.i for a in n.attribute}) for n in proto.graph.node if n.op_type == "QSparseMatMul"]


def test_int8_act8_gate_up_factors_are_stored_transposed():
    """--weights int8 at accuracy_level 4 (activation_bits 8): the r -> d_ff factors (gate/up) are written as Vᵀ
    [d_ff, r] behind transB = 1 (the VNNI dot-product kernel), gate and up stacked in one node, down as before;
    at accuracy_level 1 (exact float activations) and for int4 they keep V [r, d_ff] and transB = 0. Both
    layouts compute the same product."""
    nodes = _qsparse_attrs(tiny_lm_dir("fips", weights="int8"))
    assert len(nodes) == 2 * LAYERS and all(a["transB"] == 1 and a["activation_bits"] == 8 for _, a in nodes)
    gate_up = [a for name, a in nodes if ".gate_up_proj." in name]
    assert len(gate_up) == LAYERS and all((a["rows"], a["cols"]) == (2 * 128, 64) for a in gate_up)
    for kw in ({"weights": "int8", "accuracy_level": 1}, {"weights": "int4"}):
        nodes = _qsparse_attrs(tiny_lm_dir("fips", **kw))
        layout = {(".down_proj." in name, a["transB"], a["rows"], a["cols"]) for name, a in nodes}
        assert layout == {(False, 0, 64, 128), (True, 1, 64, 128)}, kw
    # the two layouts of the same checkpoint give the same logits (within int8's rounding of A and of V)
    _, got = _logits(tiny_lm_dir("fips", weights="int8"))
    _, ref = _logits(tiny_lm_dir("fips", weights="int8", accuracy_level=1))
    assert np.abs(got - ref).mean() / ref.std() < TOLERANCE["int8"]


@pytest.mark.parametrize("bits,group,act,rank,want", [(8, 0, 8, 576, True), (8, 0, 8, 64, True),
                                                      (8, 0, 8, 542, False), (8, 0, 0, 576, False),
                                                      (8, 64, 8, 576, False), (4, 0, 8, 576, False),
                                                      (4, 32, 0, 576, False)])
def test_stores_transposed_rule(bits, group, act, rank, want):
    from fips_rt.exporter.sparse_op import stores_transposed
    assert stores_transposed(bits, group, act, rank) is want


@pytest.mark.parametrize("kernel", ["native", "reference"])
def test_fused_gate_up_is_the_same_function(tmp_path, monkeypatch, kernel):
    """One QSparseMatMul over [Vᵀ_gate; Vᵀ_up] + Split gives the logits of two nodes: per-row scales quantize
    each row alike in both forms, and the kernel quantizes the shared activation t once either way."""
    import fips_rt.exporter.layers as L
    from fips_rt.exporter import export
    from fips_rt.runtime import Model
    from test_runtime_helpers import _tiny_fips
    export(_tiny_fips(), str(tmp_path / "fused" / "model.onnx"), weights="int8")
    monkeypatch.setattr(L, "_fused_gate_up", lambda *a, **k: None)
    export(_tiny_fips(), str(tmp_path / "apart" / "model.onnx"), weights="int8")
    assert _ops(tmp_path / "fused")[1]["QSparseMatMul"] == 2 * LAYERS
    assert _ops(tmp_path / "apart")[1]["QSparseMatMul"] == 3 * LAYERS
    got = [np.asarray(Model.load(tmp_path / f, threads=1, kernel=kernel).sequence_logits(PROMPT), np.float64)
           for f in ("fused", "apart")]
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=1e-5 * np.abs(got[1]).max())
    sizes = [sum(p.stat().st_size for p in (tmp_path / f).iterdir()) for f in ("fused", "apart")]
    assert abs(sizes[0] - sizes[1]) < 4096  # the same codes, scales and mask bits, stored once
