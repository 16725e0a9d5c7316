"""``fips serve`` over HTTP: validation, transport limits, streaming, batching under concurrency, overload,
disconnects, stalled clients (an in-process server on the tiny exported FiPS Llama), then the real command:
``python -m fips_rt.runtime.cli serve`` and SIGTERM."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir

pytestmark = needs_exporter
NEAR_TIE = 1e-3


# ============================================================================ HTTP client helpers
def request(base, method, path, body=None, raw: bytes | None = None, headers=None, timeout=60):
    host, port = base[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def jrequest(base, method, path, body=None, **kw):
    status, headers, raw = request(base, method, path, body, **kw)
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
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


def wait_for(pred, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# ============================================================================ the in-process server
@pytest.fixture(scope="module")
def lm():
    from fips_rt.runtime import Model
    return Model.load(tiny_lm_dir("fips", last_logits_only=True), threads=2)


@pytest.fixture(scope="module")
def server(lm):
    from fips_rt.runtime.serve import ServeConfig, start_in_thread
    cfg = ServeConfig(max_body_bytes=8192, max_tokens_limit=250, max_prompt_tokens=240, body_timeout=1.0,
                      header_timeout=3.0, max_batch=16, max_queue=64, log=False)
    base, app, stop = start_in_thread(lm, cfg)
    yield base, app.state
    stop()


def test_health_models_metrics_openapi(server):
    base, state = server
    status, body = jrequest(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == state.model.name
    assert body["active"] == 0 and body["max_batch"] == 16
    status, body = jrequest(base, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == state.model.name
    assert jrequest(base, "GET", f"/v1/models/{state.model.name}")[0] == 200
    status, body = jrequest(base, "GET", "/v1/models/other")
    assert status == 404 and state.model.name in body["error"]["message"]
    status, schema = jrequest(base, "GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health",
                              "/metrics"} <= set(schema["paths"])
    assert "CompletionRequest" in schema["components"]["schemas"]
    jrequest(base, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    status, headers, raw = request(base, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("fips_requests_total{", "fips_prompt_tokens_total", "fips_completion_tokens_total",
                 "fips_queue_depth", "fips_active_sequences", "fips_batch_size_bucket",
                 "fips_time_to_first_token_seconds_bucket", "fips_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert re.search(r'fips_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)


def test_completions_chat_and_streams_match_generate(server, lm):
    base, _ = server
    want = lm.generate("Hello there", max_new_tokens=6, temperature=0.0)
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "Hello there", "max_tokens": 6,
                                                              "temperature": 0, "model": "whatever"})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == lm.name
    assert body["choices"][0]["text"] == want.text and body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.completion_tokens,
                             "total_tokens": want.prompt_tokens + want.completion_tokens}
    # several prompts -> several choices; token-id prompts; neutral OpenAI fields
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": ["a", "b c"], "max_tokens": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "n": 1,
                                                              "logprobs": None, "user": "u", "echo": False})
    assert status == 200
    # streaming: the same text, one final chunk, usage, [DONE]
    status, headers, raw = request(base, "POST", "/v1/completions",
                                   {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw.decode())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == want.completion_tokens
    finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0] is events[-3]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == want.text
    # chat, plain and streamed
    msgs = [{"role": "user", "content": "Tell me a story."}]
    want = lm.chat(msgs, max_new_tokens=8, temperature=0.0).text
    status, body = jrequest(base, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": want}
    status, _, raw = request(base, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}],
                              "max_completion_tokens": 8, "temperature": 0, "stream": True})
    events = parse_sse(raw.decode())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == want
    # seeded sampling through the API is reproducible and equals the Python API
    req = {"prompt": "Once", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    a = jrequest(base, "POST", "/v1/completions", req)[1]["choices"][0]["text"]
    assert a == jrequest(base, "POST", "/v1/completions", req)[1]["choices"][0]["text"]
    assert a == lm.generate("Once", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7).text


@pytest.mark.parametrize("path,method,expect", [
    ("/nope", "GET", 404), ("/v1/completions", "GET", 405), ("/health", "POST", 405), ("/v1/chat", "POST", 404),
    ("/v1/completions", "PUT", 405), ("/v1/models", "DELETE", 405), ("/", "GET", 404),
])
def test_routes(server, path, method, expect):
    base, _ = server
    status, body = jrequest(base, method, path, {} if method != "GET" else None)
    assert status == expect
    assert isinstance(body, dict) and body["error"]["message"]


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"prompt": "x", "temperature": NaN}', "malformed JSON"),
    (b'{"prompt": "x", "temperature": 1e400}', "out of range"),
    (b'{"prompt": "x", "top_p": 1e400}', "out of range"),
    (b'{"prompt": "x", "top_p": -1e400}', "out of range"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "malformed JSON"),
    (b'{"prompt": "\\ud800 lone"}', "surrogate"),
    (b'{"prompt": "x", "stop": ["\\udfff"]}', "surrogate"),
    (b'{"prompt": "x", "\\ud83d": 1}', "surrogate"),
    (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
    (b"\xff\xfe", "UTF-8"),
    (b"", "malformed JSON"),
])
def test_malformed_bodies(server, body, fragment):
    base, state = server
    if len(body) > 8192:  # over the body limit: 413 first
        status, out = jrequest(base, "POST", "/v1/completions", raw=body)
        assert status == 413
        return
    status, out = jrequest(base, "POST", "/v1/completions", raw=body)
    assert status == 400 and fragment in out["error"]["message"], out


@pytest.mark.parametrize("req,param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 251}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
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
    ({"prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "word " * 245}, "prompt"),                      # longer than --max-prompt-tokens
    ({"prompt": "word " * 230, "max_tokens": 60}, "max_tokens"),  # prompt + max_tokens > context
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
])
def test_invalid_completion_requests(server, req, param):
    base, state = server
    submitted = state.submitted
    status, body = jrequest(base, "POST", "/v1/completions", req)
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"
    if req.get("frobnicate"):
        assert "frobnicate" in body["error"]["message"]
    assert state.submitted == submitted  # refused before reaching the model


def test_chat_validation(server):
    base, _ = server
    msgs = [{"role": "user", "content": "Hi"}]
    status, body = jrequest(base, "POST", "/v1/chat/completions", {"messages": msgs})  # default max_tokens fits
    assert status == 200 and 0 < body["usage"]["completion_tokens"]
    for bad, param in (
        ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         "messages[0].content"),
        ({"messages": msgs, "max_tokens": 1000}, "max_tokens"),
        ({"messages": msgs, "prompt": "x"}, "prompt"),
        ({"messages": msgs, "tools": [{"type": "function"}]}, "tools"),
    ):
        status, body = jrequest(base, "POST", "/v1/chat/completions", bad)
        assert status == 400 and body["error"]["param"] == param, (bad, body)
    status, body = jrequest(base, "POST", "/v1/embeddings", {"input": "x"})
    assert status == 400 and "encoder" in body["error"]["message"]


def test_transport_limits(server):
    base, state = server
    host, port = base[len("http://"):].split(":")
    # 413: an oversized body, by Content-Length and by a chunked body that keeps going
    status, body = jrequest(base, "POST", "/v1/completions", {"prompt": "x" * 9000})
    assert status == 413 and "exceeds" in body["error"]["message"]
    # 415: not JSON (what a browser form or fetch() with a plain-text body would send)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/json; charset=latin-1"):
        status, body = jrequest(base, "POST", "/v1/completions", raw=b'{"prompt": "x"}', headers={"Content-Type": ctype})
        assert status == 415, (ctype, body)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=b'{"prompt": "x", "max_tokens": 1}')  # no Content-Type
    r = conn.getresponse()
    assert r.status == 415 and json.loads(r.read())["error"]["code"] == "unsupported_media_type"
    conn.close()
    # a chunked body is read like any other
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    payload = b'{"prompt": "Hi", "max_tokens": 2}'
    conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    r = conn.getresponse()
    assert r.status == 200, r.read()
    r.read()
    # keep-alive: the same connection serves the next requests
    sock_before = conn.sock
    for _ in range(3):
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("connection", "").lower() != "close"
        r.read()
    assert conn.sock is sock_before
    conn.close()
    # 408: a body that stalls (1 s body timeout here), and the connection is closed after it
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data


def _stall(host, port, kind, body=None):
    s = socket.create_connection((host, port), timeout=60)
    if kind == "headers":
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    elif kind == "body":
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\"")
    elif kind == "nothing":
        pass
    else:  # a stream that is never read
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def test_stalled_clients_do_not_block_health_or_others(server):
    base, state = server
    host, port = base[len("http://"):].split(":")
    port = int(port)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "stream": True, "ignore_eos": True}).encode()
    socks = [_stall(host, port, ("headers", "body", "nothing", "stream")[i % 4], body) for i in range(40)]
    try:
        t0 = time.perf_counter()
        status, h = jrequest(base, "GET", "/health", timeout=5)  # the acceptance bound, as a hang guard
        assert status == 200 and h["status"] == "ok"
        status, out = jrequest(base, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert status == 200, out
        assert time.perf_counter() - t0 < 60
        # the stalled headers are dropped at the header timeout (3 s here): the server closes them
        s = socks[0]
        s.settimeout(30)
        assert s.recv(100) == b""
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: jrequest(base, "GET", "/health")[1]["active"] == 0)


def test_disconnect_mid_stream_frees_the_slot(lm):
    from fips_rt.runtime.serve import ServeConfig, start_in_thread
    base, app, stop = start_in_thread(SlowLM(lm), ServeConfig(max_tokens_limit=250, log=False))
    try:
        _disconnect(base, app.state)
    finally:
        stop()


def _disconnect(base, state):
    host, port = base[len("http://"):].split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 250, "stream": True, "ignore_eos": True,
                       "temperature": 0}).encode()
    steps = state.scheduler.steps
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(64).startswith(b"HTTP/1.1 200")
    seen_active = wait_for(lambda: state.scheduler.stats()["active"] >= 1, 30)
    s.close()
    assert seen_active
    assert wait_for(lambda: state.scheduler.stats()["active"] == 0, 30)
    assert state.scheduler.steps < steps + 249  # cancelled before max_tokens
    assert jrequest(base, "GET", "/health")[1]["active"] == 0


def test_concurrent_greedy_requests_equal_served_alone(server, lm):
    """16 clients at once: each greedy completion equals the same request served alone (near-ties excepted),
    the batch really held several sequences, and invalid requests mixed in get 4xx."""
    base, state = server
    rng = np.random.default_rng(3)
    prompts = [[int(x) for x in rng.integers(0, 49152, n)] for n in (5, 12, 3, 20, 7, 16, 9, 2)]
    alone = {}
    for i, p in enumerate(prompts):
        status, body = jrequest(base, "POST", "/v1/completions", {"prompt": p, "max_tokens": 24, "temperature": 0,
                                                                  "ignore_eos": True})
        assert status == 200
        alone[i] = body["choices"][0]["text"]
    before = state.metrics.batch_size.collect()[0].samples

    def send(i):
        if i % 5 == 4:
            return i, jrequest(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"})
        return i, jrequest(base, "POST", "/v1/completions", {"prompt": prompts[i % 8], "max_tokens": 24,
                                                             "temperature": 0, "ignore_eos": True}, timeout=300)

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(send, range(40)))
    diverged = []
    for i, (status, body) in results:
        if i % 5 == 4:
            assert status == 400 and body["error"]["param"] == "max_tokens"
            continue
        assert status == 200, body
        text = body["choices"][0]["text"]
        if text != alone[i % 8]:
            diverged.append(i % 8)
    for j in set(diverged):  # a divergence must sit at a near-tie of the sequence decoded alone
        logits, cache = lm.prefill(prompts[j])
        ids = []
        tok = lm.tokenizer
        for _ in range(24):
            top = np.sort(logits)[-2:]
            t = int(np.argmax(logits))
            ids.append(t)
            if not alone[j].startswith(tok.decode(ids)):
                break
            logits, cache = lm.forward([t], cache)
        assert top[1] - top[0] < NEAR_TIE, f"prompt {j} diverged away from a near-tie"
    after = state.metrics.batch_size.collect()[0].samples
    total = {s.name: s.value for s in after if s.name.endswith("_sum")}
    count = {s.name: s.value for s in after if s.name.endswith("_count")}
    b_sum = total["fips_batch_size_sum"] - {s.name: s.value for s in before}["fips_batch_size_sum"]
    b_cnt = count["fips_batch_size_count"] - {s.name: s.value for s in before}["fips_batch_size_count"]
    assert b_sum / b_cnt > 2, "the concurrent requests were not decoded together"


class SlowLM:
    """The tiny LM with a pause in every decode step, so that requests stay in flight while a test looks."""

    def __init__(self, lm, pause_s=0.02):
        self._lm, self._pause = lm, pause_s

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def decode_batch(self, *args, **kwargs):
        time.sleep(self._pause)
        return self._lm.decode_batch(*args, **kwargs)


def test_overload_gets_503_with_retry_after(lm):
    from fips_rt.runtime.serve import ServeConfig, start_in_thread
    base, app, stop = start_in_thread(SlowLM(lm), ServeConfig(max_batch=1, max_queue=1, max_tokens_limit=250,
                                                              log=False))
    try:
        host, port = base[len("http://"):].split(":")
        body = json.dumps({"prompt": "Hi", "max_tokens": 250, "stream": True, "ignore_eos": True}).encode()
        socks = []
        for _ in range(2):  # one decoding, one queued
            socks.append(_stall(host, int(port), "stream", body))
            assert wait_for(lambda: app.state.scheduler.stats()["active"] + app.state.scheduler.stats()["queued"]
                            >= len(socks), 30)
        status, headers, raw = request(base, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1", raw
        assert json.loads(raw)["error"]["code"] == "overloaded"
        assert jrequest(base, "GET", "/health", timeout=5)[0] == 200
        for s in socks:
            s.close()
        assert wait_for(lambda: app.state.scheduler.stats()["active"] == 0 and app.state.scheduler.stats()["queued"] == 0)
        assert jrequest(base, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    finally:
        stop()


# ============================================================================ the real command
def _start_server(model_dir, *extra):
    cmd = [sys.executable, "-m", "fips_rt.runtime.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--max-tokens-limit", "250", "--quiet", "-t", "1", *extra]
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


def test_sigterm_finishes_or_ends_in_flight_requests_and_exits_0():
    d = tiny_lm_dir("fips", last_logits_only=True)
    proc, base = _start_server(d, "--max-batch", "1", "--shutdown-timeout", "1.5")
    try:
        assert jrequest(base, "GET", "/health")[0] == 200
        out = {}

        def stream(i):
            out[i] = request(base, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 250, "temperature": 0,
                                                               "ignore_eos": True, "stream": True}, timeout=120)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):  # new connections are refused
            request(base, "GET", "/health", timeout=5)
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
        assert rc == 0, (rc, proc.stderr.read())
        assert time.time() - t0 < 30
        ends = []
        for i in range(4):
            status, _, raw = out[i]
            assert status == 200
            events = parse_sse(raw.decode())
            assert events[-1] == "[DONE]"
            last = events[-2]
            if "error" in last:
                assert last["error"]["code"] == "server_shutdown"
                ends.append("error")
            else:
                assert last["choices"][0]["finish_reason"] == "length"
                ends.append("finished")
        assert set(ends) <= {"finished", "error"}  # each stream ends with a finish or a clear final error event
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_missing_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "serve", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=runtime_env())
    assert out.returncode != 0 and "No .onnx" in out.stderr


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_stays_flat_over_a_bounded_soak():
    """After a warm-up, 6 more rounds of the same mixed, concurrent load (completions, streamed chat, bad
    requests, embeddings refused on an LM) leave the server's RSS within 10% of its post-warm-up value."""
    d = tiny_lm_dir("fips", last_logits_only=True)
    proc, base = _start_server(d, "--max-batch", "8")
    bodies = [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}),
        ("/v1/completions", {"prompt": "1 2 3", "max_tokens": 16, "temperature": 0.8, "seed": 3, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
                                  "stream": True}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 8, "bogus_field": 1}),          # 400
        ("/v1/embeddings", {"input": "an LM has no embeddings endpoint"}),                  # 4xx
    ]

    def round_():
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda b: request(base, "POST", b[0], b[1], timeout=120)[0], bodies * 4))
        assert all(s < 500 for s in statuses), statuses

    try:
        for _ in range(3):  # warm-up: arenas, caches, lazy imports
            round_()
        after_warmup = _rss_mib(proc.pid)
        samples = []
        for _ in range(6):
            round_()
            samples.append(_rss_mib(proc.pid))
        assert max(samples) <= 1.10 * after_warmup, (after_warmup, samples)
        assert jrequest(base, "GET", "/health")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
