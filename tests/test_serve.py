"""``fips serve``: request validation and HTTP behaviour in-process (a stand-in model), then the real thing:
``python -m fips_rt.runtime.cli serve`` on a tiny exported LM with 200 requests from 16 concurrent clients."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from fips_rt.runtime.generate import GenerationChunk, GenerationResult, Tokenizer
from fips_rt.runtime.serve import App, ServeConfig, make_server

from test_runtime_helpers import needs_exporter, runtime_env, smollm2_tokenizer_dir, tiny_lm_dir


# ============================================================================ HTTP client helpers
def request(base, method, path, body=None, raw: bytes | None = None, headers=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def jrequest(base, method, path, body=None, **kw):
    status, headers, raw = request(base, method, path, body, **kw)
    ctype = headers.get("Content-Type", "")
    if ctype.startswith("application/json"):
        return status, json.loads(raw)
    return status, raw.decode()


def parse_sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ============================================================================ in-process, stand-in model
class FakeLM:
    """Deterministic stand-in with the Model surface App uses: the completion repeats the prompt's tokens."""

    kind = "causal_lm"
    name = "fake-lm"
    max_positions = 64
    vocab_size = 49152

    def __init__(self):
        self.info = SimpleNamespace(kernel="reference", provider="cpu")
        self.tokenizer = Tokenizer(smollm2_tokenizer_dir())
        self.calls = 0

    def render_chat(self, messages):
        return self.tokenizer.apply_chat_template(messages)

    def stream(self, ids, *, max_new_tokens, stop=(), **kw):
        self.calls += 1
        out = [ids[i % len(ids)] for i in range(max_new_tokens)]
        for t in out:
            yield GenerationChunk(self.tokenizer.decode([t]), [t], None)
        yield GenerationChunk("", [], "length")

    def generate(self, ids, callback=None, **kw):
        parts, toks, finish = [], [], "length"
        for c in self.stream(ids, **kw):
            parts.append(c.text)
            toks += c.token_ids
            finish = c.finish_reason or finish
        return GenerationResult("".join(parts), toks, list(ids), finish)


@pytest.fixture(scope="module")
def fake_server():
    app = App(FakeLM(), ServeConfig(max_body_bytes=4096, max_tokens_limit=32, log=False))
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base, app
    server.shutdown()
    server.server_close()


def test_health_and_models(fake_server):
    base, app = fake_server
    status, body = jrequest(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "fake-lm"
    status, body = jrequest(base, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "fake-lm"
    assert jrequest(base, "GET", "/v1/models/fake-lm")[0] == 200
    status, body = jrequest(base, "GET", "/v1/models/other")
    assert status == 404 and "fake-lm" in body["error"]["message"]


def test_completion_ok(fake_server):
    base, _ = fake_server
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "Hello there", "max_tokens": 3,
                                                              "temperature": 0, "model": "whatever"})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "fake-lm"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    # several prompts -> several choices; token-id prompts
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": ["a", "b c"], "max_tokens": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "n": 1,
                                                              "logprobs": None, "user": "u"})
    assert status == 200


@pytest.mark.parametrize("path,method,expect", [
    ("/nope", "GET", 404), ("/v1/completions", "GET", 405), ("/health", "POST", 405), ("/v1/chat", "POST", 404),
    ("/v1/completions", "PUT", 405), ("/v1/models", "DELETE", 405), ("/", "GET", 404),
])
def test_routes(fake_server, path, method, expect):
    base, _ = fake_server
    status, body = jrequest(base, method, path, {} if method != "GET" else None)
    assert status == expect
    assert isinstance(body, dict) and body["error"]["message"]


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"prompt": "x", "temperature": NaN}', "malformed JSON"),
    (b"\xff\xfe", "UTF-8"),
    (b"", "malformed JSON"),
])
def test_malformed_bodies(fake_server, body, fragment):
    base, _ = fake_server
    status, out = jrequest(base, "POST", "/v1/completions", raw=body)
    assert status == 400 and fragment in out["error"]["message"]


@pytest.mark.parametrize("req,param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "word " * 70}, "prompt"),           # longer than the context
    ({"prompt": "word " * 40, "max_tokens": 30}, "max_tokens"),  # prompt + max_tokens > context
])
def test_invalid_completion_requests(fake_server, req, param):
    base, app = fake_server
    calls = app.model.calls
    status, body = jrequest(base, "POST", "/v1/completions", req)
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"
    assert app.model.calls == calls  # rejected before reaching the model


