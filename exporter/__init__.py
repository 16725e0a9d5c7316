"""fips_rt.exporter: ONNX export of dense and compressed (FiPS, DeltaLLM) models.

    from fips_rt.exporter import export
    report = export("model.pt", "out/model.onnx", dtype="fp32")   # parity-checked by default
    print(report.table())

``export_command`` (exporter/cli.py) is the click command mounted as ``fips export`` / ``fips-export``.
"""
from __future__ import annotations

from .api import export
from .report import ExportReport, OutputCheck

__all__ = ["export", "ExportReport", "OutputCheck", "export_command"]


def __getattr__(name: str):
    if name == "export_command":
        from .cli import export_command
        return export_command
    raise AttributeError(f"module 'fips_rt.exporter' has no attribute {name!r}")
