"""Continuous batching for ``fips serve``: one thread owns the onnxruntime session.

Every loop iteration of :class:`Scheduler`:

1. drops cancelled sequences (a client that went away) and, past the shutdown deadline, ends the rest;
2. admits waiting sequences while the batch has room (``max_batch`` rows) and the KV budget allows
   (``max_kv_tokens``: rows x the widest row's reserved length, i.e. what the left-padded batch can grow
   to), and runs **one prefill chunk** (``prefill_chunk`` tokens) of the oldest admitted sequence; a
   finished prefill samples its first token and the sequence joins the batch;
3. when the batch's membership changed, updates the batch's caches (:meth:`CausalLM.update_batch`: a
   finished row's slot is taken by the last row, a new row is written behind the last one, rows left-padded;
   the whole batch is restacked only when the padding finished rows left behind grows large, or a new row
   is longer than the batch is wide);
4. decodes **every active sequence in one session call** (:meth:`CausalLM.decode_batch`), then samples,
   detokenizes and checks stop conditions per sequence (:class:`Sequence`, the same steps as
   :meth:`CausalLM.stream`, so a request gives the tokens it would give alone, near-ties excepted).

Results go to each sequence's ``emit`` callback (the HTTP layer hands them to its event loop); after the
tokens of a step are emitted, the optional ``flush`` callback (``flush(timeout_s)``) lets the HTTP layer send
them before the next session call starts: on a 2-core machine the event loop's per-token work would
otherwise run during that call, on a core onnxruntime's threads are using (``SchedulerConfig.flush_wait_s``
bounds the wait; 0 turns it off). Beyond
``max_queue`` waiting sequences :meth:`submit` raises :class:`Overloaded`. Models that cannot decode in
batches (no KV cache, or no ``attention_mask``/``position_ids`` input) are stepped one sequence at a time by
the same thread. Other work on the session (embeddings) runs through :meth:`run_job` in the same thread.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence as Seq

import numpy as np

from .model import BatchKVCache, KVCache
from .sampling import check_sampling, sample_next_token
from .session import FipsRuntimeError
from .streaming import GenerationChunk, TextStream

__all__ = ["SchedulerConfig", "Scheduler", "Sequence", "Overloaded", "ShuttingDown", "SequenceEnd"]


class Overloaded(Exception):
    """The queue is full; retry later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class SequenceEnd:
    """The last event of a sequence: ``error`` is None when it finished normally (its final chunk was emitted)."""
    error: str | None = None
    code: str | None = None


@dataclass
class SchedulerConfig:
    max_batch: int = 16                # sequences decoded in one step
    max_queue: int = 64                # sequences waiting for a slot; beyond: Overloaded
    max_kv_tokens: int | None = None   # reserved KV positions of the whole batch (None: no bound)
    prefill_chunk: int | None = None   # tokens per prefill step between decode steps (None: the model's)
    idle_wait_s: float = 0.5
    flush_wait_s: float = 0.0          # longest wait for ``flush`` after a step's tokens (0: never wait)


class Sequence:
    """One generation request: options, sampling state, incremental text and stop handling.

    Mirrors :meth:`CausalLM.stream`: the same option checks, the same clamp of ``max_new_tokens`` to the
    context, the same eos/stop-token/stop-string rules and the same seeded generator, so that given the
    same logits it picks the same tokens and produces the same chunks.
    """

    def __init__(self, model, prompt_ids: Seq[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Seq[str] = (),
                 stop_token_ids: Seq[int] = (), ignore_eos: bool = False,
                 emit: Callable[[Any], None] | None = None):
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self.prompt_ids = [int(t) for t in prompt_ids]
        if not self.prompt_ids:
            raise FipsRuntimeError("the prompt is empty (no tokens)")
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if isinstance(s, str) and s]
        if model.max_positions:
            if len(self.prompt_ids) >= model.max_positions:
                raise FipsRuntimeError(f"the prompt has {len(self.prompt_ids)} tokens; this model handles at most "
                                       f"{model.max_positions} positions")
            max_new_tokens = min(max_new_tokens, model.max_positions - len(self.prompt_ids))
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        has_tok = model._has_tokenizer()
        self.stops = {int(t) for t in stop_token_ids}
        if not ignore_eos and has_tok:
            self.stops |= set(model.tokenizer.eos_token_ids)
        self.rng = np.random.default_rng(seed)
        self.text = TextStream(model.tokenizer, self.prompt_ids, stop) if has_tok else None
        self.emit = emit or (lambda item: None)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = False
        # scheduler state
        self.cache: KVCache | None = None
        self.prefilled = 0            # prompt tokens through the model so far
        self.next_token: int | None = None
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None

    @property
    def reserved(self) -> int:
        """KV positions this sequence can grow to."""
        return len(self.prompt_ids) + self.max_new_tokens

    def accept(self, logits: np.ndarray) -> bool:
        """Pick the next token from ``logits`` and emit its text; True when the sequence is finished."""
        if self.max_new_tokens <= 0:
            return self.finish("length")
        tok = sample_next_token(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                rng=self.rng)
        if tok in self.stops:
            return self.finish("stop")
        self.generated.append(tok)
        delta = self.text.push(tok) if self.text is not None else ""
        stopped = self.text is not None and self.text.stopped
        self.emit(GenerationChunk(delta, [tok], None))
        if stopped:
            return self.finish("stop")
        if len(self.generated) >= self.max_new_tokens:
            return self.finish("length")
        self.next_token = tok
        return False

    def finish(self, reason: str) -> bool:
        self.finish_reason = reason
        self.done = True
        self.emit(GenerationChunk(self.text.flush() if self.text is not None else "", [], reason))
        self.emit(SequenceEnd())
        return True

    def abort(self, message: str, code: str) -> None:
        self.done = True
        self.emit(SequenceEnd(message, code))


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn, future):
        self.fn, self.future = fn, future


