"""The ``fips.SparseMatMul`` node and its model-local function body (docs/sparse-op.md).

The body is the reference path: standard ONNX ops only, so an exported file runs in any
onnxruntime. A native kernel registered for the same (domain, op_type) replaces it.

Body (A [..., K], values [nnz], mask uint8 [nbytes]; attributes rows, cols, transB)::

    A ──Shape──ReduceMin──Sub(itself)──► zero [1]          (a 0 that only exists at run time)
    mask ──Add(Cast(zero))──Unsqueeze──BitShift(RIGHT, k)──BitwiseAnd(1)──► bits [nbytes, 8]
    bits ──Reshape(-1)──Slice(0, rows*cols)──Cast(int32)──► b;  pos = CumSum(b) * b   (int32, transient)
    [0 (run-time), values...] ──Gather(pos)──Reshape(-1, cols)──► V   (kept entry k at its index, 0 elsewhere)
    A ──Flatten(-1)──Gemm(V, transB)──Reshape(A.shape[:-1] + [out])──► Y
    (opset 17 has no BitwiseAnd: (m << 7-k) >> 7 with two BitShifts instead)

Why the ``zero``: onnxruntime inlines model-local functions and constant-folds every node whose
inputs are all initializers. Without the zero, ``mask → bits → pos → Gather`` depends on
initializers only, so every V would be densified at session creation (with its int32 positions
and a second copy of the values stored as initializers). ``Shape(A)`` has the activation's dynamic
batch/sequence dims, so nothing downstream of the zero can be folded: V is rebuilt per call and
freed after its Gemm (at most one dense V alive at a time with sequential execution). Transient
memory per node: about 2.3x the dense V (positions int32 + V + bits), measured; the former
NonZero/ScatterElements body needed 3.8x.
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

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(name, array):
        return node("Constant", [], name, value=numpy_helper.from_array(np.asarray(array), name))

    def attr_const(name, ref):
        n = helper.make_node("Constant", [], [name])
        n.attribute.append(_ref_as("value_int", ref))
        nodes.append(n)
        return name

    # the run-time zero: tied to the activation's shape (any dynamic dim), see module docstring
    smallest = node("ReduceMin", [node("Shape", ["A"], "shape_a")], "smallest", keepdims=1)  # int64 [1]
    zero64 = node("Sub", [smallest, smallest], "zero64")
    mask_rt = node("Add", ["mask", node("Cast", [zero64], "zero8", to=TensorProto.UINT8)], "mask_rt")
    # bit k of each byte (little-endian bit order) -> [nbytes, 8] of 0/1
    minus_1 = const("minus_1", np.array([-1], np.int64))
    mask_col = node("Unsqueeze", [mask_rt, minus_1], "mask_col")
    if opset >= 18:
        shifted = node("BitShift", [mask_col, const("shifts", np.arange(8, dtype=np.uint8)[None, :])], "shifted",
                       direction="RIGHT")
        bits8 = node("BitwiseAnd", [shifted, const("one", np.array([[1]], np.uint8))], "bits8")
    else:  # (m << (7 - k)) >> 7, BitShift only (opset 11)
        hi = node("BitShift", [mask_col, const("left", np.arange(7, -1, -1, dtype=np.uint8)[None, :])], "hi",
                  direction="LEFT")
        bits8 = node("BitShift", [hi, const("seven", np.array([[7]], np.uint8))], "bits8", direction="RIGHT")
    rows = attr_const("rows", "rows")
    cols = attr_const("cols", "cols")
    zero_1 = const("zero_1", np.array([0], np.int64))
    n = node("Unsqueeze", [node("Mul", [rows, cols], "n_scalar"), zero_1], "n")  # [1] = rows*cols
    bits = node("Slice", [node("Reshape", [bits8, minus_1], "bits_flat"), zero_1, n], "bits")  # drop the pad bits
    # V_flat[i] = values0[bits[i] * cumsum(bits)[i]] with values0 = [0, values...]: the k-th kept entry
    # lands at its flat index, every other entry reads the leading 0 (no NonZero, no zero buffer)
    bits32 = node("Cast", [bits], "bits32", to=TensorProto.INT32)
    pos = node("Mul", [node("CumSum", [bits32, const("axis0", np.array(0, np.int32))], "rank"), bits32], "pos")
    lead0 = node("ConstantOfShape", [node("Add", [const("one_1", np.array([1], np.int64)), zero64], "one_rt")],
                 "lead0", value=numpy_helper.from_array(np.zeros([1], np_type)))  # run-time: never folded
    values0 = node("Concat", [lead0, "values"], "values0", axis=0)
    v_flat = node("Gather", [values0, pos], "v_flat", axis=0)
    v = node("Reshape", [v_flat, node("Concat", [minus_1, node("Unsqueeze", [cols, zero_1], "cols_1")], "v_shape",
                                      axis=0)], "V")
    # Y = A @ V (transB=0) or A @ V^T (transB=1), on any leading dims
    gemm = helper.make_node("Gemm", [node("Flatten", ["A"], "A2", axis=-1), v], ["Y2"])
    gemm.attribute.append(_ref_as("transB", "transB"))
    nodes.append(gemm)
    y_shape = node("Concat", [node("Shape", ["A"], "lead", end=-1), node("Shape", ["Y2"], "out_dim", start=-1)],
                   "y_shape", axis=0)
    node("Reshape", ["Y2", y_shape], "Y")
    default_transb = helper.make_attribute("transB", 0)
    return helper.make_function(
        DOMAIN, OP_TYPE, ["A", "values", "mask"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["rows", "cols"], attribute_protos=[default_transb],
        doc_string="Y = A @ V (transB=0) or A @ V^T (transB=1); V [rows, cols] = values scattered by the "
                   "little-endian packed bitmask (docs/sparse-op.md). Reference body of standard ops.")
