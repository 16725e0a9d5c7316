"""Shared, cached builders for the runtime tests (tests may import torch; fips_rt.runtime may not).

Everything expensive is built once per test session and cached in module globals (this module is imported
once), under one temporary directory removed at exit:

- ``smollm2_tokenizer_dir()``: SmolLM2's real tokenizer files (tokenizer.json, tokenizer_config.json,
  chat template), written with transformers from the built-in .gguf (no hub access);
- ``tiny_lm_dir(kind)``: a tiny random Llama with that tokenizer (vocab 49152), exported to ONNX with
  ``fips_rt.exporter.export`` -- ``"dense"`` or ``"fips"`` (compressed with FiPS first);
- ``tiny_lm_torch()``: the PyTorch tiny model the dense export came from.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="fips-rt-runtime-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)
_LOCK = threading.RLock()
_CACHE: dict = {}

VOCAB = 49152


def _cached(key, build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def hf_tokenizer():
    def build():
        import transformers

        from fips_rt.models import builtin_path
        p = builtin_path("smollm2-135m")
        return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return _cached("hf_tokenizer", build)


def smollm2_tokenizer_dir() -> Path:
    def build():
        d = _ROOT / "smollm2-tokenizer"
        hf_tokenizer().save_pretrained(str(d))
        return d
    return _cached("tokenizer_dir", build)


def tiny_lm_torch():
    def build():
        from fips_rt.testing import tiny_model
        lm = tiny_model("llama", tokenizer=hf_tokenizer(), vocab_size=VOCAB)
        lm.model.eval()
        return lm
    return _cached("tiny_lm_torch", build)


def tiny_lm_dir(kind: str = "dense", **export_kwargs) -> Path:
    """Export the tiny Llama (``dense`` or ``fips``) into a folder; returns the folder."""
    key = ("tiny_lm_dir", kind, tuple(sorted(export_kwargs.items())))

    def build():
        from fips_rt.exporter import export
        tag = "-".join([kind] + [f"{k}={v}" for k, v in sorted(export_kwargs.items())])
        out = _ROOT / f"tiny-llama-{tag}"
        out.mkdir(parents=True, exist_ok=True)
        if kind == "dense":
            lm = tiny_lm_torch()
        elif kind == "fips":
            lm = _tiny_fips()
        else:
            raise ValueError(kind)
        export(lm, str(out / "model.onnx"), **export_kwargs)
        return out
    return _cached(key, build)


def _tiny_fips():
    def build():
        import torch

        import fips_rt
        from fips_rt.testing import tiny_model
        lm = tiny_model("llama", tokenizer=hf_tokenizer(), vocab_size=VOCAB)
        g = torch.Generator().manual_seed(0)
        calib = [{"input_ids": torch.randint(0, VOCAB, (2, 32), generator=g)} for _ in range(2)]
        fips_rt.compress_(lm, fips_rt.FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.75, steps=0), calib,
                          device="cpu", log=lambda *a, **k: None)
        lm.model.eval()
        return lm
    return _cached("tiny_fips_torch", build)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exporter_ready() -> bool:
    try:
        from fips_rt.exporter import export  # noqa: F401
        return True
    except ImportError:
        return False


needs_exporter = pytest.mark.skipif(not exporter_ready(), reason="fips_rt.exporter.export is not available yet")


def runtime_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
