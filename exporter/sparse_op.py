"""The ``fips.SparseMatMul`` node and its model-local function body (docs/sparse-op.md).

The body is the reference path: standard ONNX ops only, so an exported file runs in any
onnxruntime. A native kernel registered for the same (domain, op_type) replaces it.

Body (A [..., K], values [nnz], mask uint8 [nbytes]; attributes rows, cols, transB)::

    rows, cols, transB ──Cast(double)──► worst = min(rows, cols, 2**31 - rows*cols, transB+1, 2-transB)
                         (folded at load)  bad = [worst < 1]              (0 for a valid node, else 1)
    A ──Shape──ReduceMin──Sub(itself)──Gather(bad)──► zero [1]   (a 0 that only exists at run time;
                                                                  Gather(index 1) fails: invalid node)
    n = [rows*cols] (int64, from the float64 product)
    Concat(mask, Cast(zero)) ──Reshape([(n+15)/8])──► mask_rt [nbytes+1]  (fails unless nbytes ==
                                                                  ceil(n/8) and mask is 1-D uint8)
    mask_rt ──Unsqueeze──BitShift(RIGHT, k)──BitwiseAnd(1)──Cast(bool)──► bits [nbytes+1, 8]
    bits ──Reshape(-1)──Slice(0, n)──► kept [n]
    Range(zero, n + zero) ──Compress(kept)──► idx [nnz]   (int32 flat index of each kept entry)
    ConstantOfShape(n, after idx) ──ScatterElements(idx, values)──Reshape(-1, cols)──► V
                                   (fails unless values is [nnz], nnz = popcount of the n bits)
    A ──Flatten(-1)──Gemm(V, transB)──Reshape(A.shape[:-1] + [out])──► Y   (fails unless K fits)
    (opset 17 has no BitwiseAnd: bit k = (m << 7-k) >> 7 with two BitShifts)

So an invalid node (the rule of docs/sparse-op.md) raises in any onnxruntime, at load (shape
inference) or when it runs, and never returns an output; every allocation sized by the
attributes depends on ``zero``, i.e. comes after the attribute check. The checks are 20 more
function nodes (mostly folded at load); session memory per sparse node, measured on 300 small
nodes: 150 KB before them, 185 KB with them.

Why the ``zero``: onnxruntime inlines model-local functions and constant-folds every node whose
inputs are all initializers. Without the zero, ``mask → bits → idx → ScatterElements`` depends
on initializers only, so every V would be densified at session creation (and its index vector,
the Range and the zero buffer of each shape stored as initializers too). ``Shape(A)`` has the
activation's dynamic batch/sequence dims, so nothing downstream of the zero can be folded: V is
rebuilt per call and freed after its Gemm (one dense V alive at a time, sequential execution).

Measured alternatives (onnxruntime 1.32, CPU, 2 threads; transient peak of one node on a
2048 x 8192 V of 64 MiB dense; time for a 1024 x 1536 V at 25% density, a noisy shared machine):
this body (Range + Compress: int32 indices, the zero buffer allocated only once the Range is
freed) 3.2x the dense V, ~28 ms; bits from a 256 x 8 Gather table 3.5x; NonZero +
ScatterElements 3.4-3.8x, ~46 ms; CumSum + Gather 3.5-3.8x, ~50 ms (slow scalar Gather).
(int32 indices: rows * cols must stay below 2**31, which the body itself checks.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

DOMAIN = "fips"
OP_TYPE = "SparseMatMul"
DOMAIN_VERSION = 1


def _ref_as(attr: str, ref: str) -> AttributeProto:
    a = AttributeProto()
    a.name = attr
    a.ref_attr_name = ref
    a.type = AttributeProto.INT
    return a


class _Body:
    """The node list of a function body, with small helpers (named outputs, constants, attribute refs)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op, inputs, output, name=None, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def const(self, name, array):
        return self.node("Constant", [], name, value=numpy_helper.from_array(np.asarray(array), name))

    def attr_const(self, name, ref):
        n = helper.make_node("Constant", [], [name])
        n.attribute.append(_ref_as("value_int", ref))
        self.nodes.append(n)
        return name


