"""The export report: files, byte accounting, graph audit, and the per-output parity checks.

Parity follows optimum's ``validate_model_outputs``: every output of every validation step is
checked for its shape first (a shape mismatch is reported as such, without a value comparison),
then for ``max |onnx - torch| <= atol + rtol * max |torch|`` with the tolerances declared by the
architecture's export config.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class OutputCheck:
    step: str  # "prefill", "decode", "forward"
    name: str
    ref_shape: tuple
    onnx_shape: tuple
    atol: float
    rtol: float
    max_abs: float | None = None
    max_rel: float | None = None  # max |diff| / max |ref|
    ref_max: float | None = None
    mean_rel: float | None = None  # mean |diff| / mean |ref|
    # quantized weights (fips export --weights int8|int4): pass iff mean_rel <= mean_rtol instead of the
    # max bound (a wrong layout or node gives mean_rel ~1, int8/int4 rounding a few % / tens of %)
    mean_rtol: float | None = None

    @property
    def shape_ok(self) -> bool:
        return tuple(self.ref_shape) == tuple(self.onnx_shape)

    @property
    def value_ok(self) -> bool:
        if self.mean_rtol is not None:
            return self.mean_rel is not None and bool(np.isfinite(self.mean_rel)) and self.mean_rel <= self.mean_rtol
        return self.max_abs is not None and bool(np.isfinite(self.max_abs)) and \
            self.max_abs <= self.atol + self.rtol * (self.ref_max or 0.0)

    @property
    def passed(self) -> bool:
        return self.shape_ok and self.value_ok


def compare(step: str, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float,
            valid: np.ndarray | None = None) -> OutputCheck:
    """One output; ``valid`` (broadcastable bool) limits the comparison to meaningful entries."""
    check = OutputCheck(step, name, tuple(ref.shape), tuple(got.shape), atol, rtol)
    if not check.shape_ok:
        return check
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    diff = np.abs(ref - got)
    scale = np.abs(ref)
    if valid is not None:
        valid = np.broadcast_to(valid, ref.shape)
        diff, scale = diff[valid], scale[valid]
    if diff.size == 0:
        check.max_abs, check.ref_max, check.max_rel, check.mean_rel = 0.0, 0.0, 0.0, 0.0
        return check
    check.max_abs = float(np.nan_to_num(diff, nan=np.inf).max())
    check.ref_max = float(scale.max())
    check.max_rel = check.max_abs / max(check.ref_max, 1e-30)
    check.mean_rel = float(np.nan_to_num(diff, nan=np.inf).mean() / max(float(scale.mean()), 1e-30))
    return check


@dataclass
class ExportReport:
    output: Path
    files: list[Path]
    kind: str
    family: str
    method: str  # "dense" | "fips" | "deltallm" (the modules found in the model)
    dtype: str
    opset: int
    external_data: bool
    file_bytes: int  # .onnx + external data
    initializer_bytes: int
    bytes_by_tag: dict[str, int]
    audit: dict
    checks: list[OutputCheck] = field(default_factory=list)
    verified: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    weights: str | None = None  # fp32 / fp16 / int8 / int4 (fips export --weights)
    quantization: dict = field(default_factory=dict)  # fips_config.json "quantization" (int8/int4)

    @property
    def mlp_bytes(self) -> int:
        return self.bytes_by_tag.get("mlp", 0)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def shape_failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.shape_ok]

    @property
    def value_failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if c.shape_ok and not c.value_ok]

    def max_abs(self, pattern: str = ".*") -> float:
        vals = [c.max_abs for c in self.checks if c.max_abs is not None and re.fullmatch(pattern, c.name)]
        return max(vals) if vals else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d["files"] = [str(f) for f in self.files]
        d["checks"] = [dict(asdict(c), shape_ok=c.shape_ok, value_ok=c.value_ok, passed=c.passed) for c in self.checks]
        d["passed"] = self.passed
        d["mlp_bytes"] = self.mlp_bytes
        return d

    def table(self) -> str:
        """A compact text table: one row per output kind and step (present.* layers folded into one row)."""
        w = self.weights or self.dtype
        q = self.quantization or {}
        if q.get("block_size"):
            w += f" (block {q['block_size']}, accuracy level {q['accuracy_level']})"
        lines = [f"{self.output}  ({self.kind}/{self.family}, {self.method}, weights {w}, opset {self.opset}, "
                 f"{self.file_bytes / 1e6:.1f} MB{', external data' if self.external_data else ''})"]
        if not self.verified:
            lines.append("parity: not verified (--no-verify)")
            return "\n".join(lines)
        rows: dict[tuple[str, str], list[OutputCheck]] = {}
        for c in self.checks:
            rows.setdefault((c.step, re.sub(r"\.\d+\.", ".*.", c.name)), []).append(c)
        header = f"{'step':<8} {'output':<22} {'shape':<22} {'max abs':>10} {'max rel':>10} {'atol':>8}  status"
        lines += [header, "-" * len(header)]
        for (step, name), cs in rows.items():
            bad_shape = [c for c in cs if not c.shape_ok]
            shape = str(tuple(cs[0].onnx_shape)) if not bad_shape else f"{bad_shape[0].onnx_shape}!={bad_shape[0].ref_shape}"
            mabs = max((c.max_abs for c in cs if c.max_abs is not None), default=float("nan"))
            mrel = max((c.max_rel for c in cs if c.max_rel is not None), default=float("nan"))
            status = "ok" if all(c.passed for c in cs) else ("SHAPE MISMATCH" if bad_shape else "VALUE MISMATCH")
            lines.append(f"{step:<8} {name:<22} {shape:<22} {mabs:>10.2e} {mrel:>10.2e} {cs[0].atol:>8.0e}  {status}")
        lines.append("parity: " + ("passed" if self.passed else
                                   f"FAILED ({len(self.shape_failures)} shape, {len(self.value_failures)} value mismatches)"))
        return "\n".join(lines)
