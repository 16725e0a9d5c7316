"""Resident memory of an exported model in onnxruntime, measured in a fresh process.

``measure_session_rss(path)`` starts ``python -m fips_rt.exporter.memory`` (numpy + onnxruntime
only, never torch), which records the process RSS before the session is created, resets the
kernel's peak-RSS counter (``fips_rt.procmem``), creates the session, runs one forward
(a prefill of ``tokens`` tokens for LMs, returning last-position logits when the file was
exported with ``last_logits_only``), and reports current and peak RSS. The quantity compared in
the benchmarks is ``peak_delta = peak RSS - RSS before session creation``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fips_rt.procmem import ProcessMemory


def _feeds(session, vocab: int, tokens: int):
    import numpy as np
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        name = inp.name
        if name in ("input_ids",):
            feeds[name] = rng.integers(0, vocab, (1, tokens)).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, tokens), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(tokens, dtype=np.int64)[None]
        elif name == "token_type_ids":
            feeds[name] = np.zeros((1, tokens), np.int64)
        elif name.startswith("past_key_values."):
            dt = np.float16 if "float16" in inp.type else np.float32
            feeds[name] = np.zeros((1, int(inp.shape[1]), 0, int(inp.shape[3])), dt)
        elif name == "pixel_values":
            dt = np.float16 if "float16" in inp.type else np.float32
            feeds[name] = rng.standard_normal([1] + [int(s) for s in inp.shape[1:]]).astype(dt)
        else:
            raise ValueError(f"no sample for input {name}")
    return feeds


def _child(path: str, tokens: int, threads: int, disable_prepacking: bool, runs: int) -> dict:
    import numpy as np  # noqa: F401  (imported before the baseline, like any runtime would)
    import onnxruntime as ort
    from fips_rt.runtime.contract import read_contract
    contract = read_contract(Path(path).parent)
    spec = contract.spec if contract is not None else None
    vocab = int(getattr(spec, "vocab_size", 0) or 1000)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if disable_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    mem = ProcessMemory()
    rss_before = mem.rss()
    mem.start_peak()
    t0 = time.perf_counter()
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    rss_loaded = mem.rss()
    peak_loaded = max(mem.peak(), rss_before)
    feeds = _feeds(session, vocab, tokens)
    run_s = []
    for _ in range(runs):
        t1 = time.perf_counter()
        session.run(None, feeds)
        run_s.append(time.perf_counter() - t1)
    rss_after = mem.rss()
    peak = max(mem.peak(), rss_before)
    return {"path": path, "tokens": tokens, "threads": threads, "disable_prepacking": disable_prepacking,
            "rss_before": rss_before, "rss_loaded": rss_loaded, "rss_after_run": rss_after,
            "peak_after_load": peak_loaded, "peak": peak,
            "load_delta": rss_loaded - rss_before, "peak_delta": peak - rss_before,
            "peak_is_exact": mem.peak_is_exact, "load_s": load_s, "run_s": run_s,
            "onnxruntime": ort.__version__}


def measure_session_rss(path: str | os.PathLike, *, tokens: int = 512, threads: int = 2,
                        disable_prepacking: bool = True, runs: int = 1, timeout: float = 600) -> dict:
    """Measure one model in a fresh Python process; returns the child's JSON record (bytes, seconds)."""
    cmd = [sys.executable, "-m", "fips_rt.exporter.memory", str(path), "--tokens", str(tokens),
           "--threads", str(threads), "--runs", str(runs)]
    if not disable_prepacking:
        cmd.append("--prepacking")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--prepacking", action="store_true", help="leave onnxruntime's weight prepacking on")
    a = ap.parse_args(argv)
    print(json.dumps(_child(a.path, a.tokens, a.threads, not a.prepacking, a.runs)))


if __name__ == "__main__":
    main()
