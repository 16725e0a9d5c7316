"""Generation, embeddings and classification on tiny models exported with ``fips_rt.exporter.export``:
KV-cache greedy == no-cache recompute == PyTorch greedy, seeded sampling, stop tokens / strings, streaming."""
from __future__ import annotations

import numpy as np
import pytest

from test_runtime_helpers import VOCAB, hf_tokenizer, needs_exporter, tiny_lm_dir, tiny_lm_torch, _tiny_fips

pytestmark = needs_exporter

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1 2 3"]


def _model(kind="dense", *, kernel="auto", threads=1, **export_kwargs):
    from fips_rt.runtime import Model
    return Model.load(tiny_lm_dir(kind, **export_kwargs), threads=threads, kernel=kernel)


@pytest.fixture(scope="module")
def dense():
    return _model("dense", last_logits_only=True)


@pytest.fixture(scope="module")
def fips():
    return _model("fips", last_logits_only=True)


def _recompute_greedy(model, prompt_ids, n):
    ids, out = list(prompt_ids), []
    for _ in range(n):
        t = int(np.argmax(model.full_logits(ids)))
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("which", ["dense", "fips"])
def test_kv_cache_greedy_equals_full_recompute(which, dense, fips):
    model = {"dense": dense, "fips": fips}[which]
    assert model.kind == "causal-lm" and model.has_kv_cache and model.num_layers == 4
    for p in PROMPTS:
        r = model.generate(p, max_new_tokens=24, temperature=0.0, ignore_eos=True)
        assert len(r.token_ids) == 24 and r.finish_reason == "length"
        assert r.token_ids == _recompute_greedy(model, r.prompt_token_ids, 24)


def test_chunked_prefill_equals_whole_prompt(dense):
    from fips_rt.runtime import Model
    chunked = Model.load(tiny_lm_dir("dense", last_logits_only=True), threads=1, prefill_chunk=3)
    whole = Model.load(tiny_lm_dir("dense", last_logits_only=True), threads=1, prefill_chunk=None)
    ids = dense.tokenizer.encode(PROMPTS[1])
    assert len(ids) > 6
    a, ca = chunked.prefill(ids)
    b, cb = whole.prefill(ids)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert ca.length == cb.length == len(ids)
    ra = chunked.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert ra.token_ids == whole.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True).token_ids
    assert ra.token_ids == _recompute_greedy(whole, ra.prompt_token_ids, 12)


def test_kv_cache_logits_match_full_recompute(dense):
    ids = dense.tokenizer.encode(PROMPTS[1])
    logits, cache = dense.forward(ids[:3])
    for i in range(3, len(ids)):
        logits, cache = dense.forward([ids[i]], cache)
        np.testing.assert_allclose(logits, dense.full_logits(ids[:i + 1]), rtol=1e-4, atol=1e-4)
    assert cache.length == len(ids)


@pytest.mark.parametrize("which", ["dense", "fips"])
def test_greedy_equals_pytorch(which, dense, fips):
    import torch
    model = {"dense": dense, "fips": fips}[which]
    lm = tiny_lm_torch() if which == "dense" else _tiny_fips()
    for p in PROMPTS:
        r = model.generate(p, max_new_tokens=16, temperature=0.0, ignore_eos=True)
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([r.prompt_token_ids]), attention_mask=torch.ones(1, r.prompt_tokens,
                                    dtype=torch.long), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        assert out[0, r.prompt_tokens:].tolist() == r.token_ids


def test_native_and_reference_kernels_agree(fips):
    ref = _model("fips", kernel="reference", last_logits_only=True)
    assert ref.info.kernel == "reference"
    ids = fips.tokenizer.encode(PROMPTS[0])
    np.testing.assert_allclose(fips.full_logits(ids), ref.full_logits(ids), rtol=1e-4, atol=1e-4)
    a = fips.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    b = ref.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_full_logits_export_and_fp16(dense):
    full = _model("dense", last_logits_only=False)
    assert not full.last_logits_only
    a = dense.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert full.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).token_ids == a.token_ids
    half = _model("dense", dtype="fp16", last_logits_only=True)
    r = half.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert r.token_ids == _recompute_greedy(half, r.prompt_token_ids, 10)


def test_sampling_is_reproducible(dense):
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, ignore_eos=True)
    a = dense.generate(PROMPTS[0], seed=1, **kw)
    b = dense.generate(PROMPTS[0], seed=1, **kw)
    c = dense.generate(PROMPTS[0], seed=2, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    assert a.token_ids != dense.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True).token_ids


def test_stop_token_ids(dense):
    full = dense.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True).token_ids
    k = next(i for i in range(3, 16) if full[i] not in full[:i])  # first occurrence of that token
    r = dense.generate(PROMPTS[1], max_new_tokens=16, stop_token_ids=[full[k]], ignore_eos=True)
    assert r.token_ids == full[:k] and r.finish_reason == "stop"


def test_eos_stops_unless_ignored(dense):
    full = dense.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True).token_ids
    # pretend the model's eos is the 5th greedy token
    eos_before = dense.tokenizer.eos_token_ids
    try:
        dense.tokenizer.eos_token_ids = frozenset({full[4]})
        k = full.index(full[4])
        r = dense.generate(PROMPTS[2], max_new_tokens=12)
        assert r.token_ids == full[:k] and r.finish_reason == "stop"
        assert dense.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True).token_ids == full
    finally:
        dense.tokenizer.eos_token_ids = eos_before