def _checked_zero(b: _Body, extra_terms, check_name: str):
    """The attribute check and the run-time zero (see the module docstring). ``extra_terms(b, one_d)``
    returns more float64 [1] terms of ``worst`` (each >= 1 iff its part of the rule holds)."""
    node, const = b.node, b.const
    rows = b.attr_const("rows", "rows")
    cols = b.attr_const("cols", "cols")
    zero_1 = const("zero_1", np.array([0], np.int64))
    cols_1 = node("Unsqueeze", [cols, zero_1], "cols_1")  # [1]
    # The validity rule of docs/sparse-op.md on the attributes, in float64 (no int64 wrap-around;
    # exact below 2**53, far off above): valid iff
    #     worst = min(rows, cols, 2**31 - rows*cols, transB + 1, 2 - transB) >= 1.
    # All of it depends on attributes only (folded to a constant at load). The run-time zero is
    # Gather(zero, [worst < 1]): index 1 of a 1-element tensor fails when an invalid node runs,
    # before anything sized by the attributes is allocated (all of that depends on the zero).
    one_d = const("one_d", np.array(1.0))
    rows_d = node("Cast", [rows], "rows_d", to=TensorProto.DOUBLE)
    n_d = node("Mul", [rows_d, node("Cast", [cols_1], "cols_d", to=TensorProto.DOUBLE)], "n_d")  # [1]
    tb_d = node("Cast", [b.attr_const("transB_i", "transB")], "tb_d", to=TensorProto.DOUBLE)
    terms = [rows_d, "cols_d", node("Sub", [const("two_31", np.array(2.0 ** 31)), n_d], "room"),
             node("Add", [tb_d, one_d], "tb_lo"), node("Sub", [const("two_d", np.array(2.0)), tb_d], "tb_hi")]
    terms += extra_terms(b, one_d)
    worst = node("Min", terms, "worst")
    bad = node("Cast", [node("Less", [worst, one_d], "invalid")], "bad", to=TensorProto.INT64)  # [1]: 0 or 1
    # the run-time zero: tied to the activation's shape (any dynamic dim), see module docstring
    smallest = node("ReduceMin", [node("Shape", ["A"], "shape_a")], "smallest", keepdims=1)  # int64 [1]
    zero64 = node("Gather", [node("Sub", [smallest, smallest], "zero_any"), bad], "zero64", axis=0, name=check_name)
    # [1] = rows*cols (exact when valid; clipped first so that no out-of-range float is cast to int64)
    n = node("Cast", [node("Clip", [n_d, one_d, "two_31"], "n_clip")], "n", to=TensorProto.INT64)
    return zero64, n, cols_1, zero_1


def _kept_index(b: _Body, opset: int, zero64: str, n: str, zero_1: str, check_name: str) -> str:
    """int32 [nnz]: the flat index of each kept entry (the mask checked on the way)."""
    node, const = b.node, b.const
    # mask + one 0 byte (Concat: mask must be 1-D uint8), reshaped to exactly ceil(n/8) + 1 bytes
    mask_rt = node("Reshape", [node("Concat", ["mask", node("Cast", [zero64], "zero8", to=TensorProto.UINT8)],
                                    "mask_pad", axis=0),
                               node("Div", [node("Add", [n, const("fifteen", np.array([15], np.int64))], "n_15"),
                                            const("eight", np.array([8], np.int64))], "nbytes_1")], "mask_rt",
                   name=check_name)
    # bit k of each byte (little-endian bit order) -> bool [nbytes + 1, 8]
    minus_1 = const("minus_1", np.array([-1], np.int64))
    mask_col = node("Unsqueeze", [mask_rt, minus_1], "mask_col")
    if opset >= 18:
        shifted = node("BitShift", [mask_col, const("shifts", np.arange(8, dtype=np.uint8)[None, :])], "shifted",
                       direction="RIGHT")
        bit = node("BitwiseAnd", [shifted, const("one", np.array([[1]], np.uint8))], "bit")
    else:  # opset 17 has no BitwiseAnd: (m << (7 - k)) >> 7
        hi = node("BitShift", [mask_col, const("left", np.arange(7, -1, -1, dtype=np.uint8)[None, :])], "hi",
                  direction="LEFT")
        bit = node("BitShift", [hi, const("seven", np.array([[7]], np.uint8))], "bit", direction="RIGHT")
    bits8 = node("Cast", [bit], "bits8", to=TensorProto.BOOL)
    kept = node("Slice", [node("Reshape", [bits8, minus_1], "bits_flat"), zero_1, n], "kept")  # drop the pad bits
    n_rt = node("Add", [n, zero64], "n_rt")  # a run-time rows*cols: the Range is never folded
    flat_index = node("Range", [node("Cast", [node("Squeeze", [zero64], "zero_s")], "zero_i32", to=TensorProto.INT32),
                                node("Cast", [node("Squeeze", [n_rt], "n_s")], "n_i32", to=TensorProto.INT32),
                                const("one_i32", np.array(1, np.int32))], "flat_index")
    return node("Compress", [flat_index, kept], "idx", axis=0)  # int32 [nnz]: flat index of each kept entry


