"""Perplexity of an exported file (fips_rt.runtime.evaluate) equals PyTorch's on the same windows."""
from __future__ import annotations

import numpy as np
import pytest

from test_runtime_helpers import _tiny_fips, needs_exporter, tiny_lm_dir, tiny_lm_torch

pytestmark = [needs_exporter, pytest.mark.real]  # the real SmolLM2 tokenizer and wiki text


@pytest.mark.parametrize("kind", ["dense", "fips"])
def test_onnx_perplexity_equals_pytorch_on_the_same_windows(kind):
    from fips_rt import evaluate as E
    from fips_rt.data import lm_batches
    from fips_rt.runtime import Model
    from fips_rt.runtime.evaluate import lm_windows, perplexity
    lm = tiny_lm_torch() if kind == "dense" else _tiny_fips()
    ref = E.perplexity(lm.model, lm_batches(lm.tokenizer, "wiki", "validation", 256, 64))
    m = Model.load(tiny_lm_dir(kind), threads=1)
    wins = lm_windows(m.tokenizer, "wiki", "validation", 256, 64)
    batches = lm_batches(lm.tokenizer, "wiki", "validation", 256, 64)
    assert wins == [row for b in batches for row in b["input_ids"].tolist()]  # the very same token windows
    got = perplexity(m, wins)
    assert got["tokens"] == ref["tokens"] == 4 * 63
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)


def test_window_nll_is_cross_entropy():
    from fips_rt.runtime.evaluate import window_nll
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32) * 3
    ids = [1, 4, 0, 6, 2]
    s, n = window_nll(logits, ids)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert n == 4 and s == pytest.approx(-sum(np.log(p[t, ids[t + 1]]) for t in range(4)), rel=1e-6)


def test_last_logits_only_exports_are_refused_for_perplexity():
    from fips_rt.runtime import Model
    from fips_rt.runtime.session import FipsRuntimeError
    m = Model.load(tiny_lm_dir("dense", last_logits_only=True), threads=1)
    with pytest.raises(FipsRuntimeError, match="last-logits-only"):
        m.sequence_logits([1, 2, 3])


def test_fips_eval_of_an_onnx_export_is_torch_free(tmp_path):
    import json
    import subprocess
    import sys

    from test_runtime_helpers import runtime_env
    code = ("import sys\nfrom fips_rt.cli import main\nsys.argv = ['fips'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n")
    comp, dense = tiny_lm_dir("fips"), tiny_lm_dir("dense")
    p = subprocess.run([sys.executable, "-c", code, "eval", str(comp / "model.onnx"), "--dense", str(dense),
                        "--eval-tokens", "256", "--seq-len", "64", "--json"],
                       capture_output=True, text=True, env=runtime_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["tokens"] == 4 * 63 and res["ppl_ratio"] == pytest.approx(res["ppl"] / res["ppl_dense"])
    from pathlib import Path
    fips = str(Path(sys.executable).with_name("fips"))
    bad = subprocess.run([fips, "eval", str(tiny_lm_dir("dense", last_logits_only=True))],
                         capture_output=True, text=True, env=runtime_env(), timeout=600)
    assert bad.returncode != 0 and "last-logits-only" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("kind", ["dense", "fips"])
def test_chunked_scoring_through_the_kv_cache_equals_one_call(kind):
    """``sequence_logits(ids, chunk)`` (fips eval --chunk) runs the decode/serving shapes through the KV cache
    and gives the one-call logits (float exports: the same function up to float rounding)."""
    from fips_rt.runtime import Model
    m = Model.load(tiny_lm_dir(kind), threads=1)
    ids = list(range(3, 3 + 40))
    whole = m.sequence_logits(ids)
    for chunk in (1, 7, 16):
        got = m.sequence_logits(ids, chunk)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-4)


def test_fips_eval_chunk_option(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_runtime_helpers import runtime_env
    fips = str(Path(sys.executable).with_name("fips"))
    args = ["--eval-tokens", "128", "--seq-len", "64", "--no-dense", "--json"]
    one = subprocess.run([fips, "eval", str(tiny_lm_dir("fips")), *args], capture_output=True, text=True,
                         env=runtime_env(), timeout=600)
    chunked = subprocess.run([fips, "eval", str(tiny_lm_dir("fips")), "--chunk", "16", *args], capture_output=True,
                             text=True, env=runtime_env(), timeout=600)
    assert one.returncode == 0 and chunked.returncode == 0, (one.stderr, chunked.stderr)
    a, b = json.loads(one.stdout), json.loads(chunked.stdout)
    assert b["chunk"] == 16 and a["chunk"] is None and b["tokens"] == a["tokens"]
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)
