"""``fips serve``: an OpenAI-style HTTP server around one exported model (FastAPI under uvicorn).

Endpoints::

    GET  /health                 {"status": "ok", "model", "kind", "active", "queued", ...}
    GET  /v1/models              {"object": "list", "data": [{"id": ..., "object": "model", ...}]}
    GET  /v1/models/{id}
    POST /v1/completions         causal LMs; "stream": true -> server-sent events
    POST /v1/chat/completions    causal LMs with a chat template; "stream": true -> server-sent events
    POST /v1/embeddings          encoders
    GET  /metrics                Prometheus text format
    GET  /openapi.json           the schema of all of the above

Transport: uvicorn (asyncio, HTTP/1.1 keep-alive); a request's headers must arrive within
``header_timeout`` and its body within ``body_timeout`` (408), only ``application/json`` bodies are read
(415), at most ``max_body_bytes`` (413). Bodies are validated by the pydantic models of
:mod:`fips_rt.runtime.serve_api`; every client mistake is a 4xx JSON error ``{"error": {"message", "type",
"param", "code"}}``. Generation runs in the :class:`~fips_rt.runtime.serve_scheduler.Scheduler` thread,
which owns the session and decodes all active sequences in one call per step; beyond its queue requests
get 503 with ``Retry-After``. A client that disconnects is cancelled at the next step. SIGINT/SIGTERM: new
connections are refused, in-flight requests finish within ``shutdown_timeout`` (or end with an error
event), then the process exits 0.
"""
import asyncio
import base64
import json
import math
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from starlette.responses import Response as StarletteResponse

from .serve_scheduler import Overloaded, Scheduler, SchedulerConfig, Sequence, SequenceEnd, ShuttingDown
from .session import FipsRuntimeError

__all__ = ["ServeConfig", "ApiError", "App", "create_app", "serve", "start_in_thread"]


