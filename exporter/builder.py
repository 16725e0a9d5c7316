"""A thin graph builder over ``onnx.helper``: named nodes, deduplicated initializers, small constants.

Initializers are registered once per *tensor identity* (data pointer, shape, strides, dtype), so a
weight referenced by several modules (a shared basis U, a tied embedding, a DeltaLLM shared matrix)
becomes one initializer whatever number of nodes use it. Every initializer carries a tag ("mlp",
"embedding", ...) used for the byte accounting of the export report.
"""
from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .sparse_op import DOMAIN, DOMAIN_VERSION, OP_TYPE, Q_OP_TYPE, qsparse_matmul_function, sparse_matmul_function

DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


def _transposed(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def _node_of(output: str) -> str:
    """The name of the node that produced ``output`` (GraphBuilder.op names outputs ``<node>_out<i>``)."""
    return output.rsplit("_out", 1)[0]


@dataclass
class IOInfo:
    name: str
    elem_type: int
    shape: list  # ints and axis names


@dataclass
class GraphBuilder:
    dtype: str = "fp32"
    opset: int = 18
    nodes: list = field(default_factory=list)
    inputs: list[IOInfo] = field(default_factory=list)
    outputs: list[IOInfo] = field(default_factory=list)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # per-graph caches (e.g. x·U per (input, basis))
    uses_sparse_op: bool = False
    uses_qsparse_op: bool = False
    # The quantizable form (``fips export --weights int8|int4``): every dense linear is ``MatMul(x, W^T)``
    # with the [in, out] initializer onnxruntime.quantization's MatMulNBitsQuantizer expects (it skips
    # Gemm), and FiPS V's go through fips.QSparseMatMul with ``sparse_bits``.
    matmul_form: bool = False
    sparse_bits: int | None = None
    sparse_group_size: int | None = None
    basis_float: bool = False  # quantizable form with float U: t·Uᵀ stays Gemm(transB=1) on the one stored U
    # fips.QSparseMatMul activation_bits: 8 = int8 activations for int8 per-row V (the VNNI kernels of
    # docs/sparse-op.md; set with --accuracy-level 4, the level at which MatMulNBits does the same); 0 = exact
    sparse_activation_bits: int = 0
    # node names whose activations must never be quantized (the FiPS basis products x·U, t·U^T)
    basis_nodes: set = field(default_factory=set)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        self.np_float, self.float_type = DTYPES[self.dtype]
        self._scope: list[str] = []
        self._tag = "other"
        self._counter = 0
        self._by_identity: dict[tuple, str] = {}
        self._consts: dict[tuple, str] = {}
        self._output_values: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ naming / scopes
    @contextlib.contextmanager
    def scope(self, name: str, tag: str | None = None):
        self._scope.append(name)
        old = self._tag
        if tag is not None:
            self._tag = tag
        try:
            yield
        finally:
            self._scope.pop()
            self._tag = old

    def _fresh(self, base: str) -> str:
        self._counter += 1
        prefix = "/".join(self._scope)
        return f"/{prefix}/{base}_{self._counter}" if prefix else f"/{base}_{self._counter}"

    # ------------------------------------------------------------------ nodes
    def op(self, op_type: str, inputs: Iterable[str], outputs: int | list[str] = 1, *, domain: str = "",
           **attrs: Any) -> str | list[str]:
        name = self._fresh(op_type)
        outs = [f"{name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def sparse_matmul(self, a: str, values: str, mask: str, rows: int, cols: int, trans_b: int) -> str:
        self.uses_sparse_op = True
        return self.op(OP_TYPE, [a, values, mask], domain=DOMAIN, rows=int(rows), cols=int(cols), transB=int(trans_b))

    def qsparse_matmul(self, a: str, q, trans_b: int, name: str) -> str:
        """``fips.QSparseMatMul`` of ``a`` with the quantized sparse V ``q`` (a
        ``sparse_op.QuantizedSparse``); its codes, scales and mask become initializers ``name.*``."""
        if self.float_type != TensorProto.FLOAT:
            raise ValueError("fips.QSparseMatMul computes in fp32; quantized exports use fp32 activations")
        self.uses_qsparse_op = True
        qv = self.add_initializer(f"{name}.qvalues", q.qvalues)
        sc = self.add_initializer(f"{name}.scales", np.asarray(q.scales, np.float32))
        mk = self.add_initializer(f"{name}.mask", q.mask)
        extra = {"activation_bits": 8} if self.sparse_activation_bits == 8 and q.bits == 8 and q.group_size == 0 else {}
        return self.op(Q_OP_TYPE, [a, qv, sc, mk], domain=DOMAIN, rows=int(q.rows), cols=int(q.cols),
                       transB=int(trans_b), bits=int(q.bits), group_size=int(q.group_size), **extra)

    def matmul_t(self, x: str, tensor, name: str, bias: str | None = None, *, basis: bool = False) -> str:
        """x @ W^T for a stored [out, in] weight as ``MatMul(x, W^T)``: the initializer is the transposed
        copy ``name.T`` ([in, out], once per tensor identity), the layout MatMulNBits quantizes.
        ``basis``: a FiPS basis product (its activations are never quantized)."""
        w = self.weight(tensor, f"{name}.T", transform=_transposed)
        y = self.op("MatMul", [x, w])
        if basis:
            self.basis_nodes.add(_node_of(y))
        return y if bias is None else self.op("Add", [y, bias])

    def linear_weight(self, x: str, tensor, name: str, bias: str | None = None) -> str:
        """A dense linear on a stored [out, in] weight: Gemm(transB=1) (the float default), or the
        quantizable ``MatMul(x, W^T)`` form."""
        if self.matmul_form:
            return self.matmul_t(x, tensor, name, bias)
        return self.gemm(x, self.weight(tensor, name), bias)

    # ------------------------------------------------------------------ tensors
    def add_initializer(self, name: str, array: np.ndarray, tag: str | None = None) -> str:
        if name in self.initializers:
            raise ValueError(f"duplicate initializer name {name}")
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.tags[name] = tag or self._tag
        return name

    def weight(self, tensor, name: str, *, dtype: str | None = None, tag: str | None = None, transform=None) -> str:
        """A torch tensor (or numpy array) as an initializer, once per tensor identity.

        ``dtype``: "fp32"/"fp16" for float tensors (default: the graph's compute dtype); other tensors
        keep theirs. ``transform``: an optional numpy function applied once (e.g. ``1 + w``); the key
        then includes it so a transformed and a plain use do not collide.
        """
        key = None
        if hasattr(tensor, "data_ptr"):
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype), dtype,
                   getattr(transform, "__name__", None))
            if tensor.numel() and key in self._by_identity:
                return self._by_identity[key]
            array = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()
        else:
            array = np.asarray(tensor)
        if transform is not None:
            array = transform(array)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(DTYPES[dtype or self.dtype][0], copy=False)
        out = self.add_initializer(name, array, tag)
        if key is not None and tensor.numel():
            self._by_identity[key] = out
        return out

    # onnxruntime turns one TensorProto at a time into a tensor while the whole proto is still held, so
    # session creation peaks at "all weights + the largest initializer". A big table (the vocabulary
    # embedding: 108 MiB in SmolLM2) is therefore stored as row chunks of at most CHUNK_BYTES.
    CHUNK_BYTES = 32 * 2**20

    def weight_rows(self, tensor, name: str) -> list[tuple[str, int, int]]:
        """A 2-D weight as row chunks: [(initializer, first row, rows), ...]; one chunk when small.
        Deduplicated by tensor identity like ``weight`` (a tied embedding is stored once)."""
        key = self._rows_key(tensor)
        if key in self._by_identity:
            return self._by_identity[key]
        bounds = self._row_bounds(tensor)
        if len(bounds) == 1:
            out = [(self.weight(tensor, name), 0, tensor.shape[0])]
        else:
            out = [(self.weight(tensor[r:r + n], f"{name}.rows{r}"), r, n) for r, n in bounds]
        self._by_identity[key] = out
        return out

    @staticmethod
    def _rows_key(tensor) -> tuple:
        return ("rows", tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))

    def _row_bounds(self, tensor) -> list[tuple[int, int]]:
        """(first row, rows) of each chunk of at most CHUNK_BYTES of a 2-D weight."""
        rows, cols = tensor.shape
        itemsize = DTYPES[self.dtype][0]().itemsize
        per = max(1, self.CHUNK_BYTES // max(1, cols * itemsize))
        return [(r, min(per, rows - r)) for r in range(0, rows, per)]

    def gather_rows(self, chunks: list[tuple[str, int, int]], ids: str) -> str:
        """Gather(table, ids) over a row-chunked table: each chunk looks up the ids in its range."""
        if len(chunks) == 1:
            return self.op("Gather", [chunks[0][0], ids])
        acc = None
        zero = self.i64(0)
        for init, start, n in chunks:
            local = self.op("Sub", [ids, self.i64(start)])
            valid = self.op("And", [self.op("GreaterOrEqual", [local, zero]), self.op("Less", [local, self.i64(n)])])
            got = self.op("Gather", [init, self.op("Where", [valid, local, zero])])
            got = self.op("Where", [self.op("Unsqueeze", [valid, self.i64([-1])]), got, self.fconst(0.0)])
            acc = got if acc is None else self.op("Add", [acc, got])
        return acc

    def gemm_rows(self, x: str, chunks: list[tuple[str, int, int]], bias: str | None = None) -> str:
        """x @ W^T for a row-chunked W (the LM head on the stored layout): one Gemm per chunk, Concat."""
        if len(chunks) == 1:
            return self.gemm(x, chunks[0][0], bias)
        y = self.op("Concat", [self.gemm(x, init) for init, _, _ in chunks], axis=1)
        return y if bias is None else self.op("Add", [y, bias])

    def head_rows(self, x: str, tensor, name: str, bias: str | None = None) -> str:
        """The LM head x @ W^T on a [vocab, d] weight, chunked by rows like ``weight_rows`` (so a tied
        embedding and the head have the same chunks). Float form: Gemm on the stored chunks (the
        embedding's own initializers when tied). Quantizable form: ``MatMul`` per chunk on its
        transposed copy; each head chunk records the embedding chunk it is tied to
        (``memo['tied_head']``: head initializer -> embedding initializer) so that, once quantized, the
        embedding can read the head's MatMulNBits tensors instead of keeping a float table."""
        if not self.matmul_form:
            return self.gemm_rows(x, self.weight_rows(tensor, name), bias)
        embedding = self._by_identity.get(self._rows_key(tensor))  # the tied embedding's chunks, if any
        chunks = embedding or [(None, start, n) for start, n in self._row_bounds(tensor)]
        tied = self.memo.setdefault("tied_head", {})
        outs = []
        for init, start, n in chunks:
            part = tensor[start:start + n] if len(chunks) > 1 else tensor
            y = self.matmul_t(x, part, f"{name}.rows{start}" if len(chunks) > 1 else name)
            if init is not None:
                tied[self.nodes[-1].input[1]] = init
            outs.append(y)
        y = outs[0] if len(outs) == 1 else self.op("Concat", outs, axis=1)
        return y if bias is None else self.op("Add", [y, bias])

    def const(self, value, dtype=None) -> str:
        """A small constant (shape vectors, scalars), deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add_initializer(f"const_{len(self._consts)}", arr, tag="const")
        return self._consts[key]

    def fconst(self, value) -> str:
        """A float scalar in the graph's compute dtype."""
        return self.const(np.asarray(value, dtype=self.np_float))

    def i64(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    # ------------------------------------------------------------------ common patterns
    def reduce_mean(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.i64(axes)], keepdims=keepdims)
        return self.op("ReduceMean", [x], axes=axes, keepdims=keepdims)

    def reduce_sum(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        return self.op("ReduceSum", [x, self.i64(axes)], keepdims=keepdims)  # axes input since opset 13

    def cast(self, x: str, elem_type: int) -> str:
        return self.op("Cast", [x], to=elem_type)

    def to_fp32(self, x: str) -> str:
        return x if self.float_type == TensorProto.FLOAT else self.cast(x, TensorProto.FLOAT)

    def from_fp32(self, x: str) -> str:
        return x if self.float_type == TensorProto.FLOAT else self.cast(x, self.float_type)

    def gemm(self, x: str, w: str, bias: str | None = None, trans_b: int = 1) -> str:
        """x [N, K] times an initializer in its stored layout: Gemm(transB=1) for [out, in] weights."""
        return self.op("Gemm", [x, w] + ([bias] if bias else []), transB=trans_b)

    # ------------------------------------------------------------------ graph I/O and model
    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(IOInfo(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        """Make ``value`` the graph output ``name``. The node producing ``value`` writes the output directly
        (its output is renamed when the model is made, see ``_bind_outputs``): no ``Identity`` copy, which
        for the KV cache (``present.*``) would copy every cache once more per step."""
        self._output_values.append((value, name))
        self.outputs.append(IOInfo(name, elem_type, shape))

    def _bind_outputs(self) -> list:
        """The graph's nodes with every output value renamed to its output name (consumers follow). An
        ``Identity`` stays only where a rename is impossible: the value is a graph input or an initializer
        (no node produces it), or it is already another output or is produced twice."""
        producers = collections.Counter(out for node in self.nodes for out in node.output)
        rename: dict[str, str] = {}
        extra = []
        for value, name in self._output_values:
            if value == name:
                continue
            if producers[value] == 1 and value not in rename and name not in producers:
                rename[value] = name
            else:
                extra.append(helper.make_node("Identity", [rename.get(value, value)], [name], name=f"/output/{name}"))
        nodes = []
        for node in self.nodes:
            if any(x in rename for x in (*node.input, *node.output)):
                node = copy.deepcopy(node)
                node.input[:] = [rename.get(x, x) for x in node.input]
                node.output[:] = [rename.get(x, x) for x in node.output]
            nodes.append(node)
        return nodes + extra

    def make_model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        def vi(io: IOInfo):
            return helper.make_tensor_value_info(io.name, io.elem_type, io.shape)

        graph = helper.make_graph(self._bind_outputs(), graph_name, [vi(i) for i in self.inputs], [vi(o) for o in self.outputs],
                                  list(self.initializers.values()))
        opsets = [helper.make_opsetid("", self.opset)]
        functions = []
        if self.uses_sparse_op or self.uses_qsparse_op:
            opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        if self.uses_sparse_op:
            functions.append(sparse_matmul_function(self.float_type, self.opset))
        if self.uses_qsparse_op:
            functions.append(qsparse_matmul_function(self.opset))
        model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="fips-rt",
                                  producer_version=__import__("fips_rt").__version__, doc_string=doc)
        model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.15
        return model
