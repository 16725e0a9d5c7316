"""Quality of the deployed file: perplexity of an exported causal LM, computed in onnxruntime.

Torch-free. The windows are cut exactly as ``fips eval model.pt`` cuts them (``fips_rt.data.documents``
and ``fips_rt.data.window_ids``: same documents, split, window length and count, EOS between documents),
with the export's own tokenizer files, so the two perplexities are of the same tokens::

    from fips_rt.runtime import Model
    from fips_rt.runtime.evaluate import lm_windows, perplexity
    m = Model.load("fips-demo-onnx/")
    print(perplexity(m, lm_windows(m.tokenizer, "wiki", "test", 8192, 512)))
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from .session import FipsRuntimeError


def lm_windows(tokenizer, data: str, split: str, tokens: int, seq_len: int) -> list[list[int]]:
    """The evaluation windows of ``fips eval`` (see ``fips_rt.data.lm_batches``) as lists of ids."""
    from fips_rt.data import documents, window_ids
    from fips_rt.errors import FipsError
    seq_len = min(seq_len, max(16, tokens))
    eos = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
    try:
        return window_ids(lambda d: tokenizer.encode(d, add_special_tokens=False), documents(data, split),
                          seq_len, max(1, tokens // seq_len), eos if eos is not None else 0)
    except FipsError as e:
        raise FipsRuntimeError(str(e)) from None


def window_nll(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64) and the token count."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    target = np.asarray(ids[1:], dtype=np.int64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return float((lse - x[np.arange(len(target)), target]).sum()), int(len(target))


def perplexity(model, windows: Sequence[Sequence[int]], *, progress: Callable[[int, int], None] | None = None,
               chunk: int | None = None) -> dict:
    """Perplexity of ``model`` (a ``fips_rt.runtime.Model`` of kind causal-lm) on ``windows``; ``chunk``:
    each window runs through the KV cache that many tokens per call (``Model.sequence_logits``)."""
    if not windows:
        raise FipsRuntimeError("no evaluation windows")
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for k, w in enumerate(windows):
        s, n = window_nll(model.sequence_logits(w) if chunk is None else model.sequence_logits(w, chunk), w)
        nll, count = nll + s, count + n
        if progress is not None:
            progress(k + 1, len(windows))
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows),
            "seq_len": len(windows[0]), "chunk": chunk, "seconds": round(time.perf_counter() - t0, 2)}
