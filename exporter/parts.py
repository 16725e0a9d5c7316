"""Bytes per part of an exported ONNX file (``fips info MODEL.onnx``): embedding, attention, MLP (FiPS U,
V values, V scales, V mask; dense MLP weights), LM head, norms, other -- from the initializers' names as
the builder writes them (exporter/builder.py, layers.py, decoder.py, encoder.py) and as
onnxruntime's MatMulNBitsQuantizer renames them (``<weight>_Q8`` / ``_Q4`` / ``_scales`` /
``_zero_points``).

The graph is read without its external data (sizes come from the tensor headers), so this is cheap
even for a large export. A table shared by the embedding and the LM head (tied) is counted once, under
"embedding + head (tied)".
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

PARTS = ("embedding", "embedding + head (tied)", "attention", "mlp: U", "mlp: V values", "mlp: V scales",
         "mlp: V mask", "mlp: dense", "head", "norms", "other")

_SUFFIX = re.compile(r"(_Q8|_Q4|_scales|_zero_points)$")


def _tensor_bytes(t) -> int:
    from onnx import TensorProto, helper
    if t.data_location == TensorProto.EXTERNAL:
        for kv in t.external_data:
            if kv.key == "length":
                return int(kv.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= int(d)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    try:
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001 - an exotic type: its serialized size
        return t.ByteSize()


def classify(name: str, *, tied: set[str] = frozenset()) -> str:
    """The part of an initializer, from its name."""
    base = _SUFFIX.sub("", name)
    if base in tied:
        return "embedding + head (tied)"
    if base.startswith("fips.basis."):
        return "mlp: U"
    if base.startswith(("model.embed_tokens", "embeddings.", "wte", "transformer.wte")):
        return "embedding"
    if base.startswith("lm_head"):
        return "head"
    if any("norm" in part.lower() for part in base.split(".")[-2:]):
        return "norms"
    attention = ".self_attn." in base or ".attention." in base or ".attn." in base
    if ".mlp." in base or ".intermediate." in base or (".output.dense" in base and not attention) \
            or base.startswith("delta."):
        if base.endswith((".values", ".qvalues")):
            return "mlp: V values"
        if base.endswith(".mask"):
            return "mlp: V mask"
        if base.endswith(".scales"):
            return "mlp: V scales"
        return "mlp: dense"
    if attention:
        return "attention"
    return "other"


def onnx_parts(path: str | os.PathLike) -> dict:
    """{"file": ..., "file_bytes": ..., "parts": {part: bytes}, "total": ..., "tied": bool, ...}."""
    import onnx
    p = Path(path)
    if p.is_dir():
        from fips_rt.runtime.session import resolve_model_path
        p, _ = resolve_model_path(p)
    m = onnx.load(str(p), load_external_data=False)
    # a table read by both a Gather-like node and a MatMul/Gemm-like node is the tied embedding + head
    gathers = {n.input[0] for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and n.input}
    products = {n.input[1] for n in m.graph.node if n.op_type in ("Gemm", "MatMul", "MatMulNBits")
                and len(n.input) > 1}
    tied = {_SUFFIX.sub("", x) for x in gathers & products}
    parts: Counter = Counter()
    for t in m.graph.initializer:
        parts[classify(t.name, tied=tied)] += _tensor_bytes(t)
    ops = Counter(n.op_type for n in m.graph.node)
    data = sum(f.stat().st_size for f in p.parent.glob(p.name + ".data"))
    mlp = sum(v for k, v in parts.items() if k.startswith("mlp"))
    return {"file": str(p), "file_bytes": p.stat().st_size + data,
            "parts": {k: int(parts.get(k, 0)) for k in PARTS}, "mlp_bytes": int(mlp),
            "total": int(sum(parts.values())), "tied_embedding_head": bool(tied),
            "nodes": {k: ops[k] for k in ("MatMulNBits", "GatherBlockQuantized", "QSparseMatMul", "SparseMatMul",
                                          "Gemm", "MatMul", "Gather") if ops.get(k)}}
