"""``fips serve`` with real clients: the official ``openai`` Python SDK (completions, chat, streaming chat,
embeddings) and a bounded property-based fuzz of the served OpenAPI schema (schemathesis): client mistakes
are 4xx, never 5xx, and the server keeps serving."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from test_runtime_helpers import VOCAB, hf_tokenizer, needs_exporter, tiny_lm_dir

pytestmark = needs_exporter
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def lm():
    from fips_rt.runtime import Model
    return Model.load(tiny_lm_dir("fips", last_logits_only=True), threads=2)


@pytest.fixture(scope="module")
def lm_server(lm):
    from fips_rt.runtime.serve import ServeConfig, start_in_thread
    base, app, stop = start_in_thread(lm, ServeConfig(max_tokens_limit=32, max_body_bytes=65536, log=False))
    yield base, app.state
    stop()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from fips_rt.exporter import export
    from fips_rt.testing import tiny_model
    d = tmp_path_factory.mktemp("tiny-bert")
    export(tiny_model("bert", tokenizer=hf_tokenizer(), vocab_size=VOCAB), str(d / "model.onnx"), verify=False)
    return d


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_sdk_completions_and_chat(lm_server, lm):
    base, _ = lm_server
    c = client(base)
    r = c.completions.create(model="anything", prompt="The capital of France is", max_tokens=8, temperature=0)
    want = lm.generate("The capital of France is", max_new_tokens=8, temperature=0.0)
    assert r.choices[0].text == want.text and r.model == lm.name
    assert r.usage.completion_tokens == want.completion_tokens
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    want = lm.chat(msgs, max_new_tokens=10, temperature=0.0).text
    r = c.chat.completions.create(model=lm.name, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    # streaming chat: deltas add up to the same text, the last chunk says why it stopped, usage comes last
    parts, finish, usage = [], None, None
    with c.chat.completions.create(model=lm.name, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                   stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
    assert "".join(parts) == want and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    # streamed completions too
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=lm.name, prompt="Once", max_tokens=6,
                                                                     temperature=0, stream=True))
    assert text == lm.generate("Once", max_new_tokens=6, temperature=0.0).text


def test_openai_sdk_sees_clear_errors(lm_server):
    base, _ = lm_server
    c = client(base)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="x", prompt="Hi", max_tokens=4, extra_body={"frobnicate": 1})
    assert e.value.status_code == 400 and "frobnicate" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=1000)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="x", input="Hi")  # not an encoder
    assert [m.id for m in c.models.list()] == [lm_server[1].model.name]


def test_openai_sdk_embeddings(encoder_dir):
    from fips_rt.runtime import Model
    from fips_rt.runtime.serve import ServeConfig, start_in_thread
    enc = Model.load(encoder_dir, threads=2)
    base, app, stop = start_in_thread(enc, ServeConfig(log=False))
    try:
        c = client(base)
        texts = ["first sentence", "a second, longer sentence"]
        want = enc.embed(texts)
        for fmt in ("float", "base64"):
            r = c.embeddings.create(model="x", input=texts, encoding_format=fmt)
            got = np.array([d.embedding if fmt == "float" else np.frombuffer(base64.b64decode(d.embedding), "<f4")
                            for d in r.data], dtype=np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert r.usage.prompt_tokens > 0
        for bad in ({"input": 3}, {"input": []}, {"input": "x", "dimensions": 8}, {"input": "word " * 600}):
            with pytest.raises(openai.BadRequestError):
                c.embeddings.create(model="x", **bad)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="x", prompt="Hi")  # not a causal LM
    finally:
        stop()


def test_fuzz_the_served_openapi_schema(lm_server):
    """Schema-valid and schema-violating requests for every operation (bounded, derandomized): no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    base, state = lm_server
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    seen = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(base_url=base, timeout=60)
                seen[(op.label, mode.value, r.status_code)] = seen.get((op.label, mode.value, r.status_code), 0) + 1
                assert r.status_code < 500, (op.label, r.status_code, r.text[:500], case.body)
            try:
                check()
            except Unsatisfiable:  # no schema-violating input exists for an operation without parameters
                assert mode == schemathesis.GenerationMode.NEGATIVE
    statuses = {k[2] for k in seen}
    assert 200 in statuses and 400 in statuses
    assert any(k[0].startswith("POST /v1/") and k[2] == 200 for k in seen)  # generation was reached
    assert state.scheduler.error is None
