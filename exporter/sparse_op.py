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


def sparse_matmul_function(elem_type: int, opset: int) -> onnx.FunctionProto:
    """The FunctionProto for ``fips.SparseMatMul`` with float type ``elem_type`` (FLOAT or FLOAT16).

    Kept short on purpose: onnxruntime inlines one copy of the body per node (about 3 KB of
    session memory per node), so every node saved here is saved ~90 times for SmolLM2.
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, output, name=None, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def const(name, array):
        return node("Constant", [], name, value=numpy_helper.from_array(np.asarray(array), name))

    def attr_const(name, ref):
        n = helper.make_node("Constant", [], [name])
        n.attribute.append(_ref_as("value_int", ref))
        nodes.append(n)
        return name

    rows = attr_const("rows", "rows")
    cols = attr_const("cols", "cols")
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
    tb_d = node("Cast", [attr_const("transB_i", "transB")], "tb_d", to=TensorProto.DOUBLE)
    worst = node("Min", [rows_d, "cols_d", node("Sub", [const("two_31", np.array(2.0 ** 31)), n_d], "room"),
                         node("Add", [tb_d, one_d], "tb_lo"),
                         node("Sub", [const("two_d", np.array(2.0)), tb_d], "tb_hi")], "worst")
    bad = node("Cast", [node("Less", [worst, one_d], "invalid")], "bad", to=TensorProto.INT64)  # [1]: 0 or 1
    # the run-time zero: tied to the activation's shape (any dynamic dim), see module docstring
    smallest = node("ReduceMin", [node("Shape", ["A"], "shape_a")], "smallest", keepdims=1)  # int64 [1]
    zero64 = node("Gather", [node("Sub", [smallest, smallest], "zero_any"), bad], "zero64", axis=0,
                  name="fips_SparseMatMul_check_rows_cols_transB")
    # [1] = rows*cols (exact when valid; clipped first so that no out-of-range float is cast to int64)
    n = node("Cast", [node("Clip", [n_d, one_d, "two_31"], "n_clip")], "n", to=TensorProto.INT64)
    # mask + one 0 byte (Concat: mask must be 1-D uint8), reshaped to exactly ceil(n/8) + 1 bytes
    mask_rt = node("Reshape", [node("Concat", ["mask", node("Cast", [zero64], "zero8", to=TensorProto.UINT8)],
                                    "mask_pad", axis=0),
                               node("Div", [node("Add", [n, const("fifteen", np.array([15], np.int64))], "n_15"),
                                            const("eight", np.array([8], np.int64))], "nbytes_1")], "mask_rt",
                   name="fips_SparseMatMul_check_mask_length")
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
    idx = node("Compress", [flat_index, kept], "idx", axis=0)  # int32 [nnz]: flat index of each kept entry
    # the zero buffer's length also depends on idx, so it is allocated only once flat_index is freed
    idx_len = node("Shape", [idx], "idx_len")
    zeros_len = node("Add", [n, node("Sub", [idx_len, idx_len], "zero_after_idx")], "zeros_len")
    zeros = node("ConstantOfShape", [zeros_len], "zeros", value=numpy_helper.from_array(np.zeros([1], np_type)))
    v_flat = node("ScatterElements", [zeros, idx, "values"], "v_flat", axis=0)
    v = node("Reshape", [v_flat, node("Concat", [minus_1, cols_1], "v_shape", axis=0)], "V")
    # Y = A @ V (transB=0) or A @ V^T (transB=1), on any leading dims
    gemm = helper.make_node("Gemm", [node("Flatten", ["A"], "A2", axis=-1), v], ["Y2"])
    gemm.attribute.append(_ref_as("transB", "transB"))
    nodes.append(gemm)
    y_shape = node("Concat", [node("Shape", ["A"], "lead", end=-1), node("Shape", ["Y2"], "out_dim", start=-1)],
                   "y_shape", axis=0)
    node("Reshape", ["Y2", y_shape], "Y", allowzero=1)  # an empty batch: a 0 in y_shape is a 0
    default_transb = helper.make_attribute("transB", 0)
    return helper.make_function(
        DOMAIN, OP_TYPE, ["A", "values", "mask"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["rows", "cols"], attribute_protos=[default_transb],
        doc_string="Y = A @ V (transB=0) or A @ V^T (transB=1); V [rows, cols] = values scattered by the "
                   "little-endian packed bitmask (docs/sparse-op.md). Reference body of standard ops.")
