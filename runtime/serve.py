"""``fips serve``: an OpenAI-style HTTP server around one exported model (standard library only).

Endpoints::

    GET  /health                 {"status": "ok", "model": ..., "kind": ...}
    GET  /v1/models              {"object": "list", "data": [{"id": ..., "object": "model", ...}]}
    GET  /v1/models/{id}
    POST /v1/completions         causal LMs; "stream": true -> server-sent events
    POST /v1/chat/completions    causal LMs with a chat template; "stream": true -> server-sent events
    POST /v1/embeddings          encoders

The model is loaded once. Connections are handled by a bounded thread pool; calls into the one
onnxruntime session are limited by a semaphore (``concurrency``, default 1: requests are served one
after the other, each using all intra-op threads). Request bodies, prompt lengths and ``max_tokens`` are
bounded; every invalid request gets a 4xx JSON error ``{"error": {"message", "type", "param", "code"}}``.
SIGINT/SIGTERM stop accepting, let in-flight requests finish, then exit.
"""
from __future__ import annotations

import json
import math
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable

from .generate import FipsRuntimeError, GenerationResult, Model

# ============================================================================ configuration
@dataclass
class ServeConfig:
    max_body_bytes: int = 1 << 20        # 1 MiB
    max_prompt_tokens: int | None = None  # None: the model's context (minus 1), else 2048
    max_tokens_limit: int = 1024          # upper bound of "max_tokens"
    default_max_tokens: int = 16          # OpenAI's default for /v1/completions
    max_batch: int = 32                   # prompts per /v1/completions, inputs per /v1/embeddings
    max_stop: int = 4
    concurrency: int = 1                  # model calls in flight
    workers: int = 32                     # connection-handling threads
    socket_timeout: float = 60.0          # seconds to receive a request
    log: bool = True


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ============================================================================ validation helpers
_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _bad(param: str, msg: str) -> ApiError:
    return ApiError(400, f"'{param}': {msg}", param=param, code="invalid_value")