class Scheduler:
    """Owns the model's session in one thread; see the module docstring."""

    def __init__(self, model, config: SchedulerConfig | None = None, metrics=None,
                 flush: Callable[[float], Any] | None = None):
        self.model = model
        self.config = config or SchedulerConfig()
        self.metrics = metrics
        self.flush = flush
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()   # Sequence | _Job
        self._prefilling: list[Sequence] = []                   # admitted, prefill not finished
        self._active: list[Sequence] = []                       # rows of self._batch, in order
        self._batch: BatchKVCache | None = None
        self._joining: list[Sequence] = []                      # prefilled, not yet in the batch
        self._stopping = False
        self._deadline: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.error: BaseException | None = None
        self.batching = bool(getattr(model, "kind", None) == "causal-lm" and model.supports_batching)
        chunk = self.config.prefill_chunk or getattr(model, "prefill_chunk", None)
        self._prefill_chunk = chunk if chunk and chunk > 0 else None

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fips-serve-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences (all or none). Raises :class:`Overloaded` beyond ``max_queue``, :class:`ShuttingDown`
        while stopping, ``FipsRuntimeError`` for a request that can never fit the KV budget."""
        budget = self.config.max_kv_tokens
        for s in seqs:
            if budget and s.reserved > budget:
                raise FipsRuntimeError(f"the prompt plus max_tokens ({s.reserved} positions) exceeds this server's "
                                       f"KV-cache budget of {budget} positions")
        with self._cond:
            if self._stopping or self._closed:
                raise ShuttingDown()
            if len(self._waiting) + len(seqs) > self.config.max_queue:
                raise Overloaded()
            now = time.perf_counter()
            for s in seqs:
                s.submitted_at = now
                self._waiting.append(s)
            self._cond.notify()
        self._gauges()

    def run_job(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` in the scheduler thread (between steps); a Future of its result."""
        fut: Future = Future()
        with self._cond:
            if self._stopping or self._closed:
                raise ShuttingDown()
            if len(self._waiting) + 1 > self.config.max_queue:
                raise Overloaded()
            self._waiting.append(_Job(fn, fut))
            self._cond.notify()
        return fut

    def cancel(self, seq: Sequence) -> None:
        """Mark ``seq`` cancelled; it leaves the batch at the next step."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no new work; what is queued or running may finish for ``grace_s`` seconds, then it is ended
        with a ``server_shutdown`` error."""
        with self._cond:
            self._stopping = True
            self._deadline = time.perf_counter() + max(0.0, grace_s)
            self._cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def close(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._stopping = True
            if self._deadline is None:
                self._deadline = time.perf_counter()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cond:
            queued = sum(1 for x in self._waiting if isinstance(x, Sequence) and not x.cancelled)
            return {"active": len(self._active) + len(self._joining) + len(self._prefilling), "queued": queued,
                    "decoding": len(self._active), "steps": self.steps}

    # ------------------------------------------------------------------ the thread
    def _gauges(self) -> None:
        if self.metrics is not None:
            st = self.stats()
            self.metrics.queue_depth.set(st["queued"])
            self.metrics.active.set(st["active"])

    def _run(self) -> None:
        try:
            while self._iteration():
                pass
        except BaseException as e:  # a bug or a session failure: end everything with an error, stay stoppable
            self.error = e
            self._fail_all(f"internal error in the scheduler: {type(e).__name__}: {e}", "internal_error")
            with self._cond:
                self._stopping = True
                self._closed = True

    def _all(self) -> list[Sequence]:
        return self._prefilling + self._joining + self._active

    def _iteration(self) -> bool:
        with self._cond:
            while not (self._waiting or self._all()):
                if self._closed:
                    return False
                self._cond.wait(self.config.idle_wait_s)
            expired = self._deadline is not None and time.perf_counter() >= self._deadline
            if expired:
                waiting = list(self._waiting)
                self._waiting.clear()
            else:
                waiting = []
        if expired:
            msg = "the server is shutting down; the request was ended before it finished"
            for x in waiting:
                if isinstance(x, _Job):
                    x.future.set_exception(ShuttingDown())
                elif not x.cancelled:
                    x.abort(msg, "server_shutdown")
            for s in self._all():
                if not s.cancelled:
                    s.abort(msg, "server_shutdown")
                s.cancelled = True
        self._drop_cancelled()
        self._admit()
        self._prefill_step()
        self._restack(force=any(s.cancelled or s.done for s in self._active))
        if self._active:
            self._decode_step()
        self._gauges()
        return True

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(isinstance(x, Sequence) and x.cancelled for x in self._waiting):
                self._waiting = collections.deque(x for x in self._waiting
                                                  if not (isinstance(x, Sequence) and x.cancelled))
        self._prefilling = [s for s in self._prefilling if not s.cancelled]
        self._joining = [s for s in self._joining if not s.cancelled]

    def _kv_fits(self, extra: Sequence) -> bool:
        budget = self.config.max_kv_tokens
        if not budget:
            return True
        rows = self._all() + [extra]
        return len(rows) * max(s.reserved for s in rows) <= budget

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    return
                head = self._waiting[0]
                if isinstance(head, Sequence) and (len(self._all()) >= self.config.max_batch
                                                   or not self._kv_fits(head)):
                    return
                self._waiting.popleft()
            if isinstance(head, _Job):  # embeddings: run now, between steps
                if head.future.set_running_or_notify_cancel():
                    try:
                        head.future.set_result(head.fn())
                    except BaseException as e:
                        head.future.set_exception(e)
                continue
            self._prefilling.append(head)  # prefilled one chunk per iteration, oldest first

    def _prefill_step(self) -> None:
        if not self._prefilling:
            return
        s = self._prefilling[0]
        m = self.model
        t0 = time.perf_counter()
        if s.max_new_tokens <= 0:
            self._prefilling.pop(0)
            s.finish("length")
            return
        if not m.has_kv_cache:
            logits = m.full_logits(s.prompt_ids)
            s.prefilled = len(s.prompt_ids)
        else:
            step = self._prefill_chunk or len(s.prompt_ids)
            ids = s.prompt_ids[s.prefilled:s.prefilled + step]
            logits, s.cache = m.forward(ids, s.cache)
            s.prefilled += len(ids)
        if self.metrics is not None:
            self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        if s.prefilled < len(s.prompt_ids):
            return  # more chunks at the next iterations, between decode steps
        self._prefilling.pop(0)
        self._emit_token(s, logits)
        self._flush()
        if not s.done:
            self._joining.append(s)

    def _emit_token(self, s: Sequence, logits: np.ndarray) -> None:
        n = len(s.generated)
        s.accept(logits)
        now = time.perf_counter()
        if len(s.generated) > n and self.metrics is not None:
            self.metrics.completion_tokens.inc()
            if s.last_token_at is None:
                self.metrics.ttft.observe(now - s.submitted_at)
            else:
                self.metrics.itl.observe(now - s.last_token_at)
        s.last_token_at = now

    def _restack(self, force: bool = False) -> None:
        """Apply membership changes (finished/cancelled rows out, prefilled sequences in) to the batch, in
        place where it can (:meth:`CausalLM.update_batch`); rows may change order."""
        if not (force or self._joining):
            return
        keep = [i for i, s in enumerate(self._active) if not (s.cancelled or s.done)]
        if not self.batching:
            self._active = [self._active[i] for i in keep] + self._joining
            self._joining = []
            return
        pool = self._active + self._joining
        self._batch, order = self.model.update_batch(self._batch, keep, [s.cache for s in self._joining],
                                                     max_rows=self.config.max_batch)
        for s in self._joining:
            s.cache = None  # the batch owns it from now on
        self._joining = []
        self._active = [pool[i] for i in order]

    def _decode_step(self) -> None:
        m = self.model
        t0 = time.perf_counter()
        if self.batching:
            logits, self._batch = m.decode_batch(self._batch, [s.next_token for s in self._active])
        else:
            out = []
            for s in self._active:
                if s.cache is not None:
                    lg, s.cache = m.forward([s.next_token], s.cache)
                else:
                    lg = m.full_logits(s.prompt_ids + s.generated)
                out.append(lg)
            logits = out
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self._active))
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
        for s, lg in zip(self._active, logits):
            if not s.cancelled:
                self._emit_token(s, lg)
        self._flush()

    def _flush(self) -> None:
        """Give the HTTP layer up to ``flush_wait_s`` to send what was just emitted (see the module docstring)."""
        if self.flush is not None and self.config.flush_wait_s > 0:
            self.flush(self.config.flush_wait_s)

    def _fail_all(self, message: str, code: str) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for x in waiting:
            if isinstance(x, _Job):
                x.future.set_exception(RuntimeError(message))
            else:
                x.abort(message, code)
        for s in self._all():
            if not s.done:
                s.abort(message, code)
        self._prefilling, self._joining, self._active, self._batch = [], [], [], None
