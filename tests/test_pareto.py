"""benchmarks/pareto.py: the table is built from measured parts, ratios from measured values; the smoke run
(a tiny random model through every step: exports, onnxruntime quantize_dynamic, accuracy-level sweep,
perplexity on both domains, timing in fresh processes) writes JSON, markdown and a plot."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pareto():
    from conftest import load_benchmark
    return load_benchmark("pareto.py", "pareto_bench")


def _bench_round(decode_ms, prefill_ms, peak_mb):
    from fips_rt.runtime.bench import ModelBench, Stats
    mb = ModelBench(role="compressed", path="x", ok=True, kind="causal-lm", threads=2, model_peak_rss_mb=peak_mb,
                    peak_rss_mb=peak_mb + 50, rss_before_mb=50, decode_context=8)
    mb.decode = Stats.of(decode_ms)
    mb.decode_cpu = Stats.of(decode_ms)
    mb.prefill["16"] = Stats.of(prefill_ms)
    d = asdict(mb)
    d["session_options"] = {"prepacking": True}
    return d


def test_table_ratios_come_from_the_measured_parts(tmp_path):
    P = _pareto()
    rows = [P.Row("dense-fp32", "dense fp32", "dense", "fp32"),
            P.Row("dense-int8-b32", "dense int8", "dense-quant", "int8", block_size=32, sweep=True),
            P.Row("fips0.5-fp32", "FiPS 0.5 fp32", "fips", "fp32", budget=0.5),
            P.Row("fips0.5-int8", "FiPS 0.5 int8", "fips", "int8", budget=0.5, block_size=32),
            P.Row("llama-q4_1", "llama.cpp", "llama.cpp", "q4_1", source=str(tmp_path / "missing.gguf"))]
    st = {
        "dense-fp32": {"build": {"ok": True, "path": "a", "bytes": 1000},
                       "ppl_wiki": {"ok": True, "ppl": 10.0, "tokens": 100},
                       "ppl_wordnet": {"ok": True, "ppl": 40.0, "tokens": 100},
                       "timing_rounds": [_bench_round([10, 10, 12], [100, 110], 200),
                                         _bench_round([10, 11, 10], [100, 90], 220)]},
        "dense-int8-b32": {"build": {"ok": True, "path": "b", "bytes": 300, "accuracy_level": 4},
                           "sweep": {"ok": True, "best": 4, "tried": {
                               "0": {"ok": True, "decode_p50_ms": 9.0}, "4": {"ok": True, "decode_p50_ms": 5.0}}},
                           "ppl_wiki": {"ok": True, "ppl": 10.5, "tokens": 100},
                           "ppl_wordnet": {"ok": True, "ppl": 42.0, "tokens": 100},
                           "timing_rounds": [_bench_round([5, 5, 6], [50, 50], 80)]},
        "fips0.5-fp32": {"build": {"ok": True, "path": "c", "bytes": 700},
                         "ppl_wiki": {"ok": True, "ppl": 25.0, "tokens": 100},
                         "ppl_wordnet": {"ok": True, "ppl": 120.0, "tokens": 99}},  # different tokens: no ratio
        "fips0.5-int8": {"build": {"ok": False, "not_run": "not run: no quantize_sparse yet"}},
    }
    got = P.table_rows(rows, lambda r, k: (st.get(r, {}) if k == "_all" else st.get(r, {}).get(k)))
    by = {r["id"]: r for r in got}
    d, q, f = by["dense-fp32"], by["dense-int8-b32"], by["fips0.5-fp32"]
    assert d["status"] == "complete" and d["rounds"] == 2 and d["decode_samples"] == 6
    assert d["decode_p50_ms"] == pytest.approx(10.0) and d["model_peak_rss_mb"] == pytest.approx(210.0)
    assert q["file_ratio"] == pytest.approx(0.3) and q["ppl_wiki_ratio"] == pytest.approx(1.05)
    assert q["ppl_wordnet_ratio"] == pytest.approx(42 / 40) and q["decode_p50_ratio"] == pytest.approx(0.5)
    assert q["peak_rss_ratio"] == pytest.approx(80 / 210) and q["accuracy_level"] == 4
    assert q["accuracy_levels_tried"] == {"0": 9.0, "4": 5.0}
    assert f["ppl_wiki_ratio"] == pytest.approx(2.5) and f["ppl_wordnet_ratio"] is None
    assert "different number of tokens" in f["ppl_wordnet_error"]
    assert f["status"].startswith("partial") and "decode_p50_ms" in f["status"]
    assert f["ppl_wiki_vs_dense_same_weights"] == pytest.approx(2.5)  # fp32 FiPS vs dense fp32
    assert "no quantize_sparse" in by["fips0.5-int8"]["status"]
    assert by["llama-q4_1"]["file_bytes"] is None and by["llama-q4_1"]["status"].startswith("partial")
    md = P.to_markdown({"machine": {"cpu": "cpu", "usable_cpus": 2, "physical_cores": 1, "cpu_flags": [],
                                    "onnxruntime": "x", "commit": "c", "dirty": False, "loadavg_at_start": [0.1]},
                        "settings": {"smoke": True, "eval_windows": 4, "seq_len": 32, "rounds": 2,
                                     "prefill_tokens": 16, "decode_tokens": 4, "decode_context": 8, "warmup": 0,
                                     "repetitions": 1, "threads": 2, "accuracy_levels": [0, 4],
                                     "sweep_decode_tokens": 2, "sweep_repetitions": 1},
                        "command": "python benchmarks/pareto.py", "rows": got, "timing_rounds_info": []})
    assert "| dense int8, accuracy_level 4 | 0.0 (0.300) | – (–) |" in md and "Q4_1" in md


def test_level_variant_changes_only_the_accuracy_level(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    P = _pareto()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    plain_bytes = model.SerializeToString()
    q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(q.model.model, str(src / "model.onnx"))
    (src / "fips_config.json").write_text(json.dumps({"quantization": {"accuracy_level": 4}}))
    res = P.level_variant(src, tmp_path / "v0", 0)
    assert res["ok"] and res["matmulnbits_nodes"] == 1
    m0 = onnx.load(str(tmp_path / "v0" / "model.onnx"))
    node = next(n for n in m0.graph.node if n.op_type == "MatMulNBits")
    assert "accuracy_level" not in [a.name for a in node.attribute]  # 0 = unset, as the quantizer writes it
    assert json.loads((tmp_path / "v0" / "fips_config.json").read_text())["quantization"]["accuracy_level"] == 0
    x = rng.standard_normal((1, 64)).astype(np.float32)
    y4 = ort.InferenceSession(str(src / "model.onnx")).run(None, {"x": x})[0]
    y0 = ort.InferenceSession(str(tmp_path / "v0" / "model.onnx")).run(None, {"x": x})[0]
    assert np.allclose(y0, y4, rtol=0.05, atol=0.05 * float(np.abs(y0).max()))  # same weights, other compute
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(plain_bytes)
    assert not P.level_variant(plain, tmp_path / "v1", 1)["ok"]  # nothing to change: refused


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, msg in ((["--fips", "nope"], "BUDGET=CHECKPOINT"), (["--fips", f"0.5={tmp_path}/x.pt"], "no such"),
                      (["--bits", "int3"], "--bits"), (["--parts", "build,later"], "--parts")):
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--work", str(tmp_path / "w")]
                           + args, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr


@pytest.mark.real  # the wiki and WordNet text
def test_smoke_run_writes_a_complete_table(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--smoke", "--work", str(tmp_path / "work"),
           "--out", str(out), "--lock", str(tmp_path / "timing.lock")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.md").is_file() and (out / "pareto.png").stat().st_size > 1000
    by = {r["id"]: r for r in res["rows"]}
    dense = by["dense-fp32"]
    for rid in ("dense-fp32", "dense-dyn-int8", "fips0.5-fp32"):
        r = by[rid]
        assert r["status"] == "complete", (rid, r["status"])
        assert r["file_bytes"] > 0 and r["model_peak_rss_mb"] > 0 and r["decode_p95_ms"] >= r["decode_p50_ms"] > 0
        assert r["prefill_p50_ms"] > 0 and r["session_options_timing"]
        for data in ("wiki", "wordnet"):
            assert math.isfinite(r[f"ppl_{data}"]) and r[f"ppl_{data}"] > 1
            assert r[f"ppl_{data}_ratio"] == pytest.approx(r[f"ppl_{data}"] / dense[f"ppl_{data}"])
        assert r["file_ratio"] == pytest.approx(r["file_bytes"] / dense["file_bytes"])
        assert r["decode_p50_ratio"] == pytest.approx(r["decode_p50_ms"] / dense["decode_p50_ms"])
    assert by["dense-dyn-int8"]["file_bytes"] < dense["file_bytes"]
    assert by["llama-q4_1"]["status"].startswith("not run")
    q = by["dense-int8-b32"]
    if q["status"] == "complete":  # fips export --weights int8 is there
        assert set(q["accuracy_levels_tried"]) == {"0", "4"} and q["accuracy_level"] in (0, 4)
        assert q["file_bytes"] < dense["file_bytes"]
    else:
        assert "not run" in q["status"]
    # resumable: a rerun measures nothing again and gives the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ nice" not in again.stderr and "timing round" not in again.stderr
    res2 = json.loads((out / "pareto.json").read_text())
    assert [r["decode_p50_ms"] for r in res2["rows"] if r["status"] == "complete"] == \
        [r["decode_p50_ms"] for r in res["rows"] if r["status"] == "complete"]
