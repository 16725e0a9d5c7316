"""Single-node ``fips.SparseMatMul`` models, valid or deliberately broken (tests and fuzzing).

:func:`single_node_model` writes one node with the exporter's own function body
(:func:`fips_rt.exporter.sparse_op.sparse_matmul_function`), so a file built here is what an
exported model's sparse linear looks like, except for whatever a caller breaks on purpose.
:data:`CRAFTED` lists the broken variants the hardening tests carry (tests/test_hardening_onnx.py,
benchmarks/fuzz_onnx.py); :func:`crafted_case` builds one of them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .sparse_op import (DOMAIN, DOMAIN_VERSION, OP_TYPE, Q_OP_TYPE, qsparse_matmul_function, quantize_sparse,
                        sparse_matmul_function)


def random_sparse(rows: int, cols: int, density: float = 0.3, seed: int = 0, dtype=np.float32):
    """(dense V [rows, cols], values, little-endian packed mask) with about ``density`` kept."""
    rng = np.random.default_rng(seed)
    keep = rng.random((rows, cols)) < density
    dense = np.where(keep, rng.standard_normal((rows, cols)) * 0.1, 0.0).astype(dtype)
    return dense, np.ascontiguousarray(dense[keep]), np.packbits(keep.reshape(-1), bitorder="little")


def single_node_model(rows, cols, trans_b, values: np.ndarray, mask: np.ndarray, *, a_dims=None,
                      elem_type: int = TensorProto.FLOAT, opset: int = 18, body: bool = True,
                      weights_as_inputs: bool = False, attrs: dict | None = None,
                      omit_attrs: tuple = ()) -> onnx.ModelProto:
    """``Y = SparseMatMul(A, values, mask)`` with the given attributes and initializers.

    ``a_dims``: A's declared shape (default ``["n", K]`` with K = rows or cols as transB says;
    strings are symbolic dims). ``attrs`` replaces attribute values (any type, e.g. a float
    ``transB``); ``omit_attrs`` leaves attributes out. ``weights_as_inputs``: values and mask are
    graph inputs instead of initializers.
    """
    if a_dims is None:
        k = cols if trans_b == 1 else rows
        a_dims = ["n", k if isinstance(k, int) and 0 <= k < 2 ** 62 else "k"]
    inputs = [helper.make_tensor_value_info("A", elem_type, a_dims)]
    inits = []
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info("values", helper.np_dtype_to_tensor_dtype(values.dtype), None),
                   helper.make_tensor_value_info("mask", helper.np_dtype_to_tensor_dtype(mask.dtype), None)]
    else:
        inits = [numpy_helper.from_array(values, "values"), numpy_helper.from_array(mask, "mask")]
    node = helper.make_node(OP_TYPE, ["A", "values", "mask"], ["Y"], domain=DOMAIN)
    all_attrs = {"rows": rows, "cols": cols, "transB": trans_b, **(attrs or {})}
    for name, value in all_attrs.items():
        if name not in omit_attrs:
            node.attribute.append(helper.make_attribute(name, value))
    graph = helper.make_graph([node], "sparse_matmul", inputs, [helper.make_tensor_value_info("Y", elem_type, None)],
                              initializer=inits)
    functions = [sparse_matmul_function(elem_type, opset)] if body else []
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=functions)
    model.ir_version = 8 if opset <= 17 else 9
    return model


def _wrap(rows: int) -> tuple[int, int]:
    """(rows, cols) with cols < 2**63 whose product (and ceil(cols/128) * rows) wraps around 2**64 to a
    small number: the attributes of the heap overflow of issue 10."""
    nch = -(-(2 ** 64) // rows)
    return rows, 128 * nch


# name -> (description, builder arguments). Every one of them breaks the rule of docs/sparse-op.md.
CRAFTED: dict[str, str] = {
    "wrap_rows_cols": "rows*cols and ceil(cols/128)*rows wrap around 2**64 to small numbers",
    "huge_square": "rows = cols = 2**32 (rows*cols wraps to 0: an empty mask and values)",
    "rows_2p31": "rows = 2**31, cols = 1 (rows*cols = 2**31, beyond int32)",
    "negative_rows": "rows = -3, cols = -5 (rows*cols = 15)",
    "zero_cols": "cols = 0 with a huge rows",
    "short_values": "one value fewer than the mask keeps",
    "long_values": "one value more than the mask keeps",
    "short_mask": "mask one byte shorter than ceil(rows*cols/8), values matching its popcount",
    "long_mask": "mask one (zero) byte longer than ceil(rows*cols/8)",
    "mask_int8": "mask of dtype int8",
    "mask_2d": "mask of the right length as a 2-D tensor",
    "wrong_a_shape": "A's declared last dimension is rows + 1",
    "transB_2": "transB = 2",
    "float_transB": "transB given as a float attribute",
    "missing_rows": "no rows attribute",
}


def crafted_case(name: str, *, opset: int = 18, elem_type: int = TensorProto.FLOAT, body: bool = True,
                 seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """One of :data:`CRAFTED`: ``(model, A)``, A an input the node would take if it were valid."""
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    rows, cols, tb = 24, 20, 0
    _, values, mask = random_sparse(rows, cols, seed=seed, dtype=np_type)
    kw = dict(elem_type=elem_type, opset=opset, body=body)
    a = np.random.default_rng(seed + 1).standard_normal((3, rows)).astype(np_type)
    if name == "wrap_rows_cols":
        r, c = _wrap(1000)
        bits = (r * c) % 2 ** 64
        m = np.zeros((bits + 7) // 8, np.uint8)
        m[:4] = 0xFF
        model = single_node_model(r, c, 0, np.ones(32, np_type), m, **kw)
        a = np.ones((2, r), np_type)
    elif name == "huge_square":
        r = c = 2 ** 32
        m = np.zeros(0, np.uint8)
        model = single_node_model(r, c, 0, np.zeros(0, np_type), m, a_dims=["n", "k"], **kw)
        a = np.ones((1, 4), np_type)
    elif name == "rows_2p31":
        model = single_node_model(2 ** 31, 1, 0, np.zeros(0, np_type), np.zeros(2 ** 28 // 1024, np.uint8),
                                  a_dims=["n", "k"], **kw)
        a = np.ones((1, 4), np_type)
    elif name == "negative_rows":
        model = single_node_model(-3, -5, 0, values[:3], np.array([0x07, 0], np.uint8), a_dims=["n", "k"], **kw)
        a = np.ones((1, 3), np_type)
    elif name == "zero_cols":
        model = single_node_model(2 ** 40, 0, 0, np.zeros(0, np_type), np.zeros(0, np.uint8), a_dims=["n", "k"],
                                  **kw)
        a = np.ones((1, 4), np_type)
    elif name == "short_values":
        model = single_node_model(rows, cols, tb, values[:-1], mask, **kw)
    elif name == "long_values":
        model = single_node_model(rows, cols, tb, np.concatenate([values, values[:1]]), mask, **kw)
    elif name == "short_mask":
        short = mask[:-1]
        kept = int(np.unpackbits(short, bitorder="little").sum())
        model = single_node_model(rows, cols, tb, values[:kept], short, **kw)
    elif name == "long_mask":
        model = single_node_model(rows, cols, tb, values, np.concatenate([mask, np.zeros(1, np.uint8)]), **kw)
    elif name == "mask_int8":
        model = single_node_model(rows, cols, tb, values, mask.view(np.int8), **kw)
    elif name == "mask_2d":
        model = single_node_model(rows, cols, tb, values, mask.reshape(2, -1), **kw)
    elif name == "wrong_a_shape":
        model = single_node_model(rows, cols, tb, values, mask, a_dims=["n", rows + 1], **kw)
        a = np.ones((3, rows + 1), np_type)
    elif name == "transB_2":  # square, so that a transB read as "true" would still run
        _, values, mask = random_sparse(rows, rows, seed=seed, dtype=np_type)
        model = single_node_model(rows, rows, 2, values, mask, a_dims=["n", "k"], **kw)
    elif name == "float_transB":
        model = single_node_model(rows, cols, 0, values, mask, attrs={"transB": 1.0}, a_dims=["n", "k"], **kw)
    elif name == "missing_rows":
        model = single_node_model(rows, cols, tb, values, mask, omit_attrs=("rows",), a_dims=["n", "k"], **kw)
    else:
        raise KeyError(f"no crafted case {name!r}; known: {', '.join(CRAFTED)}")
    return model, a


# ---------------------------------------------------------------------------- fips.QSparseMatMul
def single_qnode_model(rows, cols, trans_b, qvalues: np.ndarray, scales: np.ndarray, mask: np.ndarray, *,
                       bits: int, group_size: int, a_dims=None, opset: int = 18, body: bool = True,
                       weights_as_inputs: bool = False, attrs: dict | None = None,
                       omit_attrs: tuple = ()) -> onnx.ModelProto:
    """``Y = QSparseMatMul(A, qvalues, scales, mask)`` (float32 A) with the exporter's function body.

    Arguments as :func:`single_node_model`; ``weights_as_inputs`` feeds qvalues, scales and mask at run time.
    """
    if a_dims is None:
        k = cols if trans_b == 1 else rows
        a_dims = ["n", k if isinstance(k, int) and 0 <= k < 2 ** 62 else "k"]
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_dims)]
    inits = []
    weights = {"qvalues": qvalues, "scales": scales, "mask": mask}
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                   for k, v in weights.items()]
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    node = helper.make_node(Q_OP_TYPE, ["A", "qvalues", "scales", "mask"], ["Y"], domain=DOMAIN)
    all_attrs = {"rows": rows, "cols": cols, "transB": trans_b, "bits": bits, "group_size": group_size,
                 **(attrs or {})}
    for name, value in all_attrs.items():
        if name not in omit_attrs:
            node.attribute.append(helper.make_attribute(name, value))
    graph = helper.make_graph([node], "qsparse_matmul", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    functions = [qsparse_matmul_function(opset)] if body else []
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=functions)
    model.ir_version = 8 if opset <= 17 else 9
    return model


def random_qsparse(rows: int, cols: int, bits: int, group_size: int, density: float = 0.3, seed: int = 0):
    """(QuantizedSparse, dense float64 V of its dequantized values)."""
    _, values, mask = random_sparse(rows, cols, density, seed)
    q = quantize_sparse(values, mask, rows, cols, bits, group_size)
    keep = np.unpackbits(mask, count=rows * cols, bitorder="little").astype(bool)
    dense = np.zeros(rows * cols, np.float64)
    dense[keep] = q.dequantize().astype(np.float64)
    return q, dense.reshape(rows, cols)


# name -> description: each breaks the QSparseMatMul part of the rule (docs/sparse-op.md)
QCRAFTED: dict[str, str] = {
    "q_short_scales": "one scale fewer than nscales",
    "q_long_scales": "one scale more than nscales",
    "q_row_scales_for_groups": "group_size 32 but rows scales (per-row count)",
    "q_short_qvalues": "one code byte fewer than nnz (int8)",
    "q_long_qvalues": "one code byte more than nnz (int8)",
    "q_int4_short": "int4 with ceil(nnz/2) - 1 bytes",
    "q_int4_long": "int4 with ceil(nnz/2) + 1 bytes (odd nnz: the long array an unpadded nnz/2+1 reading would take)",
    "q_short_mask": "mask one byte short",
    "q_long_mask": "mask one byte long",
    "q_bits_6": "bits = 6",
    "q_bits_missing": "no bits attribute",
    "q_group_negative": "group_size = -1",
    "q_group_missing": "no group_size attribute",
    "q_int8_codes_for_int4": "bits = 4 with int8 qvalues",
    "q_uint8_codes_for_int8": "bits = 8 with uint8 qvalues",
    "q_float_qvalues": "float32 qvalues",
    "q_scales_2d": "scales of the right count as a 2-D tensor",
    "q_wrap_rows_cols": "rows*cols wraps around 2**64",
    "q_transB_2": "transB = 2",
}


def qcrafted_case(name: str, *, opset: int = 18, body: bool = True, seed: int = 0):
    """One of :data:`QCRAFTED`: ``(model, A)``."""
    rows, cols, tb = 24, 20, 0
    rng = np.random.default_rng(seed + 1)
    a = rng.standard_normal((3, rows)).astype(np.float32)
    # an odd nnz, so that the int4 padding nibble exists
    _, values, mask = random_sparse(rows, cols, seed=seed)
    keep = np.unpackbits(mask, count=rows * cols, bitorder="little")
    if int(keep.sum()) % 2 == 0:
        i = int(np.flatnonzero(keep == 0)[0])
        keep[i] = 1
        mask = np.packbits(keep, bitorder="little")
        values = np.random.default_rng(seed).standard_normal(int(keep.sum())).astype(np.float32) * 0.1
    q8 = quantize_sparse(values, mask, rows, cols, 8, 0)
    q4 = quantize_sparse(values, mask, rows, cols, 4, 8)
    kw = dict(opset=opset, body=body)

    def m8(qv=q8.qvalues, sc=q8.scales, mk=mask, **extra):
        return single_qnode_model(rows, cols, tb, qv, sc, mk, **{"bits": 8, "group_size": 0, **kw, **extra})

    def m4(qv=q4.qvalues, sc=q4.scales, mk=mask, **extra):
        return single_qnode_model(rows, cols, tb, qv, sc, mk, **{"bits": 4, "group_size": 8, **kw, **extra})

    if name == "q_short_scales":
        model = m8(sc=q8.scales[:-1])
    elif name == "q_long_scales":
        model = m4(sc=np.append(q4.scales, np.float32(1)))
    elif name == "q_row_scales_for_groups":
        model = m8(sc=np.ones(rows, np.float32), group_size=32)
    elif name == "q_short_qvalues":
        model = m8(qv=q8.qvalues[:-1])
    elif name == "q_long_qvalues":
        model = m8(qv=np.append(q8.qvalues, np.int8(1)))
    elif name == "q_int4_short":
        model = m4(qv=q4.qvalues[:-1])
    elif name == "q_int4_long":
        model = m4(qv=np.append(q4.qvalues, np.uint8(0x11)))
    elif name == "q_short_mask":
        short = mask[:-1]
        kept = int(np.unpackbits(short, bitorder="little").sum())
        model = m8(qv=q8.qvalues[:kept], mk=short)
    elif name == "q_long_mask":
        model = m8(mk=np.append(mask, np.uint8(0)))
    elif name == "q_bits_6":
        model = m8(attrs={"bits": 6})
    elif name == "q_bits_missing":
        model = m8(omit_attrs=("bits",), a_dims=["n", "k"])
    elif name == "q_group_negative":
        model = m8(attrs={"group_size": -1}, a_dims=["n", "k"])
    elif name == "q_group_missing":
        model = m8(omit_attrs=("group_size",), a_dims=["n", "k"])
    elif name == "q_int8_codes_for_int4":
        model = m4(qv=q4.qvalues.view(np.int8))
    elif name == "q_uint8_codes_for_int8":
        model = m8(qv=q8.qvalues.view(np.uint8))
    elif name == "q_float_qvalues":
        model = m8(qv=q8.qvalues.astype(np.float32))
    elif name == "q_scales_2d":
        model = m8(sc=q8.scales.reshape(2, -1))
    elif name == "q_wrap_rows_cols":
        r, c = _wrap(1000)
        bits = (r * c) % 2 ** 64
        mk = np.zeros((bits + 7) // 8, np.uint8)
        mk[:4] = 0xFF
        model = single_qnode_model(r, c, 0, np.ones(32, np.int8), np.ones(r % 2 ** 31, np.float32)[:1000], mk,
                                   bits=8, group_size=0, **kw)
        a = np.ones((2, r), np.float32)
    elif name == "q_transB_2":
        _, v2, mk2 = random_sparse(rows, rows, seed=seed)
        qq = quantize_sparse(v2, mk2, rows, rows, 8, 0)
        model = single_qnode_model(rows, rows, 2, qq.qvalues, qq.scales, mk2, bits=8, group_size=0,
                                   a_dims=["n", "k"], **kw)
    else:
        raise KeyError(f"no crafted case {name!r}; known: {', '.join(QCRAFTED)}")
    return model, a