# ============================================================================ configuration
@dataclass
class ServeConfig:
    max_body_bytes: int = 1 << 20         # 1 MiB
    max_prompt_tokens: int | None = None  # None: the model's context (minus 1), else 2048
    max_tokens_limit: int = 1024          # upper bound of "max_tokens"
    default_max_tokens: int = 16          # OpenAI's default for /v1/completions
    max_inputs: int = 32                  # prompts per /v1/completions, inputs per /v1/embeddings
    max_batch: int = 16                   # sequences decoded together in one session call
    max_queue: int = 64                   # sequences waiting for a batch slot; beyond: 503 + Retry-After
    kv_cache_mib: float | None = 2048.0   # bound of the batch's KV cache (rows x widest reservation)
    prefill_chunk: int | None = None      # prompt tokens per scheduler step (None: the model's prefill_chunk)
    header_timeout: float = 10.0          # seconds for a request's headers (idle keep-alive: keep_alive_timeout)
    body_timeout: float = 10.0            # seconds for a request's body -> 408
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 25.0        # SIGTERM: in-flight requests get this long, then end with an error
    max_connections: int = 1024           # open connections + tasks; beyond: 503 (uvicorn)
    retry_after_s: int = 1
    flush_wait_s: float = 0.003           # scheduler: wait this long at most for a step's tokens to be sent (0: off)
    log: bool = True


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type_ or ("invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, msg: str) -> ApiError:
    return ApiError(400, f"'{param}': {msg}", param=param, code="invalid_value")


def _error_bytes(e: ApiError) -> bytes:
    return json.dumps(e.body()).encode("utf-8")  # ASCII-escaped: never fails, whatever the message holds


POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
GET_ROUTES = ("/health", "/v1/models", "/metrics", "/openapi.json")


def _endpoint_label(path: str) -> str:
    if path in POST_ROUTES or path in GET_ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


# ============================================================================ the application state
class App:
    """What the endpoints share: the model, the limits, the scheduler, the metrics."""

    def __init__(self, model, config: ServeConfig | None = None):
        from .serve_metrics import Metrics

        self.model = model
        self.config = cfg = config or ServeConfig()
        self.created = int(time.time())
        self.requests = 0
        self.submitted = 0       # sequences handed to the scheduler
        self._lock = threading.Lock()
        ctx = getattr(model, "max_positions", None)
        if cfg.max_prompt_tokens is None:
            cfg.max_prompt_tokens = (ctx - 1) if ctx else 2048
        if model.kind in ("causal-lm", "encoder"):
            model.tokenizer  # load the tokenizer now: fail at start-up, not on the first request
        self.metrics = Metrics(max_batch=cfg.max_batch)
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving event loop (set at start-up)
        self.scheduler = Scheduler(model, SchedulerConfig(max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                                          max_kv_tokens=self._kv_tokens(),
                                                          prefill_chunk=cfg.prefill_chunk,
                                                          flush_wait_s=cfg.flush_wait_s),
                                   metrics=self.metrics, flush=self.flush).start()

    def flush(self, timeout: float) -> None:
        """Scheduler thread: wait (at most ``timeout`` s) until the event loop has run what the emits of this
        step queued -- the stream tasks they woke, i.e. the SSE writes -- so that the loop's work runs now,
        while onnxruntime is idle, rather than during the next session call. Two hops: the first callback
        runs after the emits' callbacks, the tasks they woke run after it, the second callback after those."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(lambda: loop.call_soon(done.set))
        except RuntimeError:  # the loop is gone (shutdown)
            return
        done.wait(timeout)

    def _kv_tokens(self) -> int | None:
        mib = self.config.kv_cache_mib
        specs = getattr(self.model, "_past_specs", None)
        if not mib or not specs:
            return None
        per_token = sum(h * d * np.dtype(dt).itemsize for (_, h, _, d), dt in specs)
        return max(1, int(mib * (1 << 20) // per_token))

    def count_request(self, path: str, status: int | None) -> None:
        with self._lock:
            self.requests += 1
        self.metrics.requests.labels(_endpoint_label(path), str(status or 0)).inc()

    # ---------------------------------------------------------------- GET
    def health(self) -> dict:
        st = self.scheduler.stats()
        return {"status": "shutting_down" if self.scheduler.stopping else "ok", "model": self.model.name,
                "kind": self.model.kind, "kernel": self.model.info.kernel, "provider": self.model.info.provider,
                "requests": self.requests, "active": st["active"], "queued": st["queued"],
                "max_batch": self.config.max_batch}

    def model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "fips-rt",
                "kind": self.model.kind, "max_positions": getattr(self.model, "max_positions", None)}

    # ---------------------------------------------------------------- generation requests
    def require_kind(self, kind: str, endpoint: str) -> None:
        if self.model.kind != kind:
            what = {"causal-lm": "a causal language model", "encoder": "an encoder model"}[kind]
            raise ApiError(400, f"{endpoint} needs {what}; '{self.model.name}' is a "
                                f"{self.model.kind.replace('_', ' ')}", code="wrong_model_kind")

    def _sampling(self, req, *, chat: bool) -> dict:
        cfg = self.config
        name, max_tokens = "max_tokens", req.max_tokens
        if chat and req.max_completion_tokens is not None:
            name, max_tokens = "max_completion_tokens", req.max_completion_tokens
        if max_tokens is not None and not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise _bad(name, f"must be between 1 and {cfg.max_tokens_limit}, got {max_tokens}")
        stop = req.stop
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        opts = {"max_new_tokens": max_tokens,  # None: a default that fits the context, once tokenized
                "temperature": 1.0 if req.temperature is None else float(req.temperature),
                "top_p": 1.0 if req.top_p is None else float(req.top_p),
                "top_k": req.top_k or 0, "seed": req.seed, "ignore_eos": bool(req.ignore_eos), "stop": stop}
        if req.stop_token_ids:
            opts["stop_token_ids"] = list(req.stop_token_ids)
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

    def prepare_completion(self, req) -> tuple[list[list[int]], dict]:
        opts = self._sampling(req, chat=False)
        p = req.prompt
        tok = self.model.tokenizer
        many = isinstance(p, list) and p and not isinstance(p[0], int)
        if isinstance(p, list) and not p:
            raise _bad("prompt", "expected a non-empty string, array of strings, array of token ids or array of "
                                 "arrays of token ids")
        if many and len(p) > self.config.max_inputs:
            raise _bad("prompt", f"at most {self.config.max_inputs} prompts per request")
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif not many:
            prompts = [list(p)]
        elif isinstance(p[0], str):
            prompts = [tok.encode(x) for x in p]
        else:
            prompts = [list(x) for x in p]
        vocab = self.model.vocab_size
        self._default_max_tokens(opts, [len(x) for x in prompts], chat=False)
        for ids in prompts:
            if vocab and any(not 0 <= t < vocab for t in ids):
                raise _bad("prompt", f"token ids must be in [0, {vocab})")
            self._check_prompt_len(ids, opts["max_new_tokens"], "prompt")
        if req.stream and len(prompts) > 1:
            raise _bad("stream", "streaming supports a single prompt")
        return prompts, opts

    def prepare_chat(self, req) -> tuple[list[int], dict]:
        clean = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                msg["name"] = m.name
            clean.append(msg)
        opts = self._sampling(req, chat=True)
        try:
            text = self.model.render_chat(clean)
        except FipsRuntimeError as e:
            raise ApiError(400, str(e), param="messages", code="chat_template_error")
        ids = self.model.tokenizer.encode(text, add_special_tokens=False)
        self._default_max_tokens(opts, [len(ids)], chat=True)
        self._check_prompt_len(ids, opts["max_new_tokens"], "messages")
        return ids, opts

    def prepare_embeddings(self, req) -> tuple[list[str], int]:
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise _bad("input", "expected a string or a non-empty array of strings")
        if len(texts) > self.config.max_inputs:
            raise _bad("input", f"at most {self.config.max_inputs} inputs per request")
        if req.dimensions is not None:
            raise ApiError(400, "'dimensions' is not supported by this model", param="dimensions",
                           code="unsupported_value")
        tok = self.model.tokenizer
        limits = [x for x in (self.config.max_prompt_tokens, self.model.max_input_tokens()) if x]
        limit = min(limits) if limits else None
        n_tokens = 0
        for i, t in enumerate(texts):
            k = len(tok.encode(t))
            n_tokens += k
            if limit and k > limit:
                raise ApiError(400, f"input[{i}] has {k} tokens; this model accepts at most {limit}",
                               param="input", code="context_length_exceeded")
        return texts, n_tokens

    def submit(self, seqs: list[Sequence]) -> None:
        try:
            self.scheduler.submit(seqs)
        except Overloaded:
            self.metrics.rejected.labels("overloaded").inc()
            raise ApiError(503, "the server is busy (its queue is full); retry later", code="overloaded",
                           type_="server_error", headers={"Retry-After": str(self.config.retry_after_s)})
        except ShuttingDown:
            self.metrics.rejected.labels("shutdown").inc()
            raise ApiError(503, "the server is shutting down", code="server_shutdown", type_="server_error",
                           headers={"Retry-After": str(self.config.retry_after_s), "Connection": "close"})
        except FipsRuntimeError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded")
        with self._lock:
            self.submitted += len(seqs)
        self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))

    def begin_shutdown(self) -> None:
        self.scheduler.begin_shutdown(self.config.shutdown_timeout)


# ============================================================================ JSON body guard (pure ASGI)
class _Disconnected(Exception):
    pass


def _find_surrogate(obj, path: str = "") -> str | None:
    """The path of the first string (or key) holding a lone surrogate (not encodable as UTF-8), else None."""
    stack = [(obj, path)]
    while stack:
        x, p = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body"
        elif isinstance(x, dict):
            for k, v in x.items():
                kp = f"{p}.{k}" if p else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return p or "body"
                stack.append((v, kp))
        elif isinstance(x, list):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(x))
    return None


def _parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8", code="invalid_json") from None

    def no_constants(c):
        raise ValueError(f"{c} is not valid JSON")

    def finite(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"number {s[:40]} is out of range")
        return v

    try:
        obj = json.loads(text, parse_constant=no_constants, parse_float=finite)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
                type(None): "null"}.get(type(obj), "value")
        raise ApiError(400, f"the JSON body must be an object, got {kind}", code="invalid_json")
    where = _find_surrogate(obj)
    if where is not None:
        raise ApiError(400, f"'{where.encode('utf-8', 'backslashreplace').decode()}': a string holds a lone "
                            f"surrogate (not valid Unicode)", param=None, code="invalid_json")
    return obj


class Guard:
    """Outermost ASGI middleware: counts requests by status, and for the JSON POST endpoints checks the
    content type (415), the size (413) and the arrival time (408) of the body and that it is well-formed,
    finite, surrogate-free JSON (400) before FastAPI sees it."""

    def __init__(self, app, state: App):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int | None] = [None]

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        path = scope.get("path", "")
        try:
            if scope.get("method") == "POST" and path in POST_ROUTES:
                try:
                    body = await self._read_body(scope, receive)
                except _Disconnected:
                    status[0] = 499
                    return
                except ApiError as e:  # the body may be unread: close the connection after the answer
                    return await _send_error(send_counted, e, close=True)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_counted)
        finally:
            self.state.count_request(path, status[0])

    async def _read_body(self, scope, receive) -> bytes:
        cfg = self.state.config
        if self.state.scheduler.stopping:
            raise ApiError(503, "the server is shutting down", code="server_shutdown", type_="server_error",
                           headers={"Retry-After": str(cfg.retry_after_s)})
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        media, _, params = ctype.partition(";")
        media = media.strip().lower()
        charset = ""
        for param in params.split(";"):
            k, _, v = param.partition("=")
            if k.strip().lower() == "charset":
                charset = v.strip().strip('"').lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))) \
                or charset not in ("", "utf-8", "utf8"):
            raise ApiError(415, f"expected a JSON body (Content-Type: application/json), got "
                                f"{ctype[:80]!r}" if ctype else "expected a JSON body; send "
                                "Content-Type: application/json", code="unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise ApiError(400, "invalid Content-Length", code="bad_request") from None
            if n > cfg.max_body_bytes:
                raise ApiError(413, f"request body of {n} bytes exceeds the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.body_timeout
        parts, total = [], 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {cfg.body_timeout:g} s",
                               code="request_timeout") from None
            if msg["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > cfg.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
            parts.append(chunk)
            if not msg.get("more_body", False):
                break
        raw = b"".join(parts)
        _parse_json(raw)  # refuse what FastAPI's json.loads would let through (NaN, 1e400, lone surrogates)
        return raw


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _send_error(send, e: ApiError, close: bool = False) -> None:
    body = _error_bytes(e)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in e.headers.items()]
    if close and b"connection" not in {k for k, _ in headers}:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


# ============================================================================ the FastAPI app
def _loc_param(loc) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _validation_error(errors: list[dict]) -> ApiError:
    """One 400 for pydantic's errors: the first field at fault, named as a path (``messages[0].role``);
    the alternatives of a union (``prompt``: string, array, ...) are reported together."""
    def loc(e):
        lo = tuple(e.get("loc", ()))
        return lo[1:] if lo and lo[0] == "body" else lo
    if not errors:
        return ApiError(400, "invalid request", code="invalid_value")
    first = loc(errors[0])
    group = [e for e in errors if loc(e)[:1] == first[:1]]
    prefix = list(loc(group[0]))
    for e in group[1:]:
        lo = loc(e)
        n = 0
        while n < min(len(prefix), len(lo)) and prefix[n] == lo[n]:
            n += 1
        prefix = prefix[:n]
    param = _loc_param(prefix) or None
    e0 = group[0]
    if len(group) == 1 and e0.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if len(group) == 1 and e0.get("type") == "missing":
        return ApiError(400, f"missing required field '{param}'", param=param, code="missing_field")
    msgs = []
    for e in group:
        m = str(e.get("msg", "invalid value"))
        if m not in msgs:
            msgs.append(m)
    return ApiError(400, f"'{param}': " + "; or ".join(msgs)[:500] if param else "; ".join(msgs)[:500],
                    param=param, code="invalid_value")


def create_app(model, config: ServeConfig | None = None):
    """The ASGI application (FastAPI, wrapped in :class:`Guard`) serving ``model``; starts its scheduler.
    ``.state`` is the :class:`App`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import serve_api as A
    from .serve_metrics import CONTENT_TYPE_LATEST

    state = App(model, config)
    cfg = state.config

    @asynccontextmanager
    async def lifespan(_app):
        state.loop = asyncio.get_running_loop()
        yield
        state.begin_shutdown()
        await run_in_threadpool(state.scheduler.close, cfg.shutdown_timeout + 5)

    errors = {status: {"model": A.ErrorResponse, "description": desc} for status, desc in (
        (400, "invalid request"), (408, "body too slow"), (413, "body too large"), (415, "not JSON"),
        (503, "overloaded or shutting down (Retry-After)"))}
    stream_doc = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "JSON, or server-sent events when stream is true"}}
    api = FastAPI(title="fips serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-style completions, chat completions and embeddings of one exported model.")

    def error_response(e: ApiError) -> JSONResponse:
        return Response(_error_bytes(e), status_code=e.status, media_type="application/json", headers=e.headers)

    @api.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error_response(_validation_error(list(e.errors())))

    @api.exception_handler(FipsRuntimeError)
    async def _runtime_error(request, e: FipsRuntimeError):
        return error_response(ApiError(400, str(e), code="invalid_request"))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = (f"no such endpoint: {request.method} {request.url.path}" if e.status_code == 404 else
               f"method {request.method} not allowed on {request.url.path}" if e.status_code == 405 else
               str(e.detail))
        return error_response(ApiError(e.status_code, msg, code=code, headers=dict(e.headers or {})))

    @api.exception_handler(Exception)
    async def _internal(request, e: Exception):
        sys.stderr.write(f"[fips serve] internal error: {type(e).__name__}: {e}\n")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    # ---------------------------------------------------------------- GET
    @api.get("/health", response_model=A.Health, responses={503: {"model": A.Health}})
    async def health():
        h = state.health()
        return JSONResponse(h, status_code=503 if h["status"] != "ok" else 200)

    @api.get("/v1/models", response_model=A.ModelList)
    async def models():
        return {"object": "list", "data": [state.model_card()]}

    @api.get("/v1/models/{model_id:path}", response_model=A.ModelCard, responses={404: {"model": A.ErrorResponse}})
    async def model_card(model_id: str):
        if model_id != model.name:
            raise ApiError(404, f"model '{model_id}' not found; this server serves '{model.name}'",
                           code="model_not_found")
        return state.model_card()

    @api.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- generation
    def new_sequences(prompts, opts, loop) -> tuple[list[Sequence], list[asyncio.Queue]]:
        seqs, queues = [], []
        for ids in prompts:
            q: asyncio.Queue = asyncio.Queue()

            def emit(item, q=q):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, item)
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            seqs.append(Sequence(model, ids, emit=emit, **opts))
            queues.append(q)
        return seqs, queues

    async def collect(q: asyncio.Queue) -> tuple[str, int, str | None]:
        parts, n, finish = [], 0, None
        while True:
            item = await q.get()
            if isinstance(item, SequenceEnd):
                if item.error is not None:
                    status = 503 if item.code == "server_shutdown" else 500
                    raise ApiError(status, item.error, code=item.code, type_="server_error")
                return "".join(parts), n, finish
            parts.append(item.text)
            n += len(item.token_ids)
            finish = item.finish_reason or finish

    async def run(request: Request, seqs, queues):
        """Wait for all sequences; a client that goes away cancels them."""
        task = asyncio.ensure_future(asyncio.gather(*(collect(q) for q in queues)))
        watch = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            return None
        finally:
            for t in (task, watch):
                t.cancel()
            for s in seqs:
                if not s.done:
                    state.scheduler.cancel(s)

    def stream_response(seqs, queues, *, chat: bool, include_usage: bool):
        s, q = seqs[0], queues[0]
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
            return {"id": cid, "object": obj, "created": created, "model": model.name, "choices": [choice]}

        async def events():
            if chat:
                yield event("", None, first=True)
            n = 0
            while True:
                item = await q.get()
                if isinstance(item, SequenceEnd):
                    if item.error is not None:
                        yield ApiError(503 if item.code == "server_shutdown" else 500, item.error, code=item.code,
                                       type_="server_error").body()
                        break
                    if include_usage:
                        pt = len(s.prompt_ids)
                        yield {"id": cid, "object": obj, "created": created, "model": model.name, "choices": [],
                               "usage": {"prompt_tokens": pt, "completion_tokens": n, "total_tokens": pt + n}}
                    break
                n += len(item.token_ids)
                if item.finish_reason is not None:
                    if item.text:
                        yield event(item.text, None)
                    yield event(None if chat else "", item.finish_reason)
                elif item.text:
                    yield event(item.text, None)

        def on_close():
            if not s.done:
                state.scheduler.cancel(s)
        return EventStream(events(), on_close)

    def completion_body(results) -> dict:
        choices, ct = [], 0
        for i, (text, n, finish) in enumerate(results):
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
            ct += n
        return choices, ct

    async def submit(request: Request, body, prompts, opts, *, chat: bool):
        """Queue the sequences of a (chat) completion. Returns (a response to send now, None) when it
        streams or the client left, else (None, the finished results)."""
        seqs, queues = await run_in_threadpool(new_sequences, prompts, opts, asyncio.get_running_loop())
        state.submit(seqs)
        if body.stream:
            return stream_response(seqs, queues, chat=chat,
                                   include_usage=bool(body.stream_options and body.stream_options.include_usage)), None
        results = await run(request, seqs, queues)
        if results is None:
            return Response(status_code=499), None
        return None, results

    @api.post("/v1/completions", response_model=A.Completion, responses={**errors, **stream_doc})
    async def completions(body: A.CompletionRequest, request: Request):
        state.require_kind("causal-lm", "/v1/completions")
        prompts, opts = await run_in_threadpool(state.prepare_completion, body)
        early, results = await submit(request, body, prompts, opts, chat=False)
        if early is not None:
            return early
        choices, ct = completion_body(results)
        pt = sum(len(p) for p in prompts)
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                             "created": int(time.time()), "model": model.name, "choices": choices,
                             "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})

    @api.post("/v1/chat/completions", response_model=A.ChatCompletion, responses={**errors, **stream_doc})
    async def chat_completions(body: A.ChatCompletionRequest, request: Request):
        state.require_kind("causal-lm", "/v1/chat/completions")
        ids, opts = await run_in_threadpool(state.prepare_chat, body)
        early, results = await submit(request, body, [ids], opts, chat=True)
        if early is not None:
            return early
        (text, n, finish), = results
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                             "created": int(time.time()), "model": model.name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": finish}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                       "total_tokens": len(ids) + n}})

    @api.post("/v1/embeddings", response_model=A.EmbeddingList, responses=errors)
    async def embeddings(body: A.EmbeddingRequest):
        state.require_kind("encoder", "/v1/embeddings")
        texts, n_tokens = await run_in_threadpool(state.prepare_embeddings, body)
        try:
            fut = state.scheduler.run_job(lambda: model.embed(texts))
        except (Overloaded, ShuttingDown) as e:
            raise ApiError(503, "the server is busy; retry later" if isinstance(e, Overloaded) else
                           "the server is shutting down", code="overloaded", type_="server_error",
                           headers={"Retry-After": str(cfg.retry_after_s)})
        emb = await asyncio.wrap_future(fut)
        data = []
        for i, row in enumerate(emb):
            vec: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                        if body.encoding_format == "base64" else [float(x) for x in row])
            data.append({"object": "embedding", "index": i, "embedding": vec})
        state.metrics.prompt_tokens.inc(n_tokens)
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    guarded = Guard(api, state)
    guarded.state = state  # type: ignore[attr-defined]
    guarded.api = api      # type: ignore[attr-defined]
    return guarded