def _scatter_gemm(b: _Body, np_type, n: str, idx: str, values: str, cols_1: str) -> None:
    """V = values scattered at idx, then Y = A @ V (transB=0) or A @ V^T (transB=1)."""
    node = b.node
    # the zero buffer's length also depends on idx, so it is allocated only once flat_index is freed
    idx_len = node("Shape", [idx], "idx_len")
    zeros_len = node("Add", [n, node("Sub", [idx_len, idx_len], "zero_after_idx")], "zeros_len")
    zeros = node("ConstantOfShape", [zeros_len], "zeros", value=numpy_helper.from_array(np.zeros([1], np_type)))
    v_flat = node("ScatterElements", [zeros, idx, values], "v_flat", axis=0)
    v = node("Reshape", [v_flat, node("Concat", ["minus_1", cols_1], "v_shape", axis=0)], "V")
    # Y = A @ V (transB=0) or A @ V^T (transB=1), on any leading dims
    gemm = helper.make_node("Gemm", [node("Flatten", ["A"], "A2", axis=-1), v], ["Y2"])
    gemm.attribute.append(_ref_as("transB", "transB"))
    b.nodes.append(gemm)
    y_shape = node("Concat", [node("Shape", ["A"], "lead", end=-1), node("Shape", ["Y2"], "out_dim", start=-1)],
                   "y_shape", axis=0)
    node("Reshape", ["Y2", y_shape], "Y", allowzero=1)  # an empty batch: a 0 in y_shape is a 0


