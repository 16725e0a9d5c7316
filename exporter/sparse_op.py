"""The ``fips.SparseMatMul`` node and its model-local function body (docs/sparse-op.md).

The body is the reference path: standard ONNX ops only, so an exported file runs in any
onnxruntime. A native kernel registered for the same (domain, op_type) replaces it.

Body (A [..., K], values [nnz], mask uint8 [nbytes]; attributes rows, cols, transB)::

    A ──Shape──ReduceMin──×0──Cast(uint8)──► zero          (a 0 that only exists at run time)
    mask ──Add(zero)──Unsqueeze──BitShift(LEFT, 7-k)──BitShift(RIGHT, 7)──► bits [nbytes, 8]
    bits ──Reshape(-1)──Slice(0, rows*cols)──NonZero──► idx [nnz]   (int64, transient)
    ConstantOfShape(rows*cols) ──ScatterElements(idx, values)──Reshape(rows, cols)──► V
    A ──Reshape(-1, K)──Gemm(V, transB)──Reshape(A.shape[:-1] + [out])──► Y

Why the ``zero``: onnxruntime inlines model-local functions and constant-folds every node whose
inputs are all initializers. Without the zero, ``mask → bits → NonZero → ScatterElements``
depends on initializers only, so every V would be densified at session creation (and the
NonZero indices stored as int64 initializers). ``Shape(A)`` has the activation's dynamic
batch/sequence dims, so nothing downstream of the zero can be folded: V is rebuilt per call
and freed after its Gemm (at most one dense V alive at a time with sequential execution).
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
    """The FunctionProto for ``fips.SparseMatMul`` with float type ``elem_type`` (FLOAT or FLOAT16)."""
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

    zero_1 = const("zero_1", np.array([0], np.int64))
    minus_1 = const("minus_1", np.array([-1], np.int64))
    # the run-time zero: tied to the activation's (dynamic) shape, see module docstring
    shape_a = node("Shape", ["A"], "shape_a")
    min_dim = node("ReduceMin", [shape_a], "min_dim", keepdims=1)  # int64 [1]
    zero64 = node("Mul", [min_dim, zero_1], "zero64")
    zero8 = node("Cast", [zero64], "zero8", to=TensorProto.UINT8)
    mask_rt = node("Add", ["mask", zero8], "mask_rt")  # uint8 [nbytes], not foldable
    # bit k of each byte (little-endian bit order): (m << (7 - k)) >> 7
    mask_col = node("Unsqueeze", [mask_rt, minus_1], "mask_col")  # [nbytes, 1]
    left = const("left", np.arange(7, -1, -1, dtype=np.uint8)[None, :])
    seven = const("seven", np.array([[7]], np.uint8))
    hi = node("BitShift", [mask_col, left], "hi", direction="LEFT")
    bits8 = node("BitShift", [hi, seven], "bits8", direction="RIGHT")  # [nbytes, 8] of 0/1
    rows = attr_const("rows", "rows")
    cols = attr_const("cols", "cols")
    n_scalar = node("Mul", [rows, cols], "n_scalar")
    n = node("Unsqueeze", [n_scalar, zero_1], "n")  # [1]
    flat = node("Reshape", [bits8, minus_1], "bits_flat")
    bits = node("Slice", [flat, zero_1, n], "bits")  # rows are not byte-padded: drop the tail
    nz = node("NonZero", [bits], "nz")  # int64 [1, nnz], transient
    idx = node("Reshape", [nz, minus_1], "idx")
    zeros = node("ConstantOfShape", [n], "zeros", value=numpy_helper.from_array(np.zeros([1], np_type)))
    v_flat = node("ScatterElements", [zeros, idx, "values"], "v_flat", axis=0)
    rc = node("Concat", [node("Unsqueeze", [rows, zero_1], "rows_1"), node("Unsqueeze", [cols, zero_1], "cols_1")],
              "rc", axis=0)
    v = node("Reshape", [v_flat, rc], "V")
    # Y = A @ V (transB=0) or A @ V^T (transB=1), on any leading dims
    lead = node("Shape", ["A"], "lead", end=-1)
    k = node("Shape", ["A"], "k", start=-1)
    a2 = node("Reshape", ["A", node("Concat", [minus_1, k], "a2_shape", axis=0)], "A2")
    gemm = helper.make_node("Gemm", [a2, v], ["Y2"])
    gemm.attribute.append(_ref_as("transB", "transB"))
    nodes.append(gemm)
    out_dim = node("Shape", ["Y2"], "out_dim", start=-1)
    node("Reshape", ["Y2", node("Concat", [lead, out_dim], "y_shape", axis=0)], "Y")
    default_transb = helper.make_attribute("transB", 0)
    return helper.make_function(
        DOMAIN, OP_TYPE, ["A", "values", "mask"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["rows", "cols"], attribute_protos=[default_transb],
        doc_string="Y = A @ V (transB=0) or A @ V^T (transB=1); V [rows, cols] = values scattered by the "
                   "little-endian packed bitmask (docs/sparse-op.md). Reference body of standard ops.")