def test_stop_strings(dense):
    full = dense.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    r = dense.generate(PROMPTS[0], max_new_tokens=24, stop=[stop], ignore_eos=True)
    assert r.finish_reason == "stop"
    assert r.text == text[:text.find(stop)]
    assert stop not in r.text
    chunks = list(dense.stream(PROMPTS[0], max_new_tokens=24, stop=stop, ignore_eos=True))
    assert "".join(c.text for c in chunks) == r.text


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_p=0.9, seed=3), dict(stop=["e"])])
def test_streaming_equals_non_streaming(dense, kw):
    r = dense.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True, **kw)
    chunks = list(dense.stream(PROMPTS[1], max_new_tokens=20, ignore_eos=True, **kw))
    assert "".join(c.text for c in chunks) == r.text
    assert [t for c in chunks for t in c.token_ids] == r.token_ids
    assert chunks[-1].finish_reason == r.finish_reason and all(c.finish_reason is None for c in chunks[:-1])
    seen = []
    r2 = dense.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True, callback=seen.append, **kw)
    assert "".join(c.text for c in seen) == r2.text == r.text


def test_text_is_the_decoded_tokens(dense):
    r = dense.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    assert r.text == hf_tokenizer().decode(r.token_ids, skip_special_tokens=True)


def test_chat(dense):
    msgs = [{"role": "user", "content": "Hello!"}]
    prompt = dense.render_chat(msgs)
    assert prompt == hf_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    r = dense.chat(msgs, max_new_tokens=8, ignore_eos=True)
    assert r.prompt_token_ids == hf_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
    assert r.token_ids == dense.generate(prompt, max_new_tokens=8, ignore_eos=True, add_special_tokens=False).token_ids
    assert "".join(c.text for c in dense.chat_stream(msgs, max_new_tokens=8, ignore_eos=True)) == r.text


def test_limits_and_errors(dense):
    from fips_rt.runtime import FipsRuntimeError
    with pytest.raises(FipsRuntimeError, match="positions"):
        dense.generate(list(range(10, 10 + 256)), max_new_tokens=1)
    r = dense.generate(list(range(10, 10 + 250)), max_new_tokens=50, ignore_eos=True)
    assert len(r.token_ids) == 6 and r.finish_reason == "length"  # clamped to the context
    with pytest.raises(FipsRuntimeError, match="out of range"):
        dense.generate([VOCAB + 5], max_new_tokens=1)
    with pytest.raises(FipsRuntimeError, match="temperature"):
        dense.generate("x", temperature=-1)
    with pytest.raises(FipsRuntimeError, match="top_p"):
        dense.generate("x", top_p=0)
    with pytest.raises(FipsRuntimeError, match="encoder"):
        dense.embed("x")
    assert dense.generate("x", max_new_tokens=0).token_ids == []


def test_module_level_api(dense):
    from fips_rt import runtime
    from fips_rt.runtime.generate import generate
    m = runtime.load(tiny_lm_dir("dense", last_logits_only=True) / "model.onnx", threads=1)
    assert isinstance(m, runtime.Model)
    assert generate(m, PROMPTS[0], max_new_tokens=5, ignore_eos=True).token_ids == \
        dense.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True).token_ids


# ----------------------------------------------------------------------------- encoders and ViTs
def test_embed_matches_pytorch_mean_pooling(tmp_path):
    import torch

    from fips_rt.exporter import export
    from fips_rt.runtime import Model
    from fips_rt.testing import tiny_model
    lm = tiny_model("bert", tokenizer=hf_tokenizer(), vocab_size=VOCAB)
    lm.model.eval()
    export(lm, str(tmp_path / "model.onnx"))
    m = Model.load(tmp_path, threads=1)
    assert m.kind == "encoder"
    texts = ["a short one", "and a somewhat longer sentence to embed here"]
    emb = m.embed(texts)
    assert emb.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    tok = hf_tokenizer()
    for i, t in enumerate(texts):
        ids = torch.tensor([m.tokenizer.encode(t)])
        with torch.no_grad():
            h = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(emb[i], h / np.linalg.norm(h), rtol=1e-3, atol=1e-4)
    # padding in a batch does not change an embedding
    np.testing.assert_allclose(m.embed(texts[0]), emb[0], rtol=1e-4, atol=1e-5)
    raw = m.embed(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    del tok


def test_classify_matches_pytorch(tmp_path):
    import torch

    from fips_rt.exporter import export
    from fips_rt.runtime import Model
    from fips_rt.testing import tiny_model
    lm = tiny_model("deit")
    lm.model.eval()
    export(lm, str(tmp_path / "model.onnx"))
    m = Model.load(tmp_path, threads=1)
    assert m.kind == "vit"
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.classify_logits(x), ref, rtol=1e-3, atol=1e-4)
    top = m.classify(x, top_k=3)
    assert len(top) == 3 and [p["index"] for p in top[0]] == list(np.argsort(-ref[0])[:3])
    assert abs(sum(p["score"] for p in m.classify(x[0], top_k=10)[0]) - 1.0) < 1e-5
