"""The serving benchmarks' own logic (no timing asserted): the per-node step profile on the tiny FiPS export,
and serve_bench's report (both single-client comparisons with fips bench)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from test_runtime_helpers import needs_exporter, tiny_lm_dir

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@needs_exporter
def test_step_profile_groups_every_node_of_a_batched_step():
    prof = _load("serve_step_profile")
    model = Path(tiny_lm_dir("fips", last_logits_only=True))
    r = prof.profile(model, batch=3, width=5, threads=1, reps=2)
    assert r["batch"] == 3 and r["profiled_runs"] >= 2
    groups = r["groups_ms"]
    # the tiny FiPS export has both products of the sparse MLP, the KV concat and an LM head
    for g in ("sparse MLP (transB=0)", "sparse MLP (transB=1)", "KV concat", "LM head"):
        assert g in groups, (g, groups)
    assert sum(groups.values()) == pytest.approx(r["node_ms_total"])
    assert sum(r["ops_ms"].values()) == pytest.approx(r["node_ms_total"])
    md = prof.to_markdown({"timestamp": "t", "cpu": "cpu", "threads": 1, "width": 5, "note": "",
                           "loadavg": {"before": [0.0], "after": [0.0]}, "paths": {"fips": str(model)},
                           "models": {"fips": [r]}})
    assert "| sparse MLP (transB=1) |" in md and "B=3" in md


def test_serve_bench_report_shows_both_single_client_ratios():
    sb = _load("serve_bench")
    phase = {"requests": 2, "aggregate_tokens_per_s": 30.0, "mean_batch_size": 1.0, "mean_step_ms": 25.0,
             "ttft_ms_p50": 100.0, "ttft_ms_p95": 120.0, "itl_ms_p50": 25.0, "itl_ms_p95": 30.0,
             "itl_ms_mean": 25.0, "server_rss_mib": 500.0}
    res = {"settings": {"threads": 2, "max_batch": 16, "prompt_tokens": 64, "max_tokens": 128, "single_requests": 16,
                        "requests_per_client": 2},
           "load_at_start": {"loadavg": [0.0, 0.0, 0.0]}, "timestamp": "t", "machine": {"cpu_model": "cpu"},
           "models": {"fips": {"phases": {"1": phase, "16": dict(phase, aggregate_tokens_per_s=120.0)},
                               "fips_bench": {"decode_tokens_per_s": 40.0}, "divergences": [],
                               "ratio_single_vs_fips_bench": 0.75, "ratio_16_vs_1": 4.0,
                               "single_decode_tokens_per_s": 40.0, "ratio_single_decode_vs_fips_bench": 1.0}}}
    md = sb.to_markdown(res)
    row = [line for line in md.splitlines() if line.startswith("| fips | 40.0 |")][0]
    assert "| 0.75x |" in row and "1.00x (40.0 tokens/s)" in row and "| 4.00x |" in row