class EventStream(StarletteResponse):
    """A server-sent-events response: ``data: {json}`` per event, then ``data: [DONE]``. It watches for the
    client's disconnect while streaming and calls ``on_close`` when it ends, either way."""

    media_type = "text/event-stream"

    def __init__(self, events, on_close: Callable[[], None]):
        super().__init__(status_code=200, media_type=self.media_type)
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def pump():
            async for ev in self.events:
                data = b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump_task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done and not pump_task.cancelled():
                exc = pump_task.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            for t in (pump_task, watch):
                t.cancel()
            self.on_close()


# ============================================================================ uvicorn
def _protocol_class(header_timeout: float):
    """uvicorn's h11 protocol plus a deadline for a request's headers (from the connection's opening or
    the previous response): a connection that stalls before its request is complete is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _fips_timer = None

        def _fips_arm(self):
            self._fips_disarm()
            self._fips_timer = self.loop.call_later(header_timeout, self._fips_expire)

        def _fips_disarm(self):
            if self._fips_timer is not None:
                self._fips_timer.cancel()
                self._fips_timer = None

        def _fips_expire(self):
            self._fips_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._fips_arm()

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._fips_disarm()  # a request is being served: the body and response have their own limits

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._fips_arm()

        def connection_lost(self, exc):
            self._fips_disarm()
            super().connection_lost(exc)

    return Protocol


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app, cfg: ServeConfig):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                sys.stderr.write(f"[fips serve] {signal.Signals(sig).name}: refusing new requests, finishing "
                                 f"in-flight ones (at most {cfg.shutdown_timeout:g} s)\n")
                app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, http=_protocol_class(cfg.header_timeout), lifespan="on",
                            log_level="info" if cfg.log else "warning", access_log=cfg.log,
                            timeout_keep_alive=max(1, int(math.ceil(cfg.keep_alive_timeout))),
                            timeout_graceful_shutdown=int(math.ceil(cfg.shutdown_timeout + 5)),
                            limit_concurrency=cfg.max_connections, server_header=False)
    return Server(config)


def serve(model, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          *, on_ready: Callable[[tuple], Any] | None = None, install_signals: bool = True) -> None:
    """Serve ``model`` until SIGINT/SIGTERM; in-flight requests complete (see :class:`ServeConfig`).
    ``on_ready(address)`` is called once the socket listens (``port=0`` picks a free port)."""
    cfg = config or ServeConfig()
    sock = _bind(host, port)
    app = create_app(model, cfg)
    server = _uvicorn_server(app, cfg)
    if on_ready is not None:
        on_ready(sock.getsockname())
    previous = {}
    if install_signals and threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it shut down for once it is done; a no-op handler makes that an exit 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        sock.close()
        app.state.scheduler.close(5)


def start_in_thread(model, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread (tests, notebooks). Returns ``(base_url, app, stop)``; ``stop()`` shuts
    the server down as SIGTERM would."""
    cfg = config or ServeConfig()
    app = create_app(model, cfg)
    sock = _bind(host, port)
    server = _uvicorn_server(app, cfg)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fips-serve-http")
    t.start()
    deadline = time.time() + 30
    while not server.started and t.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    h, p = sock.getsockname()[:2]
    base = f"http://{'[' + h + ']' if ':' in h else h}:{p}"

    def stop(timeout: float = 60.0):
        app.state.begin_shutdown()
        server.should_exit = True
        t.join(timeout)
        sock.close()
        app.state.scheduler.close(5)
    return base, app, stop
