"""``fips bench``: statistics, the result schema and its reports, and a real run (tiny dense vs tiny FiPS,
each in a fresh process). No wall-clock assertions."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fips_rt.runtime.bench import (BenchResult, ModelBench, Stats, compute_ratios, percentile, plot, to_markdown,
                                   write_reports)

from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 5, 50, 95, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats():
    s = Stats.of([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean_ms == 2.5 and s.p50_ms == 2.5
    assert s.std_ms == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s.samples_ms == [1.0, 2.0, 3.0, 4.0] and s.min_ms == 1.0 and s.max_ms == 4.0
    assert Stats.of([5.0]).std_ms == 0.0
    assert Stats.from_dict(json.loads(json.dumps(s.__dict__))) == s


def _fake_model_bench(role, scale):
    return ModelBench(role=role, path=f"/x/{role}.onnx", ok=True, kind="causal-lm", file_bytes=int(100e6 * scale),
                      file_mb=100 * scale, kernel="native", provider="cpu", threads=2, spinning=False, load_s=0.5,
                      rss_before_mb=50.0, rss_after_load_mb=50 + 100 * scale, rss_after_run_mb=60 + 100 * scale,
                      peak_rss_mb=70 + 100 * scale, peak_method="VmHWM", model_rss_after_load_mb=100 * scale,
                      model_rss_after_run_mb=10 + 100 * scale, model_peak_rss_mb=20 + 100 * scale,
                      prefill={"1": Stats.of([1.0 * scale, 1.1 * scale]), "64": Stats.of([9.0 * scale, 10 * scale])},
                      prefill_tokens_per_s={"1": 900.0, "64": 6000.0},
                      decode=Stats.of([2.0 * scale, 2.2 * scale, 2.4 * scale]),
                      decode_tokens_per_s=1000 / (2.2 * scale), decode_context=64)


def _fake_result():
    c, b = _fake_model_bench("compressed", 0.6), _fake_model_bench("baseline", 1.0)
    return BenchResult(schema="fips-rt/bench/1", timestamp="2025-01-01T00:00:00+00:00", git_commit="abc", git_dirty=False,
                       machine={"cpu_model": "CPU", "usable_cpus": 2, "onnxruntime": "1.x"},
                       settings={"threads": 2, "kernel": "auto", "spinning": "off", "warmup": 1, "repetitions": 2},
                       compressed=c, baseline=b, ratios=compute_ratios(c, b))


def test_ratios_and_roundtrip(tmp_path):
    r = _fake_result()
    assert r.ratios["decode_ms_p50"] == pytest.approx(0.6)
    assert r.ratios["peak_rss_mb"] == pytest.approx(80 / 120)
    assert r.ratios["file_bytes"] == pytest.approx(0.6)
    assert r.ratios["prefill_ms_p50.64"] == pytest.approx(0.6)
    back = BenchResult.from_dict(json.loads(r.to_json()))
    assert back == r
    md = to_markdown(r)
    assert "decode ms/token p50" in md and "0.600x" in md and "| metric | compressed | baseline | ratio |" in md
    write_reports(r, json_path=tmp_path / "a/r.json", markdown_path=tmp_path / "r.md", plot_path=tmp_path / "r.png")
    assert json.loads((tmp_path / "a/r.json").read_text())["ratios"]["decode_ms_p50"] == pytest.approx(0.6)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_rounds_pools_samples():
    from fips_rt.runtime.bench import merge_rounds
    a, b = _fake_model_bench("compressed", 1.0), _fake_model_bench("compressed", 2.0)
    a.loadavg, b.loadavg = [0.5], [1.5]
    m = merge_rounds([a, b])
    assert m.rounds == 2 and m.loadavg == [0.5, 1.5]
    assert m.decode.samples_ms == a.decode.samples_ms + b.decode.samples_ms
    assert m.prefill["64"].n == 4
    assert m.model_peak_rss_mb == pytest.approx((a.model_peak_rss_mb + b.model_peak_rss_mb) / 2)
    assert m.decode_tokens_per_s == pytest.approx(1000 / m.decode.mean_ms)
    b.ok, b.error = False, "x"
    assert merge_rounds([a, b]) is b


def test_no_ratios_when_a_side_failed():
    c = _fake_model_bench("compressed", 0.6)
    b = ModelBench(role="baseline", path="/x", ok=False, error="boom")
    assert compute_ratios(c, b) == {}
    assert compute_ratios(c, None) == {}
    r = _fake_result()
    r.baseline = b
    assert not r.ok and "baseline failed" in to_markdown(r)


def test_plot_without_baseline(tmp_path):
    r = _fake_result()
    r.baseline, r.ratios = None, {}
    plot(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| metric | compressed |" in to_markdown(r)


def _bench_cmd(*args):
    return [sys.executable, "-m", "fips_rt.runtime.cli", "bench", *map(str, args)]


def test_bench_fails_nonzero_on_a_broken_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    out = subprocess.run(_bench_cmd(bad, "--repetitions", 1, "--json", tmp_path / "r.json"), capture_output=True,
                         text=True, timeout=300, env=runtime_env())
    assert out.returncode != 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["compressed"]["ok"] is False and data["compressed"]["error"]


@needs_exporter
def test_bench_dense_vs_fips(tmp_path):
    dense = tiny_lm_dir("dense", last_logits_only=True)
    comp = tiny_lm_dir("fips", last_logits_only=True)
    j, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    out = subprocess.run(_bench_cmd(comp / "model.onnx", "--baseline", dense / "model.onnx", "--json", j,
                                    "--markdown", md, "--plot", png, "--prompt-lengths", "1,16", "--decode-tokens", 4,
                                    "--repetitions", 2, "--warmup", 1, "--threads", 1, "--rounds", 2),
                         capture_output=True, text=True, timeout=600, env=runtime_env())
    assert out.returncode == 0, out.stderr + out.stdout
    data = json.loads(j.read_text())
    assert data["schema"] == "fips-rt/bench/1"
    for k in ("git_commit", "timestamp", "machine", "settings", "compressed", "baseline", "ratios"):
        assert k in data
    for k in ("cpu_model", "usable_cpus", "onnxruntime"):
        assert k in data["machine"]
    assert data["settings"]["threads"] == 1 and data["settings"]["repetitions"] == 2
    assert data["settings"]["rounds"] == 2
    assert isinstance(data["ratios"]["decode_ms_p50"], float) and data["ratios"]["decode_ms_p50"] > 0
    assert isinstance(data["ratios"]["peak_rss_mb"], float)
    for role in ("compressed", "baseline"):
        m = data[role]
        assert m["ok"] and m["kind"] == "causal-lm"
        assert set(m["prefill"]) == {"1", "16"}
        assert m["rounds"] == 2 and len(m["loadavg"]) == 2
        assert len(m["prefill"]["16"]["samples_ms"]) == 2 * 2
        assert len(m["decode"]["samples_ms"]) == 2 * 2 * 4
        assert len(m["decode_cpu"]["samples_ms"]) == 2 * 2 * 4
        for k in ("load_s", "rss_before_mb", "rss_after_load_mb", "peak_rss_mb", "model_peak_rss_mb", "file_bytes",
                  "decode_tokens_per_s"):
            assert m[k] is not None and m[k] >= 0, k
        assert m["threads"] == 1
        assert m["torch_imported"] is False
        assert set(m["rss_trace_mb"]) >= {"load", "prefill 1", "prefill 16", "decode"}
    assert data["compressed"]["kernel"] == data["baseline"]["kernel"] or True  # recorded for both
    assert data["compressed"]["spinning"] == data["baseline"]["spinning"]
    assert data["compressed"]["file_bytes"] < data["baseline"]["file_bytes"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "decode ms/token p50" in md.read_text()
    assert "decode ms/token p50" in out.stdout


@needs_exporter
def test_bench_encoder_without_baseline(tmp_path):
    from fips_rt.exporter import export
    from fips_rt.testing import tiny_model

    from test_runtime_helpers import VOCAB, hf_tokenizer
    lm = tiny_model("bert", tokenizer=hf_tokenizer(), vocab_size=VOCAB)
    export(lm, str(tmp_path / "model.onnx"), verify=False)
    j = tmp_path / "enc.json"
    out = subprocess.run(_bench_cmd(tmp_path, "--json", j, "--prompt-lengths", "8,500", "--repetitions", 1,
                                    "--warmup", 0, "--threads", 1), capture_output=True, text=True, timeout=300,
                         env=runtime_env())
    assert out.returncode == 0, out.stderr
    data = json.loads(j.read_text())
    m = data["compressed"]
    assert data["baseline"] is None and data["ratios"] == {}
    assert m["kind"] == "encoder" and set(m["prefill"]) == {"8"} and m["skipped_prefill_lengths"] == [500]
    assert m["decode"] is None