def sparse_matmul_function(elem_type: int, opset: int) -> onnx.FunctionProto:
    """The FunctionProto for ``fips.SparseMatMul`` with float type ``elem_type`` (FLOAT or FLOAT16).

    Kept short on purpose: onnxruntime inlines one copy of the body per node (about 3 KB of
    session memory per node), so every node saved here is saved ~90 times for SmolLM2.
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    b = _Body()
    zero64, n, cols_1, zero_1 = _checked_zero(b, lambda b, one_d: [], "fips_SparseMatMul_check_rows_cols_transB")
    idx = _kept_index(b, opset, zero64, n, zero_1, "fips_SparseMatMul_check_mask_length")
    _scatter_gemm(b, np_type, n, idx, "values", cols_1)
    default_transb = helper.make_attribute("transB", 0)
    return helper.make_function(
        DOMAIN, OP_TYPE, ["A", "values", "mask"], ["Y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=["rows", "cols"], attribute_protos=[default_transb],
        doc_string="Y = A @ V (transB=0) or A @ V^T (transB=1); V [rows, cols] = values scattered by the "
                   "little-endian packed bitmask (docs/sparse-op.md). Reference body of standard ops.")


# ============================================================================ fips.QSparseMatMul
# The quantized op (docs/sparse-op.md, "fips.QSparseMatMul"): V's kept values as int8, or as int4
# packed two per byte, with symmetric scales per row of V (group_size = 0) or per group_size
# consecutive kept entries in flat order. Same mask, same layout, same outputs as SparseMatMul.
Q_OP_TYPE = "QSparseMatMul"
Q_BITS = (4, 8)
# Default group_size per bits, chosen from the measurements on the SmolLM2 FiPS checkpoint
# (docs/sparse-op.md, "Choosing the scale groups"; benchmarks/qkernel_bench.py).
DEFAULT_GROUP_SIZE = {8: 0, 4: 32}
_QMAX = {8: 127, 4: 7}
# candidate clipping ratios of the scale (amax / qmax * ratio), the one with the least squared
# error per scale group is kept (a small grid search; 1.0 = plain absmax)
_CLIP_RATIOS = {8: (1.0,), 4: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)}


def stores_transposed(bits: int, group_size: int, activation_bits: int, rank: int) -> bool:
    """Whether a quantized r -> d_ff factor (x·U·V: gate/up/fc1, V [r, d_ff]) is written as Vᵀ [d_ff, r] behind
    ``transB = 1``: int8 per-row codes with ``activation_bits = 8`` and r % 64 == 0, so that the decode-shaped
    call runs the VNNI dot-product kernel (one expand + one vpdpbusd per 64 columns of a row, accumulated in
    registers) instead of the column-accumulating one (byte interleaves and int32 loads/stores on top).
    Measured on the 2-core AMD EPYC (Zen 5) VM: FiPS int8 decode 0.83-0.86x the ms/token of the transB = 0
    layout, prefill 512 1.03-1.12x (docs/sparse-op.md). Per-row scales then belong to rows of Vᵀ (one per
    output channel)."""
    return bits == 8 and group_size == 0 and activation_bits == 8 and rank % 64 == 0


def _mask_problem(mask: np.ndarray, rows: int, cols: int) -> str | None:
    if not (isinstance(rows, (int, np.integer)) and isinstance(cols, (int, np.integer))):
        return "rows and cols must be ints"
    if rows < 1 or cols < 1 or rows * cols >= 2 ** 31:
        return f"rows and cols must be >= 1 with rows * cols < 2**31 (rows={rows}, cols={cols})"
    mask = np.asarray(mask)
    need = -(-int(rows) * int(cols) // 8)
    if mask.dtype != np.uint8 or mask.ndim != 1 or mask.size != need:
        return (f"mask must be uint8 [{need}] for a {rows}x{cols} V, got {mask.dtype} "
                f"{list(mask.shape)}")
    return None


def _row_counts(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Kept entries per row of V (int64 [rows])."""
    bits = np.unpackbits(mask, count=rows * cols, bitorder="little").reshape(rows, cols)
    return bits.sum(axis=1, dtype=np.int64)


def group_index(mask: np.ndarray, rows: int, cols: int, nnz: int, group_size: int) -> np.ndarray:
    """Scale index of each kept entry (int64 [nnz]): its row (group_size 0) or k // group_size."""
    if group_size == 0:
        return np.repeat(np.arange(rows, dtype=np.int64), _row_counts(mask, rows, cols))
    return np.arange(nnz, dtype=np.int64) // group_size


