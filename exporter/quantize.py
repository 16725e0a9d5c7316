"""Weight-only quantization of a quantizable export (``fips export --weights int8|int4``) by onnxruntime's tools.

The graph comes from the builder's MatMul form (``GraphBuilder.matmul_form``): every dense linear --
attention projections, dense MLPs, DeltaLLM factors, the LM head chunks, the FiPS basis products
x·U and t·Uᵀ -- is ``MatMul(x, Wᵀ)`` on an [in, out] initializer, the layout
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` turns into
``com.microsoft.MatMulNBits`` (it skips Gemm). FiPS V's are already ``fips.QSparseMatMul`` (quantized by
``sparse_op.quantize_sparse`` while building); nothing here quantizes them again.

What is done here, in order:

1. ``MatMulNBitsQuantizer`` (symmetric, ``bits``, ``block_size``, ``accuracy_level``) on every MatMul with a
   constant weight except the FiPS basis products;
2. the basis products: by default (``basis_weights="int8"``) a second pass of the same quantizer, 8-bit
   weights (two layouts, since the blocks run along d for x·U and r for t·Uᵀ) at ``basis_accuracy_level``
   (default: the level of the rest), on factors the exporter first rescaled exactly
   (exporter/balance.py: without it the int8 activations of t·Uᵀ cost FiPS ~3% perplexity). With
   ``basis_weights="fp32"`` U stays fp32, one copy (x·U a MatMul left alone, t·Uᵀ a Gemm on the same
   initializer).
   The basis products never go through a quantizer that picks activation ranges for the graph
   (``quantize_dynamic``/QDQ: per-tensor ranges of x·U, the ~12,800-perplexity failure of issue 12).
   Accuracy level 4 makes MatMulNBits quantize its input A to int8 per block of ``block_size`` values
   *inside the kernel*; level 0 keeps A in fp32 but onnxruntime 1.32 has no fast fp32-compute kernel for
   8-bit weights (measured: 1,085 us per 576x576 product at one token against 21 us at level 4 and 190 us
   in fp32; docs/export.md);
3. the embedding: tied to the head (one table), each embedding chunk's ``Gather`` becomes
   ``com.microsoft.GatherBlockQuantized`` reading the *head's* MatMulNBits tensors (data [n, k_blocks,
   blob] as written by the quantizer, ``quantize_axis=2``; its scales [n, k_blocks] get a trailing unit
   axis by an ``Unsqueeze``, a copy of the scales only, 1/8 (int4, block 32) of the table's bytes): one
   copy of the table in the file. Untied: ``MatMulNBitsQuantizer``'s own Gather path
   (``op_types_to_quantize`` with Gather: GatherBlockQuantized, 4 bits only -- so an untied int8 export
   keeps a float embedding, recorded as "dense" in the contract);
4. initializers nobody reads any more are dropped, and every new initializer inherits the byte-accounting
   tag of the weight it replaces.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fips_rt.errors import FipsError

MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
WEIGHT_BITS = {"int8": 8, "int4": 4}
# The FiPS basis products: 8-bit weights whatever --weights says (see the module docstring).
BASIS_BITS = 8


@dataclass
class QuantizeResult:
    proto: onnx.ModelProto
    tags: dict[str, str]
    matmul_nbits_nodes: int
    embedding: str            # "dense" | "gather-block-quantized" | "shared-with-head"
    quantizer: str
    basis_nodes: int = 0
    basis_accuracy_level: int = 0
    notes: list[str] = field(default_factory=list)


def _quantizer():
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # e.g. onnx-ir missing
        raise FipsError(f"--weights int8/int4 needs onnxruntime.quantization's MatMulNBitsQuantizer, which "
                        f"failed to import ({e}); pip install onnx-ir") from None
    return MatMulNBitsQuantizer


def _run_quantizer(proto: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int,
                   exclude: set[str], with_gather: bool) -> onnx.ModelProto:
    MatMulNBitsQuantizer = _quantizer()
    kwargs = {}
    if with_gather:
        kwargs.update(op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs two INFO lines per node
    try:
        q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level or None, nodes_to_exclude=sorted(exclude), **kwargs)
        q.process()
    finally:
        logger.setLevel(level)
    return q.model.model


def _const_matmuls(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits]


def _share_embedding(proto: onnx.ModelProto, tied: dict[str, str], *, bits: int, block_size: int) -> int:
    """Gather(embedding chunk) -> GatherBlockQuantized on the tied head chunk's MatMulNBits tensors."""
    inits = {t.name: t for t in proto.graph.initializer}
    by_table: dict[str, tuple[str, str, int]] = {}
    for head, table in tied.items():
        data, scales = f"{head}_Q{bits}", f"{head}_scales"
        if data not in inits or scales not in inits:
            return 0  # the quantizer left the head alone: keep the float embedding
        d = int(inits[table].dims[1])
        by_table[table] = (data, scales, d)
    nodes = []
    changed = 0
    axes = "fips.qexport.axis_last"
    if axes not in inits:
        proto.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    width = "fips.qexport.width_"
    for n in proto.graph.node:
        if n.op_type != "Gather" or not n.input or n.input[0] not in by_table:
            nodes.append(n)
            continue
        data, scales, d = by_table[n.input[0]]
        k_blocks = int(inits[data].dims[1])
        base = n.name or n.output[0]
        sc3 = f"{base}/scales_3d"
        nodes.append(helper.make_node("Unsqueeze", [scales, axes], [sc3], name=f"{base}/Unsqueeze_scales"))
        blocks = f"{base}/blocks"  # [ids..., k_blocks, block_size]
        nodes.append(helper.make_node("GatherBlockQuantized", [data, n.input[1], sc3], [blocks], name=f"{base}_Q{bits}",
                                      domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block_size,
                                      bits=bits))
        # [ids..., k_blocks * block_size] -> the first d columns (K was padded to whole blocks)
        shape = f"{base}/shape"
        nodes.append(helper.make_node("Shape", [n.input[1]], [f"{base}/ids_shape"], name=f"{base}/Shape"))
        wname = f"{width}{k_blocks * block_size}"
        if wname not in inits:
            t = numpy_helper.from_array(np.array([k_blocks * block_size], np.int64), wname)
            proto.graph.initializer.append(t)
            inits[wname] = t
        nodes.append(helper.make_node("Concat", [f"{base}/ids_shape", wname], [shape], name=f"{base}/Concat", axis=0))
        if k_blocks * block_size == d:
            nodes.append(helper.make_node("Reshape", [blocks, shape], [n.output[0]], name=f"{base}/Reshape"))
        else:
            flat = f"{base}/padded"
            nodes.append(helper.make_node("Reshape", [blocks, shape], [flat], name=f"{base}/Reshape"))
            lo, hi = "fips.qexport.zero", f"fips.qexport.d_{d}"
            for name, v in ((lo, 0), (hi, d)):
                if name not in inits:
                    t = numpy_helper.from_array(np.array([v], np.int64), name)
                    proto.graph.initializer.append(t)
                    inits[name] = t
            nodes.append(helper.make_node("Slice", [flat, lo, hi, axes], [n.output[0]], name=f"{base}/Slice"))
        changed += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return changed