def test_oversized_body_is_413(fake_server):
    base, _ = fake_server
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "exceeds" in body["error"]["message"]


def test_chat_validation_and_ok(fake_server):
    base, _ = fake_server
    msgs = [{"role": "user", "content": "Hi"}]
    status, body = jrequest(base, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    status, body = jrequest(base, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                             "max_completion_tokens": 2})
    assert status == 200
    # no max_tokens: the default is cut to what the (64-position) context leaves
    status, body = jrequest(base, "POST", "/v1/chat/completions", {"messages": msgs})
    assert status == 200 and 0 < body["usage"]["completion_tokens"] and body["usage"]["total_tokens"] <= 64
    for bad, param in (
        ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0]"),
        ({"messages": msgs, "max_tokens": 1000}, "max_tokens"),
        ({"messages": msgs, "prompt": "x"}, "prompt"),
    ):
        status, body = jrequest(base, "POST", "/v1/chat/completions", bad)
        assert status == 400 and body["error"]["param"] == param, (bad, body)


def test_embeddings_on_an_lm_is_a_clear_400(fake_server):
    base, _ = fake_server
    status, body = jrequest(base, "POST", "/v1/embeddings", {"input": "x"})
    assert status == 400 and "encoder" in body["error"]["message"]


def test_streaming_sse_format(fake_server):
    base, _ = fake_server
    status, headers, raw = request(base, "POST", "/v1/completions", {"prompt": "a b c", "max_tokens": 4,
                                                                     "stream": True,
                                                                     "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(raw.decode())
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 4 and events[-2]["choices"] == []
    finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0] is events[-3]
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "a b c", "max_tokens": 4})
    assert text == body["choices"][0]["text"]
    # chat streaming: role first, content deltas, then an empty delta with finish_reason
    status, headers, raw = request(base, "POST", "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 3, "stream": True})
    events = parse_sse(raw.decode())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_missing_content_length_is_411(fake_server):
    import http.client
    base, _ = fake_server
    host, port = base[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 411
    assert json.loads(r.read())["error"]["code"] == "length_required"


# ============================================================================ end to end: the real server
def _start_server(model_dir, *extra):
    cmd = [sys.executable, "-m", "fips_rt.runtime.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--max-tokens-limit", "64", "--max-prompt-tokens", "128", "--quiet", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runtime_env())
    deadline = time.time() + 180
    line = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"server did not start: {line}")


@pytest.fixture(scope="module")
def live_server():
    d = tiny_lm_dir("fips", last_logits_only=True)
    proc, base = _start_server(d)
    yield proc, base, d
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@needs_exporter
def test_serve_200_concurrent_requests(live_server):
    from fips_rt.runtime.generate import Model
    proc, base, d = live_server
    model = Model.load(d, threads=1)
    prompts = ["The quick brown fox", "Once upon a time", "1, 2, 3,", "Paris is", "def f(x):", "Héllo wörld",
               "In the beginning", "<|im_start|>user\nhi<|im_end|>\n"]
    expected = {}
    for p in prompts:
        for n in (1, 8, 17):
            expected[(p, n)] = model.generate(p, max_new_tokens=n, temperature=0.0).text
    too_long = "token " * 400

    def make(i):
        kind = i % 8
        p = prompts[i % len(prompts)]
        n = (1, 8, 17)[i % 3]
        if kind in (0, 1, 2):
            return "valid", {"prompt": p, "max_tokens": n, "temperature": 0}, (p, n)
        if kind == 3:
            return "valid-stream", {"prompt": p, "max_tokens": n, "temperature": 0, "stream": True}, (p, n)
        if kind == 4:
            return "malformed", b'{"prompt": "x", "max_tokens": ', None
        if kind == 5:
            return "oversized", {"prompt": too_long, "max_tokens": 4}, None
        if kind == 6:
            return "range", {"prompt": p, "max_tokens": (0, 65, -1, 10**9)[i % 4]}, None
        return "type", {"prompt": p, "max_tokens": "8", "temperature": [0]}, None

    def send(i):
        kind, body, key = make(i)
        if kind == "malformed":
            status, _, raw = request(base, "POST", "/v1/completions", raw=body)
        else:
            status, _, raw = request(base, "POST", "/v1/completions", body, timeout=300)
        return i, kind, key, status, raw

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(send, range(200)))
    assert len(results) == 200
    counts = {}
    for i, kind, key, status, raw in results:
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "valid":
            assert status == 200, raw
            assert json.loads(raw)["choices"][0]["text"] == expected[key], (i, key)
        elif kind == "valid-stream":
            assert status == 200, raw
            events = parse_sse(raw.decode())
            assert events[-1] == "[DONE]"
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected[key], (i, key)
        else:
            assert 400 <= status < 500, (kind, status, raw)
            assert json.loads(raw)["error"]["message"]
    assert counts["valid"] + counts["valid-stream"] == 100
    status, body = jrequest(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert proc.poll() is None


@needs_exporter
def test_serve_chat_matches_generate(live_server):
    from fips_rt.runtime.generate import Model
    proc, base, d = live_server
    model = Model.load(d, threads=1)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    want = model.chat(msgs, max_new_tokens=12, temperature=0.0).text
    status, body = jrequest(base, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 12,
                                                                   "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    status, headers, raw = request(base, "POST", "/v1/chat/completions",
                                   {"messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True})
    events = parse_sse(raw.decode())
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == want
    # seeded sampling through the API is reproducible
    req = {"prompt": "Once", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    a = jrequest(base, "POST", "/v1/completions", req)[1]["choices"][0]["text"]
    b = jrequest(base, "POST", "/v1/completions", req)[1]["choices"][0]["text"]
    assert a == b == model.generate("Once", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7).text


@needs_exporter
def test_serve_survives_a_client_leaving_mid_stream(live_server):
    import socket
    proc, base, d = live_server
    host, port = base[len("http://"):].split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "stream": True, "ignore_eos": True}).encode()
    for _ in range(3):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        s.close()
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert status == 200
    assert proc.poll() is None


@needs_exporter
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_graceful_shutdown(sig):
    d = tiny_lm_dir("dense", last_logits_only=True)
    proc, base = _start_server(d)
    try:
        assert jrequest(base, "GET", "/health")[0] == 200
        # a request in flight when the signal arrives still completes
        out = {}
        t = threading.Thread(target=lambda: out.update(r=jrequest(base, "POST", "/v1/completions",
                                                                  {"prompt": "hi", "max_tokens": 64,
                                                                   "temperature": 0, "ignore_eos": True})))
        t.start()
        time.sleep(0.3)
        proc.send_signal(sig)
        t.join(120)
        rc = proc.wait(60)
        assert rc == 0, (rc, proc.stderr.read())
        assert out["r"][0] == 200
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_missing_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "serve", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=runtime_env())
    assert out.returncode != 0 and "No .onnx" in out.stderr


@needs_exporter
def test_serve_embeddings(tmp_path):
    import numpy as np

    from fips_rt.exporter import export
    from fips_rt.runtime.generate import Model
    from fips_rt.testing import tiny_model

    from test_runtime_helpers import VOCAB, hf_tokenizer
    lm = tiny_model("bert", tokenizer=hf_tokenizer(), vocab_size=VOCAB)
    export(lm, str(tmp_path / "model.onnx"), verify=False)
    proc, base = _start_server(tmp_path)
    try:
        texts = ["first sentence", "a second, longer sentence"]
        status, body = jrequest(base, "POST", "/v1/embeddings", {"input": texts, "model": "x"})
        assert status == 200, body
        want = Model.load(tmp_path, threads=1).embed(texts)
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert body["usage"]["prompt_tokens"] > 0
        status, body = jrequest(base, "POST", "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
        import base64
        vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vec, want[0], rtol=1e-4, atol=1e-5)
        for bad in ({"input": 3}, {"input": []}, {"input": "x", "dimensions": 8}, {"inputs": "x"},
                    {"input": "word " * 600}):
            status, body = jrequest(base, "POST", "/v1/embeddings", bad)
            assert status == 400, (bad, body)
        status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "x"})
        assert status == 400 and "causal language model" in body["error"]["message"]
        assert jrequest(base, "GET", "/health")[1]["kind"] == "encoder"
    finally:
        proc.terminate()
        rc = proc.wait(60)
        assert rc == 0, (rc, proc.stderr.read())