def num_scales(rows: int, nnz: int, group_size: int) -> int:
    return rows if group_size == 0 else -(-nnz // group_size)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 [n] in [-8, 7] -> uint8 [ceil(n/2)]: entry k in the low nibble (k even) / high nibble (k odd)."""
    q = np.asarray(q, np.int8)
    u = (q.astype(np.uint8) & 0x0F)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return np.ascontiguousarray(u[0::2] | (u[1::2] << 4))


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [ceil(n/2)] -> int8 [n] (sign-extended nibbles)."""
    p = np.asarray(packed, np.uint8)
    nib = np.empty(p.size * 2, np.uint8)
    nib[0::2] = p & 0x0F
    nib[1::2] = p >> 4
    nib = nib[:n].astype(np.int16)
    return (nib - 16 * (nib >= 8)).astype(np.int8)


@dataclass(frozen=True)
class QuantizedSparse:
    """A quantized sparse V (the inputs and attributes of one ``fips.QSparseMatMul`` node).

    qvalues: int8 [nnz] (bits 8) or uint8 [ceil(nnz/2)] (bits 4, packed); scales: float32
    [rows] (group_size 0) or [ceil(nnz/group_size)]; mask: the packed bitmask of V, unchanged.
    """
    qvalues: np.ndarray
    scales: np.ndarray
    mask: np.ndarray
    rows: int
    cols: int
    bits: int
    group_size: int
    nnz: int

    def codes(self) -> np.ndarray:
        """The integer codes as int8 [nnz] (unpacked for bits 4)."""
        return self.qvalues if self.bits == 8 else unpack_int4(self.qvalues, self.nnz)

    def dequantize(self) -> np.ndarray:
        """float32 [nnz]: q[k] * scales[group(k)]."""
        g = group_index(self.mask, self.rows, self.cols, self.nnz, self.group_size)
        return (self.codes().astype(np.float32) * self.scales[g]).astype(np.float32)

    @property
    def nbytes(self) -> dict:
        """Stored bytes per part (values, scales, mask)."""
        return {"values": int(self.qvalues.nbytes), "scales": int(self.scales.nbytes), "mask": int(self.mask.nbytes)}


def quantize_sparse(values: np.ndarray, mask: np.ndarray, rows: int, cols: int, bits: int,
                    group_size: int | None = None) -> QuantizedSparse:
    """Symmetric quantization of the kept values of a sparse V (no zero point).

    bits: 8 (int8 codes in [-127, 127]) or 4 (codes in [-7, 7], packed two per byte).
    group_size: 0 = one scale per row of V, g > 0 = one scale per g consecutive kept entries in
    flat order, None = :data:`DEFAULT_GROUP_SIZE` for ``bits``. Each scale is amax / qmax times a
    clipping ratio picked per group from a small grid by least squared error (4 bits only).
    Raises ValueError (one line) on inputs that break the format.
    """
    if bits not in Q_BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[bits]
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or not 0 <= group_size < 2 ** 31:
        raise ValueError(f"group_size must be an int in [0, 2**31), got {group_size!r}")
    group_size = int(group_size)
    problem = _mask_problem(mask, rows, cols)
    if problem:
        raise ValueError(problem)
    rows, cols = int(rows), int(cols)
    mask = np.ascontiguousarray(mask)
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"values must be a 1-D float array, got {values.dtype} {list(values.shape)}")
    nnz = int(np.unpackbits(mask, count=rows * cols, bitorder="little").sum())
    if values.size != nnz:
        raise ValueError(f"values has {values.size} entries but the mask keeps {nnz}")
    if not np.isfinite(values).all():
        raise ValueError("values must be finite")
    v = values.astype(np.float64)
    qmax = _QMAX[bits]
    g = group_index(mask, rows, cols, nnz, group_size)
    ns = num_scales(rows, nnz, group_size)
    amax = np.zeros(ns, np.float64)
    if nnz:
        np.maximum.at(amax, g, np.abs(v))
    best_scale = amax / qmax
    best_err = None
    for ratio in _CLIP_RATIOS[bits]:
        s = (amax * ratio / qmax).astype(np.float32).astype(np.float64)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(v * inv[g]), -qmax, qmax)
        err = np.bincount(g, weights=(q * s[g] - v) ** 2, minlength=ns)
        if best_err is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale = np.where(better, s, best_scale)
            best_err = np.where(better, err, best_err)
    scales = best_scale.astype(np.float32)
    inv = np.divide(1.0, scales.astype(np.float64), out=np.zeros(ns), where=scales > 0)
    q = np.clip(np.rint(v * inv[g]), -qmax, qmax).astype(np.int8)
    qvalues = q if bits == 8 else pack_int4(q)
    return QuantizedSparse(np.ascontiguousarray(qvalues), scales, mask, rows, cols, bits, group_size, nnz)


def qsparse_matmul_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto for ``fips.QSparseMatMul`` (float32 A and output): the reference body.

    The SparseMatMul body with the values computed from the codes first (docs/sparse-op.md)::

        bits, group_size, activation_bits ──► more terms of `worst` (bits in {4, 8}, 0 <= group_size < 2**31,
              activation_bits in {0, 8}; the body always computes with float A: the exact reference)
        CastLike(-1 / 256, qvalues) ─DequantizeLinear─► qvalues is int8 (bits 8) / uint8 (bits 4)
        nnz = len(idx);  Reshape(Concat(DequantizeLinear(qvalues, 1, zero), 0), ceil(nnz*bits/8) + 1)
              ─Mod 256─► bytes u ─[u mod d, floor(u/d) mod d]─Slice(step 8/bits... )─► codes [nnz]
              (d = 2**bits; codes >= d/2 get -d: two's complement)
        group = idx // cols (group_size 0) or arange(nnz) // group_size
        Reshape(Concat(scales, 0), nscales + 1) ─Gather(group)─► s;  values = codes * s
        values ──(the SparseMatMul body: ScatterElements by the mask, Gemm)──► Y

    The codes are dequantized per call (after the run-time zero, so nothing is folded into a float
    initializer at load: the session keeps the int8 / int4 bytes of the file).
    """
    b = _Body()
    node, const = b.node, b.const

    def q_terms(b, one_d):
        bits_d = node("Cast", [b.attr_const("bits_i", "bits")], "bits_d", to=TensorProto.DOUBLE)
        g_d = node("Cast", [b.attr_const("group_i", "group_size")], "g_d", to=TensorProto.DOUBLE)
        # 1 - |bits - 4| * |bits - 8| >= 1 iff bits is 4 or 8
        t_bits = node("Sub", [one_d, node("Mul", [node("Abs", [node("Sub", [bits_d, const("four_d", np.array(4.0))],
                                                                      "b4")], "b4a"),
                                                 node("Abs", [node("Sub", [bits_d, const("eight_d", np.array(8.0))],
                                                                      "b8")], "b8a")], "bprod")], "t_bits")
        t_g_lo = node("Add", [g_d, one_d], "t_g_lo")
        t_g_hi = node("Sub", ["two_31", g_d], "t_g_hi")
        # the qvalues type: int8 for bits 8 (CastLike(-1) < 0), uint8 for bits 4, 8 bits wide
        # (CastLike(256) wraps to 0); DequantizeLinear refuses float and other integer types at load
        one_f = const("one_f", np.array(1.0, np.float32))
        p_sign = node("DequantizeLinear", [node("CastLike", [const("minus_one_i", np.array([-1], np.int32)), "qvalues"],
                                                "probe_m1"), one_f], "p_sign")
        p_wide = node("DequantizeLinear", [node("CastLike", [const("c256_i", np.array([256], np.int32)), "qvalues"],
                                                "probe_256"), one_f], "p_wide")
        signed_d = node("Cast", [node("Less", [p_sign, const("zero_f", np.array(0.0, np.float32))], "is_signed")],
                        "signed_d", to=TensorProto.DOUBLE)
        is8_d = node("Cast", [node("Equal", ["bits_d", "eight_d"], "is8")], "is8_d", to=TensorProto.DOUBLE)
        t_sign = node("Sub", [one_d, node("Abs", [node("Sub", [signed_d, is8_d], "sdiff")], "sdiff_a")], "t_sign")
        t_wide = node("Sub", [one_d, node("Abs", [node("Cast", [p_wide], "p_wide_d", to=TensorProto.DOUBLE)],
                                          "p_wide_a")], "t_wide")
        # activation_bits (default 0): 1 - |ab| * |ab - 8| >= 1 iff it is 0 or 8. The body computes with float
        # activations either way: activation_bits = 8 only permits the native kernel to quantize A (the
        # tolerance of docs/sparse-op.md, "activation_bits"); this body is its exact-float reference.
        ab_d = node("Cast", [b.attr_const("act_bits_i", "activation_bits")], "ab_d", to=TensorProto.DOUBLE)
        t_act = node("Sub", [one_d, node("Mul", [node("Abs", [ab_d], "ab_a"),
                                                 node("Abs", [node("Sub", [ab_d, "eight_d"], "ab8")], "ab8a")],
                                         "abprod")], "t_act")
        return [t_bits, t_g_lo, t_g_hi, t_sign, t_wide, t_act]

    zero64, n, cols_1, zero_1 = _checked_zero(b, q_terms, "fips_QSparseMatMul_check_attributes")
    idx = _kept_index(b, opset, zero64, n, zero_1, "fips_QSparseMatMul_check_mask_length")
    nnz = node("Shape", [idx], "nnz")  # int64 [1]
    bits_1 = node("Unsqueeze", ["bits_i", zero_1], "bits_1")
    zero_f1 = node("Cast", [zero64], "zero_f1", to=TensorProto.FLOAT)  # [1] run-time 0.0
    # codes: the bytes as floats (a run-time zero point: not folded at load), exactly ceil(nnz*bits/8)
    zp = node("CastLike", [node("Squeeze", [zero64], "zero_sc"), "qvalues"], "zp")
    qf = node("DequantizeLinear", ["qvalues", "one_f", zp], "qf")
    nq_1 = node("Add", [node("Div", [node("Add", [node("Mul", [nnz, bits_1], "nnz_bits"),
                                                  const("seven_i", np.array([7], np.int64))], "nnz_bits7"),
                                     "eight"], "nq"), const("one_i", np.array([1], np.int64))], "nq_1")
    q_rt = node("Reshape", [node("Concat", [qf, zero_f1], "q_pad", axis=0), nq_1], "q_rt",
                name="fips_QSparseMatMul_check_qvalues_length")
    u = node("Mod", [node("Add", [q_rt, const("f256", np.array(256.0, np.float32))], "q_256"), "f256"], "u", fmod=1)
    is8 = node("Equal", ["bits_1", const("eight_1", np.array([8], np.int64))], "is8_1")
    d = node("Where", [is8, "f256", const("f16", np.array(16.0, np.float32))], "d")  # 2**bits, [1]
    div = node("Concat", [const("f1", np.array([1.0], np.float32)), d], "div", axis=0)  # [1, d]
    nib = node("Mod", [node("Floor", [node("Div", [node("Unsqueeze", [u, "minus_1"], "u_col"), div], "u_div")],
                            "u_fl"), d], "nib", fmod=1)  # [nq + 1, 2]: the two nibbles (bits 4) / byte, 0 (bits 8)
    step = node("Div", [bits_1, const("four_i", np.array([4], np.int64))], "step")  # 2 (bits 8) or 1 (bits 4)
    codes_u = node("Slice", [node("Reshape", [nib, "minus_1"], "nib_flat"), zero_1,
                             node("Mul", [nnz, step], "codes_end"), zero_1, step], "codes_u")  # [nnz]
    half = node("Div", [d, const("f2", np.array(2.0, np.float32))], "half")
    codes = node("Sub", [codes_u, node("Mul", [d, node("Cast", [node("GreaterOrEqual", [codes_u, half], "neg")],
                                                       "neg_f", to=TensorProto.FLOAT)], "wrap")], "codes")
    # scale of each entry: per row (group_size 0) or per group_size consecutive kept entries
    g_1 = node("Unsqueeze", ["group_i", zero_1], "g_1")
    g_pos = node("Max", [g_1, "one_i"], "g_pos")
    by_row = node("Equal", [g_1, node("Sub", [g_1, g_1], "g_zero")], "by_row")
    row_of = node("Div", [idx, node("Cast", [cols_1], "cols_i32", to=TensorProto.INT32)], "row_of")
    k = node("Range", ["zero_i32", node("Cast", [node("Squeeze", [nnz], "nnz_s")], "nnz_i32", to=TensorProto.INT32),
                       "one_i32"], "k")
    grp = node("Where", [by_row, row_of, node("Div", [k, node("Cast", [g_pos], "g_i32", to=TensorProto.INT32)],
                                              "k_grp")], "grp")
    nsc = node("Where", [by_row, node("Unsqueeze", ["rows", zero_1], "rows_1"),
                         node("Div", [node("Sub", [node("Add", [nnz, g_pos], "nnz_g"), "one_i"], "nnz_g1"), g_pos],
                              "ngroups")], "nsc")
    s_rt = node("Reshape", [node("Concat", ["scales", zero_f1], "s_pad", axis=0), node("Add", [nsc, "one_i"], "nsc_1")],
                "s_rt", name="fips_QSparseMatMul_check_scales_length")
    values = node("Mul", [codes, node("Gather", [s_rt, grp], "s_k", axis=0)], "deq")
    _scatter_gemm(b, np.float32, n, idx, values, cols_1)
    default_transb = helper.make_attribute("transB", 0)
    default_act_bits = helper.make_attribute("activation_bits", 0)
    return helper.make_function(
        DOMAIN, Q_OP_TYPE, ["A", "qvalues", "scales", "mask"], ["Y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=["rows", "cols", "bits", "group_size"],
        attribute_protos=[default_transb, default_act_bits],
        doc_string="Y = A @ V (transB=0) or A @ V^T (transB=1); V [rows, cols] = q * scale of the kept entries "
                   "(int8, or int4 packed two per byte; scales per row or per group_size kept entries), "
                   "scattered by the little-endian packed bitmask (docs/sparse-op.md). Reference body.")
