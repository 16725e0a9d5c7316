"""llama.cpp side of ``benchmarks/pareto.py``: one measurement of a GGUF in llama-cpp-python, JSON out.

Runs in a separate, benchmark-only virtual environment that has ``llama-cpp-python`` (it is not a
dependency of fips-rt); ``pareto.py --llama-venv PATH`` starts it as ``PATH/bin/python`` in a fresh
process per measurement, like ``fips bench`` does for the ONNX files::

    python benchmarks/llama_worker.py timing --gguf M.gguf --out r.json [--threads 2] [--prompt-length 512]
        [--decode-tokens 64] [--decode-context 64] [--repetitions 3] [--warmup 1] [--seed 0]
    python benchmarks/llama_worker.py ppl --gguf M.gguf --windows w.json --out r.json [--threads 2]

``timing``: peak RSS of the process from right before the model is loaded (``VmHWM`` reset, as
``fips bench``), prefill latency of a random prompt of ``--prompt-length`` tokens (last position's
logits only, as an export made with ``--last-logits-only``), and per-token decode latency (greedy,
after a random prompt of ``--decode-context`` tokens). ``ppl``: perplexity of the token windows in
``--windows`` (a JSON list of lists of token ids: the very ids the ONNX files are scored on), every
position's logits, float64 log-softmax. Raw samples in milliseconds are written; statistics are
computed by the caller. Only the standard library, numpy (a dependency of llama-cpp-python) and
``fips_rt.procmem`` (standard library only) are imported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # fips_rt.procmem from this checkout

MiB = 2 ** 20


def _read_windows(path: str, n_vocab: int) -> list[list[int]]:
    with open(path) as f:
        wins = json.load(f)
    if not isinstance(wins, list) or not wins:
        raise SystemExit(f"error: {path} must hold a non-empty JSON list of token-id lists")
    for w in wins:
        if not isinstance(w, list) or len(w) < 2 or not all(isinstance(t, int) and 0 <= t < n_vocab for t in w):
            raise SystemExit(f"error: {path}: every window must be a list of >= 2 token ids in [0, {n_vocab})")
    return wins


def _llama(gguf: str, n_ctx: int, threads: int, logits_all: bool):
    from llama_cpp import Llama
    return Llama(model_path=gguf, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                 n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0)


def _options(n_ctx: int, threads: int, logits_all: bool) -> dict:
    return {"n_ctx": n_ctx, "n_batch": min(n_ctx, 512), "n_ubatch": min(n_ctx, 512), "n_threads": threads,
            "n_threads_batch": threads, "logits_all": logits_all}


def timing(a) -> dict:
    import numpy as np

    from fips_rt.procmem import ProcessMemory
    import llama_cpp
    mem = ProcessMemory()
    rss_before = mem.rss()
    mem.start_peak()
    n_ctx = max(a.prompt_length, a.decode_context + a.decode_tokens) + 8
    t0 = time.perf_counter()
    llm = _llama(a.gguf, n_ctx, a.threads, logits_all=False)
    load_s = time.perf_counter() - t0
    rss_after_load = mem.rss()
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(a.seed)
    low = min(10, n_vocab - 1)

    def rand_ids(n):
        return [int(x) for x in rng.integers(low, n_vocab, size=n)]

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    prefill: list[float] = []
    if a.prompt_length > 0:
        for k in range(a.warmup + a.repetitions):
            ids = rand_ids(a.prompt_length)
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            dt = (time.perf_counter() - t) * 1000.0
            if k >= a.warmup:
                prefill.append(dt)
    decode: list[float] = []
    decode_cpu: list[float] = []
    for k in range(a.warmup + a.repetitions):
        llm.reset()
        llm.eval(rand_ids(a.decode_context))
        for _ in range(a.decode_tokens):
            tok = int(np.argmax(last_logits()))
            c = time.process_time()
            t = time.perf_counter()
            llm.eval([tok])
            if k >= a.warmup:
                decode.append((time.perf_counter() - t) * 1000.0)
                decode_cpu.append((time.process_time() - c) * 1000.0)
    peak = mem.peak()
    return {"ok": True, "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "system_info": _system_info(llama_cpp), "options": _options(n_ctx, a.threads, False),
            "load_s": load_s, "rss_before_mb": rss_before / MiB, "rss_after_load_mb": rss_after_load / MiB,
            "peak_rss_mb": peak / MiB, "model_peak_rss_mb": (peak - rss_before) / MiB,
            "model_rss_after_load_mb": (rss_after_load - rss_before) / MiB, "peak_method": mem.method,
            "prefill_ms": prefill, "prompt_length": a.prompt_length, "decode_ms": decode,
            "decode_cpu_ms": decode_cpu, "decode_context": a.decode_context, "n_vocab": n_vocab,
            "loadavg": [round(os.getloadavg()[0], 2)]}


def _system_info(llama_cpp) -> str | None:
    try:
        s = llama_cpp.llama_print_system_info()
        return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:  # an older binding: not essential
        return None


def ppl(a) -> dict:
    import numpy as np
    import llama_cpp
    with open(a.windows) as f:
        n_ctx = max(len(w) for w in json.load(f))
    llm = _llama(a.gguf, n_ctx, a.threads, logits_all=True)
    n_vocab = llm.n_vocab()
    wins = _read_windows(a.windows, n_vocab)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for w in wins:
        llm.reset()
        llm.eval(w)
        x = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        target = np.asarray(w[1:], dtype=np.int64)
        m = x.max(axis=1, keepdims=True)
        lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
        nll += float((lse - x[np.arange(len(target)), target]).sum())
        count += len(target)
    return {"ok": True, "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "options": _options(n_ctx, a.threads, True), "ppl": math.exp(nll / count), "nll": nll / count,
            "tokens": count, "windows": len(wins), "seq_len": len(wins[0]), "n_vocab": n_vocab,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("timing", "ppl"):
        p = sub.add_parser(name)
        p.add_argument("--gguf", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--threads", type=int, default=2)
        if name == "timing":
            p.add_argument("--prompt-length", type=int, default=512)
            p.add_argument("--decode-tokens", type=int, default=64)
            p.add_argument("--decode-context", type=int, default=64)
            p.add_argument("--repetitions", type=int, default=3)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--windows", required=True, help="JSON list of token-id lists")
    a = ap.parse_args(argv)
    if not Path(a.gguf).is_file():
        print(f"error: no such GGUF file: {a.gguf}", file=sys.stderr)
        return 2
    if a.threads < 1 or (a.mode == "timing" and min(a.decode_tokens, a.decode_context, a.repetitions) < 1):
        print("error: threads, decode tokens/context and repetitions must be >= 1", file=sys.stderr)
        return 2
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("error: llama-cpp-python is not installed in this environment", file=sys.stderr)
        return 3
    res = timing(a) if a.mode == "timing" else ppl(a)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
