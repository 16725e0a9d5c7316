"""The scheduler's flush hook (``SchedulerConfig.flush_wait_s``, ``fips serve --flush-wait-ms``): after the
tokens of a step are emitted, the scheduler waits (bounded) for the event loop to send them, so the loop's
per-token work does not run during the next onnxruntime call. No timing is asserted: what is checked is
when the hook is called, that App.flush returns only once the loop has run the tasks the emits woke, that
it never waits past its bound, and that a stream is the same with and without it."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest

from fips_rt.runtime import Model
from fips_rt.runtime.serve_scheduler import Scheduler, SchedulerConfig, Sequence, SequenceEnd

from test_runtime_helpers import needs_exporter, tiny_lm_dir

pytestmark = needs_exporter


@pytest.fixture(scope="module")
def lm():
    return Model.load(tiny_lm_dir("fips", last_logits_only=True), threads=2)


class Collector:
    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, SequenceEnd):
            self.done.set()


@pytest.mark.parametrize("wait_s", [0.0, 0.005])
def test_flush_is_called_once_per_step_with_its_bound(lm, wait_s):
    calls = []
    sched = Scheduler(lm, SchedulerConfig(max_batch=4, flush_wait_s=wait_s), flush=calls.append).start()
    try:
        cols = [Collector() for _ in range(3)]
        sched.submit([Sequence(lm, [1, 2, 3 + i], max_new_tokens=6, ignore_eos=True, emit=c)
                      for i, c in enumerate(cols)])
        for c in cols:
            assert c.done.wait(120)
        deadline = time.time() + 60  # the last step's flush comes just after its tokens were emitted
        while sched.stats()["active"] and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        if wait_s == 0:
            assert calls == []
        else:
            # one call after each prefill (its first token) and one after each decode step
            assert len(calls) == sched.steps + len(cols)
            assert set(calls) == {wait_s}
    finally:
        sched.close()


def _loop_in_thread():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    return loop, t


def test_app_flush_returns_after_the_woken_tasks_ran(lm):
    """The emits' callbacks wake a consumer task (as the SSE stream's task is woken); flush must return only
    after that task has handled the item -- and, with the loop blocked, after its bound instead of hanging."""
    from fips_rt.runtime.serve import App, ServeConfig

    app = App(lm, ServeConfig(log=False))
    try:
        loop, t = _loop_in_thread()
        app.loop = loop
        q: asyncio.Queue = asyncio.run_coroutine_threadsafe(_make_queue(), loop).result(10)
        handled = []

        async def consumer():  # as the SSE stream: wait for an item, write it (no suspension), wait again
            while True:
                item = await q.get()
                handled.append(item)

        task = asyncio.run_coroutine_threadsafe(_start(consumer), loop).result(10)
        for k in range(20):
            loop.call_soon_threadsafe(q.put_nowait, k)
            app.flush(5.0)
            assert handled[-1] == k  # the woken task ran before flush returned

        # a loop that does not get to the callbacks: flush gives up after its bound
        blocker = threading.Event()
        loop.call_soon_threadsafe(blocker.wait, 30)
        t0 = time.perf_counter()
        app.flush(0.05)
        assert time.perf_counter() - t0 < 10  # bounded (generous: a hang guard, not a timing check)
        blocker.set()
        loop.call_soon_threadsafe(task.cancel)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
        app.flush(1.0)  # a closed loop: returns at once
    finally:
        app.scheduler.close()


async def _make_queue():
    return asyncio.Queue()


async def _start(coro_fn):
    return asyncio.ensure_future(coro_fn())


def _stream(base, body):
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def test_streams_are_the_same_with_and_without_flush(lm):
    from fips_rt.runtime.serve import ServeConfig, start_in_thread

    body = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    texts = []
    for wait in (0.0, 0.005):
        base, app, stop = start_in_thread(lm, ServeConfig(log=False, flush_wait_s=wait))
        try:
            assert app.state.scheduler.config.flush_wait_s == wait
            texts.append(_stream(base, body))
        finally:
            stop()
    assert texts[0] == texts[1] == lm.generate([5, 6, 7, 8], max_new_tokens=12, ignore_eos=True).text
