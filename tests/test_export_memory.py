"""An exported FiPS model stays compact in onnxruntime: the dense V's are never materialized together.

A synthetic Llama (4 layers, d=256, d_ff=8192, one FiPS group, rank 506, V 75% sparse, random
weights) holds 190 MiB of dense-equivalent V in 57 MiB of file. Loaded in a fresh process with
the function-body path (no native kernel), its RSS must stay near the file size after load (a
body that onnxruntime could constant-fold densifies every V at load: +372 MiB, measured) and,
during a forward, grow by the transients of rebuilding one V at a time (about 3 V's of buffers
plus activations: +77 MiB measured, 4.9 V's), never by the 12 dense V's together.
No wall-clock assertions.
"""
from __future__ import annotations

import math

import pytest
import torch

from fips_rt.exporter import export
from fips_rt.exporter.memory import measure_session_rss
from fips_rt.exporter.synthetic import fipsify_
from fips_rt.models import _finish
from fips_rt.modules import FipsLinear

MiB = 2 ** 20


@pytest.fixture(scope="module")
def big_fips_export(tmp_path_factory):
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=8192, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = _finish(T.LlamaForCausalLM(cfg), None, {}, "synthetic-big-mlp")
    fipsify_(lm, group_size=4, init="random")
    vs = [m.V.numel() * 4 for m in lm.model.modules() if isinstance(m, FipsLinear)]
    out = tmp_path_factory.mktemp("big") / "model.onnx"
    report = export(lm, out, last_logits_only=True, verify=False)
    return report, vs


def test_big_model_dense_equivalent_is_large(big_fips_export):
    report, vs = big_fips_export
    dense_v = sum(vs)
    assert dense_v >= 100e6 and len(vs) == 12
    assert report.file_bytes < 0.35 * dense_v  # values (25%) + bitmask + U
    assert report.audit["sparse_nodes"] == 12 and len(report.audit["bases"]) == 1


def test_rss_stays_compact_in_a_fresh_process(big_fips_export):
    report, vs = big_fips_export
    m = measure_session_rss(report.output, tokens=16, threads=2)
    file_mib, dense_mib, one_v = report.file_bytes / MiB, sum(vs) / MiB, max(vs) / MiB
    load, peak = m["load_delta"] / MiB, m["peak_delta"] / MiB
    msg = (f"file {file_mib:.0f} MiB, dense V's {dense_mib:.0f} MiB ({one_v:.1f} each), "
           f"load +{load:.0f} MiB, peak +{peak:.0f} MiB")
    assert math.isfinite(peak), msg
    # after load: the file's bytes and the graph, no V densified by constant folding
    assert load < file_mib + 40, msg
    # during a forward: the transients of one V rebuild at a time, far from all V's at once
    assert peak - load < 8 * one_v, msg
    assert peak < file_mib + 0.7 * dense_mib, msg