def _get_int(req: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = req.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not _is_int(v):
        raise _bad(name, f"expected an integer, got {_type_name(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"must be between {lo} and {hi}, got {v}")
    return v


def _get_num(req: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = req.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not _is_num(v):
        raise _bad(name, f"expected a number, got {_type_name(v)}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _get_bool(req: dict, name: str, default: bool) -> bool:
    v = req.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"expected a boolean, got {_type_name(v)}")
    return v


# fields accepted (and ignored) only at their neutral value: {name: predicate}
_NEUTRAL = {
    "n": lambda v: v is None or v == 1,
    "best_of": lambda v: v is None or v == 1,
    "echo": lambda v: v is None or v is False,
    "logprobs": lambda v: v is None or v is False or v == 0,
    "top_logprobs": lambda v: v is None or v == 0,
    "suffix": lambda v: v is None or v == "",
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "logit_bias": lambda v: v is None or v == {},
    "user": lambda v: v is None or isinstance(v, str),
    "parallel_tool_calls": lambda v: True,
    "tool_choice": lambda v: v is None or v == "none",
    "tools": lambda v: v is None or v == [],
    "response_format": lambda v: v is None or v == {"type": "text"},
    "service_tier": lambda v: True,
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None or isinstance(v, dict),
}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
             "ignore_eos", "stop_token_ids"}
COMPLETION_FIELDS = _SAMPLING | {"prompt"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user", "dimensions"}


def _check_fields(req: dict, allowed: set[str]) -> None:
    for k, v in req.items():
        if k in allowed:
            continue
        if k in _NEUTRAL:
            if not _NEUTRAL[k](v):
                raise ApiError(400, f"'{k}' = {json.dumps(v)[:80]} is not supported by this server",
                               param=k, code="unsupported_value")
            continue
        raise ApiError(400, f"unknown field '{k}'", param=k, code="unknown_field")


# ============================================================================ the application
class App:
    """Request handling independent of the HTTP plumbing (also usable in-process in tests)."""

    def __init__(self, model: Model, config: ServeConfig | None = None):
        self.model = model
        self.config = config or ServeConfig()
        self.created = int(time.time())
        self.model_slots = threading.BoundedSemaphore(max(1, self.config.concurrency))
        self.stats_lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        ctx = getattr(model, "max_positions", None)
        cfg = self.config
        if cfg.max_prompt_tokens is None:
            cfg.max_prompt_tokens = (ctx - 1) if ctx else 2048
        if model.kind in ("causal_lm", "encoder"):
            model.tokenizer  # load the tokenizer now: fail at start-up, not on the first request

    # ---------------------------------------------------------------- GET
    def health(self) -> dict:
        return {"status": "ok", "model": self.model.name, "kind": self.model.kind,
                "kernel": self.model.info.kernel, "provider": self.model.info.provider,
                "requests": self.requests}

    def model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "fips-rt",
                "kind": self.model.kind, "max_positions": getattr(self.model, "max_positions", None)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    # ---------------------------------------------------------------- generation requests
    def _require_lm(self, endpoint: str) -> None:
        if self.model.kind != "causal_lm":
            raise ApiError(400, f"{endpoint} needs a causal language model; '{self.model.name}' is a "
                                f"{self.model.kind.replace('_', ' ')}", code="wrong_model_kind")

    def _sampling(self, req: dict, *, chat: bool) -> dict:
        cfg = self.config
        if "model" in req and req["model"] is not None and not isinstance(req["model"], str):
            raise _bad("model", f"expected a string, got {_type_name(req['model'])}")
        max_name = "max_tokens"
        if chat and req.get("max_completion_tokens") is not None:
            max_name = "max_completion_tokens"
        # None: not given -> a default that fits the context, chosen once the prompt is tokenized
        max_tokens = _get_int(req, max_name, None, 1, cfg.max_tokens_limit)
        opts = {
            "max_new_tokens": max_tokens,
            "temperature": _get_num(req, "temperature", 1.0, 0.0, 2.0),
            "top_p": _get_num(req, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "top_k": _get_int(req, "top_k", 0, 0, 1 << 30),
            "seed": _get_int(req, "seed", None, 0, (1 << 63) - 1),
            "ignore_eos": _get_bool(req, "ignore_eos", False),
        }
        stop = req.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, list):
            if not all(isinstance(s, str) for s in stop):
                raise _bad("stop", "expected a string or an array of strings")
        else:
            raise _bad("stop", f"expected a string or an array of strings, got {_type_name(stop)}")
        if len(stop) > cfg.max_stop:
            raise _bad("stop", f"at most {cfg.max_stop} stop strings")
        if any(len(s) == 0 or len(s) > 256 for s in stop):
            raise _bad("stop", "stop strings must have 1 to 256 characters")
        opts["stop"] = stop
        st = req.get("stop_token_ids")
        if st is not None:
            if not isinstance(st, list) or not all(_is_int(t) for t in st) or len(st) > 64:
                raise _bad("stop_token_ids", "expected an array of at most 64 integers")
            opts["stop_token_ids"] = st
        so = req.get("stream_options")
        if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}
                               or not isinstance(so.get("include_usage", False), bool)):
            raise _bad("stream_options", 'expected {"include_usage": true|false}')
        return opts

    def _default_max_tokens(self, opts: dict, prompt_lens: list[int], *, chat: bool) -> None:
        if opts["max_new_tokens"] is not None:
            return
        cfg = self.config
        default = min(256 if chat else cfg.default_max_tokens, cfg.max_tokens_limit)
        ctx = self.model.max_positions
        if ctx:
            default = min(default, ctx - max(prompt_lens))
        opts["max_new_tokens"] = max(1, default)

    def _check_prompt_len(self, ids: list[int], max_new: int, param: str) -> None:
        cfg = self.config
        if not ids:
            raise _bad(param, "the prompt is empty")
        if len(ids) > cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{cfg.max_prompt_tokens}", param=param, code="context_length_exceeded")
        ctx = self.model.max_positions
        if ctx and len(ids) + max_new > ctx:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds the model's "
                                f"context of {ctx} positions", param="max_tokens", code="context_length_exceeded")

    def prepare_completion(self, req: dict) -> tuple[list[list[int]], dict, bool, bool]:
        self._require_lm("/v1/completions")
        _check_fields(req, COMPLETION_FIELDS)
        if "prompt" not in req:
            raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_field")
        opts = self._sampling(req, chat=False)
        p = req["prompt"]
        tok = self.model.tokenizer
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) > self.config.max_batch:
                raise _bad("prompt", f"at most {self.config.max_batch} prompts per request")
            prompts = [tok.encode(x) for x in p]
        elif isinstance(p, list) and p and all(_is_int(x) for x in p):
            prompts = [list(p)]
        elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_int(y) for y in x) for x in p):
            if len(p) > self.config.max_batch:
                raise _bad("prompt", f"at most {self.config.max_batch} prompts per request")
            prompts = [list(x) for x in p]
        else:
            raise _bad("prompt", "expected a non-empty string, array of strings, array of token ids or array of "
                                 f"arrays of token ids; got {_type_name(p)}")
        vocab = self.model.vocab_size
        self._default_max_tokens(opts, [len(x) for x in prompts], chat=False)
        for ids in prompts:
            if vocab and any(not 0 <= t < vocab for t in ids):
                raise _bad("prompt", f"token ids must be in [0, {vocab})")
            self._check_prompt_len(ids, opts["max_new_tokens"], "prompt")
        stream = _get_bool(req, "stream", False)
        if stream and len(prompts) > 1:
            raise _bad("stream", "streaming supports a single prompt")
        include_usage = bool((req.get("stream_options") or {}).get("include_usage", False))
        return prompts, opts, stream, include_usage

    def prepare_chat(self, req: dict) -> tuple[list[int], dict, bool, bool]:
        self._require_lm("/v1/chat/completions")
        _check_fields(req, CHAT_FIELDS)
        msgs = req.get("messages", _MISSING)
        if msgs is _MISSING:
            raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_field")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("messages", "expected a non-empty array of messages")
        if len(msgs) > 1024:
            raise _bad("messages", "at most 1024 messages")
        clean = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad(where, f"expected an object, got {_type_name(m)}")
            extra = set(m) - {"role", "content", "name"}
            if extra:
                raise _bad(where, f"unknown field(s) {sorted(extra)}")
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise _bad(f"{where}.role", "expected one of system, developer, user, assistant")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise _bad(f"{where}.content", "only text content parts are supported")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise _bad(f"{where}.content", f"expected a string, got {_type_name(content)}")
            msg = {"role": "system" if role == "developer" else role, "content": content}
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
            clean.append(msg)
        opts = self._sampling(req, chat=True)
        try:
            text = self.model.render_chat(clean)
        except FipsRuntimeError as e:
            raise ApiError(400, str(e), param="messages", code="chat_template_error")
        ids = self.model.tokenizer.encode(text, add_special_tokens=False)
        self._default_max_tokens(opts, [len(ids)], chat=True)
        self._check_prompt_len(ids, opts["max_new_tokens"], "messages")
        stream = _get_bool(req, "stream", False)
        include_usage = bool((req.get("stream_options") or {}).get("include_usage", False))
        return ids, opts, stream, include_usage

    def run_generation(self, ids: list[int], opts: dict, callback=None) -> GenerationResult:
        with self.model_slots:
            return self.model.generate(ids, callback=callback, **opts)

    def complete(self, req: dict) -> dict:
        prompts, opts, _, _ = self.prepare_completion(req)
        return self.complete_prepared(prompts, opts)

    def complete_prepared(self, prompts: list[list[int]], opts: dict) -> dict:
        choices, pt, ct = [], 0, 0
        for i, ids in enumerate(prompts):
            r = self.run_generation(ids, opts)
            choices.append({"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason})
            pt += r.prompt_tokens
            ct += r.completion_tokens
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name, "choices": choices,
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}

    def chat(self, req: dict) -> dict:
        ids, opts, _, _ = self.prepare_chat(req)
        return self.chat_prepared(ids, opts)

    def chat_prepared(self, ids: list[int], opts: dict) -> dict:
        r = self.run_generation(ids, opts)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                             "finish_reason": r.finish_reason}],
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                          "total_tokens": r.prompt_tokens + r.completion_tokens}}

    def stream_events(self, ids: list[int], opts: dict, *, chat: bool, include_usage: bool):
        """Yield the JSON objects of a streamed completion (the caller writes them as SSE)."""
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta_text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict = {}
                if first:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return {"id": cid, "object": obj, "created": created, "model": self.model.name, "choices": [choice]}

        if chat:
            yield event("", None, first=True)
        n = 0
        with self.model_slots:
            for chunk in self.model.stream(ids, **opts):
                n += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    if chunk.text:
                        yield event(chunk.text, None)
                    yield event(None if chat else "", chunk.finish_reason)
                elif chunk.text:
                    yield event(chunk.text, None)
        if include_usage:
            yield {"id": cid, "object": obj, "created": created, "model": self.model.name, "choices": [],
                   "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    # ---------------------------------------------------------------- embeddings
    def embeddings(self, req: dict) -> dict:
        if self.model.kind != "encoder":
            raise ApiError(400, f"/v1/embeddings needs an encoder model; '{self.model.name}' is a "
                                f"{self.model.kind.replace('_', ' ')}", code="wrong_model_kind")
        _check_fields(req, EMBEDDING_FIELDS)
        if "model" in req and req["model"] is not None and not isinstance(req["model"], str):
            raise _bad("model", f"expected a string, got {_type_name(req['model'])}")
        inp = req.get("input", _MISSING)
        if inp is _MISSING:
            raise ApiError(400, "missing required field 'input'", param="input", code="missing_field")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
            texts = inp
        else:
            raise _bad("input", "expected a string or a non-empty array of strings")
        if len(texts) > self.config.max_batch:
            raise _bad("input", f"at most {self.config.max_batch} inputs per request")
        fmt = req.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("encoding_format", "expected 'float' or 'base64'")
        if req.get("dimensions") is not None:
            raise ApiError(400, "'dimensions' is not supported by this model", param="dimensions",
                           code="unsupported_value")
        tok = self.model.tokenizer
        limit = min(x for x in (self.config.max_prompt_tokens, self.model.max_input_tokens()) if x) \
            if (self.config.max_prompt_tokens or self.model.max_input_tokens()) else None
        n_tokens = 0
        for i, t in enumerate(texts):
            k = len(tok.encode(t))
            n_tokens += k
            if limit and k > limit:
                raise ApiError(400, f"input[{i}] has {k} tokens; this model accepts at most {limit}",
                               param="input", code="context_length_exceeded")
        with self.model_slots:
            emb = self.model.embed(texts)
        data = []
        for i, row in enumerate(emb):
            if fmt == "base64":
                import base64
                vec: Any = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
            else:
                vec = [float(x) for x in row]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return {"object": "list", "data": data, "model": self.model.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


# ============================================================================ HTTP plumbing
GET_ROUTES = {"/health", "/v1/models"}
POST_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}


class Handler(BaseHTTPRequestHandler):
    server_version = "fips-serve/0.1"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by make_server

    # -- plumbing
    def setup(self):
        super().setup()
        self.connection.settimeout(self.app.config.socket_timeout)

    def log_message(self, fmt, *args):  # noqa: N802 - stdlib name
        if self.app.config.log:
            sys.stderr.write(f"[fips serve] {self.address_string()} {fmt % args}\n")

    def _send_json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _send_error(self, e: ApiError, headers: dict | None = None) -> None:
        with self.app.stats_lock:
            self.app.errors += 1
        self._send_json(e.status, e.body(), headers)

    def _path(self) -> str:
        p = self.path.split("?", 1)[0].split("#", 1)[0]
        return p.rstrip("/") or "/"

    def _route_error(self, path: str) -> ApiError:
        if path in GET_ROUTES or path.startswith("/v1/models/"):
            return ApiError(405, f"method {self.command} not allowed on {path}; use GET", code="method_not_allowed")
        if path in POST_ROUTES:
            return ApiError(405, f"method {self.command} not allowed on {path}; use POST", code="method_not_allowed")
        return ApiError(404, f"no such endpoint: {self.command} {path}", code="not_found")

    def _read_json(self) -> dict:
        cfg = self.app.config
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise ApiError(411, "send the body with a Content-Length (chunked transfer encoding is not supported)",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a JSON body with a Content-Length header is required", code="length_required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {length!r}", code="bad_request") from None
        if n > cfg.max_body_bytes:
            raise ApiError(413, f"request body of {n} bytes exceeds the limit of {cfg.max_body_bytes} bytes",
                           code="request_too_large")
        raw = self.rfile.read(n)
        if len(raw) != n:
            raise ApiError(400, "request body shorter than its Content-Length", code="bad_request")

        def no_constants(c):
            raise ValueError(f"{c} is not valid JSON")

        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8", code="invalid_json") from None
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the JSON body must be an object, got {_type_name(obj)}", code="invalid_json")
        return obj

    # -- methods
    def do_GET(self):  # noqa: N802
        path = self._path()
        with self.app.stats_lock:
            self.app.requests += 1
        try:
            if path == "/health":
                return self._send_json(200, self.app.health())
            if path == "/v1/models":
                return self._send_json(200, self.app.models())
            if path.startswith("/v1/models/"):
                mid = path[len("/v1/models/"):]
                if mid == self.app.model.name:
                    return self._send_json(200, self.app.model_card())
                raise ApiError(404, f"model '{mid}' not found; this server serves '{self.app.model.name}'",
                               code="model_not_found")
            raise self._route_error(path)
        except ApiError as e:
            self._send_error(e, {"Allow": "GET"} if e.status == 405 else None)

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_POST(self):  # noqa: N802
        path = self._path()
        with self.app.stats_lock:
            self.app.requests += 1
        app = self.app
        try:
            if path not in POST_ROUTES:
                raise self._route_error(path)
            req = self._read_json()
            if path == "/v1/embeddings":
                return self._send_json(200, app.embeddings(req))
            if path == "/v1/completions":
                prompts, opts, stream, usage = app.prepare_completion(req)
                if stream:
                    return self._stream(app.stream_events(prompts[0], opts, chat=False, include_usage=usage))
                return self._send_json(200, app.complete_prepared(prompts, opts))
            ids, opts, stream, usage = app.prepare_chat(req)
            if stream:
                return self._stream(app.stream_events(ids, opts, chat=True, include_usage=usage))
            return self._send_json(200, app.chat_prepared(ids, opts))
        except ApiError as e:
            self._send_error(e, {"Allow": "POST"} if e.status == 405 else None)
        except FipsRuntimeError as e:
            self._send_error(ApiError(400, str(e), code="invalid_request"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # keep serving; report the failure
            self.log_message("internal error: %r", e)
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    def _other(self):
        try:
            raise self._route_error(self._path())
        except ApiError as e:
            allow = "GET" if (self._path() in GET_ROUTES) else "POST"
            self._send_error(e, {"Allow": allow} if e.status == 405 else None)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other  # noqa: N815

    def _stream(self, events) -> None:
        """Write events as server-sent events (``data: {...}`` lines, then ``data: [DONE]``)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for ev in events:
                self.wfile.write(b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away; the generator is closed and the model slot released
        except Exception as e:  # headers are gone: report in-band
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").body()
            try:
                self.wfile.write(b"data: " + json.dumps(err).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            except OSError:
                pass
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # releases the model slot at once when the client went away


class PoolHTTPServer(HTTPServer):
    """HTTPServer whose connections are handled by a bounded thread pool."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, workers: int):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fips-serve")
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.pool.submit(self._work, request, client_address)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, socket.timeout)):
            return
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=True)


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> PoolHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    return PoolHTTPServer((host, port), handler, app.config.workers)


def serve(model: Model, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          *, on_ready: Callable[[PoolHTTPServer], Any] | None = None, install_signals: bool = True) -> None:
    """Serve ``model`` until SIGINT/SIGTERM (or ``server.shutdown()``); in-flight requests complete."""
    app = App(model, config)
    server = make_server(app, host, port)
    if install_signals:
        def stop(signum, frame):
            sys.stderr.write(f"[fips serve] {signal.Signals(signum).name}: shutting down\n")
            threading.Thread(target=server.shutdown, daemon=True).start()
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # waits for in-flight requests
