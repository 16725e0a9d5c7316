"""``compress_(model, config, calibration)``: one call swaps modules in place (torchao-style).

Each config type has one registered handler; handlers live in their own modules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapters import adapter_for
from .config import DeltaConfig, FipsConfig
from .errors import FipsError

_HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type):
    def deco(fn):
        _HANDLERS[config_type] = fn
        return fn
    return deco


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FipsError("--device cuda was asked for, but no CUDA device is available.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FipsError(f"device must be auto, cpu or cuda (got {device!r}).")
    return torch.device(device)


@dataclass
class CompressionReport:
    method: str
    config: dict
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, **self.details}


@register_handler(FipsConfig)
def _fips(model, adapter, config, calibration, **kw):
    from .fips import compress_fips
    return compress_fips(model, adapter, config, calibration, **kw)


@register_handler(DeltaConfig)
def _delta(model, adapter, config, calibration, **kw):
    from .deltallm import compress_deltallm
    return compress_deltallm(model, adapter, config, calibration, **kw)


def compress_(model, config: FipsConfig | DeltaConfig, calibration: list[dict] | None = None, *,
              device: str | torch.device = "auto", progress: bool = False, state_dir=None, resume: bool = False,
              log=print) -> CompressionReport:
    """Compress ``model`` (an nn.Module or a LoadedModel) in place.

    calibration: a list of model-forward kwargs batches (``{"input_ids": ...}`` for LMs, plus
    ``attention_mask`` for encoders, ``{"x": images}`` for ViTs); see fips_rt.data.
    state_dir/resume: per-group checkpoints of a long run, and picking it up after an interruption.
    """
    module = getattr(model, "model", model)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise FipsError(f"No compression handler for {type(config).__name__}.")
    adapter = adapter_for(module)
    details = handler(module, adapter, config, calibration, device=resolve_device(device), progress=progress,
                      state_dir=state_dir, resume=resume, log=log)
    return CompressionReport(method=config.method, config=config.to_dict(), details=details)