def _drop_unused(proto: onnx.ModelProto) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {i.name for i in proto.graph.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    if len(keep) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)


def _retag(proto: onnx.ModelProto, tags: dict[str, str]) -> dict[str, str]:
    out = {}
    for t in proto.graph.initializer:
        name = t.name
        if name in tags:
            out[name] = tags[name]
            continue
        for suffix in ("_Q8", "_Q4", "_scales", "_zero_points"):
            if name.endswith(suffix) and name[: -len(suffix)] in tags:
                out[name] = tags[name[: -len(suffix)]]
                break
        else:
            out[name] = "const" if name.startswith("fips.qexport.") else "other"
    return out


def quantize_model(proto: onnx.ModelProto, tags: dict[str, str], *, weights: str, block_size: int,
                   accuracy_level: int, basis_nodes: set[str], tied_head: dict[str, str],
                   basis_accuracy_level: int | None = None, basis_weights: str = "int8") -> QuantizeResult:
    """Quantize the MatMul-form ``proto`` (see the module docstring); ``tags`` name each initializer's part."""
    import onnxruntime
    bits = WEIGHT_BITS[weights]
    if block_size not in BLOCK_SIZES:
        raise FipsError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {block_size})")
    if accuracy_level not in ACCURACY_LEVELS:
        raise FipsError(f"accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (got {accuracy_level})")
    basis_level = accuracy_level if basis_accuracy_level is None else basis_accuracy_level
    if basis_level not in ACCURACY_LEVELS:
        raise FipsError(f"basis accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                        f"(got {basis_level})")
    old_tags = dict(tags)
    for head in tied_head:  # the head chunks carry the embedding's tag while they are one tensor
        old_tags[head] = "lm_head"
    names = {n.name for n in _const_matmuls(proto)}
    basis = names & set(basis_nodes)  # (float U: x·U is a MatMul kept in fp32, t·Uᵀ a Gemm on the same U)
    untied_gather = not tied_head and bits == 4
    notes = []
    proto = _run_quantizer(proto, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
                           exclude=basis, with_gather=untied_gather)
    if basis_weights not in ("int8", "fp32"):
        raise FipsError(f"basis weights must be int8 or fp32 (got {basis_weights!r})")
    if basis and basis_weights == "int8":
        proto = _run_quantizer(proto, bits=BASIS_BITS, block_size=block_size, accuracy_level=basis_level,
                               exclude={n.name for n in _const_matmuls(proto)} - basis, with_gather=False)
    embedding = "dense"
    if tied_head:
        if _share_embedding(proto, tied_head, bits=bits, block_size=block_size):
            embedding = "shared-with-head"
    elif untied_gather and any(n.op_type == "GatherBlockQuantized" for n in proto.graph.node):
        embedding = "gather-block-quantized"
    if embedding == "dense" and bits == 8 and not tied_head:
        notes.append("untied embedding kept in float: onnxruntime's Gather quantization is 4-bit only")
    _drop_unused(proto)
    left = [n.name for n in _const_matmuls(proto) if basis_weights == "int8" or n.name not in basis]
    if left:
        raise FipsError(f"MatMulNBitsQuantizer left {len(left)} weight MatMuls unquantized (first: {left[0]})")
    count = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits")
    return QuantizeResult(proto=proto, tags=_retag(proto, old_tags), matmul_nbits_nodes=count, embedding=embedding,
                          quantizer=("onnxruntime.quantization.MatMulNBitsQuantizer "
                                     f"(onnxruntime {onnxruntime.__version__})"),
                          basis_nodes=len(basis), basis_accuracy_level=basis_level, notes=notes)
