"""fips-rt: shrink transformers by cross-layer parameter sharing, export to ONNX, run with onnxruntime.

Importing ``fips_rt`` is cheap and does not import torch: the public names below are resolved
lazily, so the torch-free runtime (``fips_rt.runtime``) can live without it.

    from fips_rt import compress_, FipsConfig, load_model
    lm = load_model("smollm2-135m")
    compress_(lm.model, FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75), calibration)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "FipsConfig": "fips_rt.config",
    "DeltaConfig": "fips_rt.config",
    "FipsError": "fips_rt.errors",
    "compress_": "fips_rt.api",
    "CompressionReport": "fips_rt.api",
    "load_model": "fips_rt.models",
    "save_checkpoint": "fips_rt.checkpoint",
    "load_checkpoint": "fips_rt.checkpoint",
    "count_model": "fips_rt.accounting",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fips_rt' has no attribute {name!r}")


def __dir__():
    return __all__
