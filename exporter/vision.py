"""timm vision models (ViT, DeiT, Swin, ...) through torch.onnx.export (TorchScript), with our linears lowered.

timm's graphs (patch embedding, shifted windows, relative position bias) are traced as they are;
every linear is swapped, for the time of the export, for a module whose ``torch.autograd.Function``
has a ``symbolic`` that emits exactly what a hand-built graph would:

- ``nn.Linear`` and DeltaLLM products: ``Reshape(-1, K) → Gemm(W, bias, transB=1) → Reshape`` on the
  weight's stored layout (a traced ``x @ W.T`` would put a ``Transpose`` on the initializer, which
  constant folding turns into a transposed copy, one per use of a shared matrix);
- FiPS: ``MatMul(x, U)`` + ``fips.SparseMatMul`` (gate/fc1) and ``fips.SparseMatMul(transB=1)`` +
  Gemm with U (fc2), the values and packed mask as initializers; U is a Parameter shared by the
  swapped modules, so the tracer keeps it once.

Output: ``pixel_values`` [batch, 3, H, W] -> ``logits`` [batch, classes] (dynamic batch only; H, W are the
model's). The model's modules are restored after the export.
"""
from __future__ import annotations

import contextlib
import warnings

import onnx

from fips_rt.adapters import set_submodule
from fips_rt.modules import DeltaLinear, FipsLinear

from .sparse_op import DOMAIN, DOMAIN_VERSION, OP_TYPE, sparse_matmul_function


def _functions():
    import torch

    class SparseMatMulFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, values, mask, rows: int, cols: int, trans_b: int):
            shifts = torch.arange(8, dtype=torch.uint8)
            bits = ((mask.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: rows * cols].bool()
            dense = torch.zeros(rows * cols, dtype=values.dtype)
            dense[bits] = values
            dense = dense.view(rows, cols)
            return a @ (dense.T if trans_b else dense)

        @staticmethod
        def symbolic(g, a, values, mask, rows, cols, trans_b):
            return g.op(f"{DOMAIN}::{OP_TYPE}", a, values, mask, rows_i=rows, cols_i=cols, transB_i=trans_b)

    class GemmStoredFn(torch.autograd.Function):
        """y = x @ W^T (+ b), W [out, in] used in its stored layout."""

        @staticmethod
        def forward(ctx, x, w, bias, in_features: int, out_features: int):
            return torch.nn.functional.linear(x, w, bias)

        @staticmethod
        def symbolic(g, x, w, bias, in_features, out_features):
            x2 = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([-1, in_features], dtype=torch.int64)))
            ins = [x2, w] if bias is None or _is_none(bias) else [x2, w, bias]
            y2 = g.op("Gemm", *ins, transB_i=1)
            lead = g.op("Shape", x, end_i=-1)
            shape = g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([out_features], dtype=torch.int64)),
                         axis_i=0)
            return g.op("Reshape", y2, shape)

    return SparseMatMulFn, GemmStoredFn


def _is_none(v) -> bool:
    try:
        return v.node().mustBeNone()
    except Exception:  # noqa: BLE001
        return False


def _wrappers(dtype):
    import torch
    from torch import nn

    SparseMatMulFn, GemmStoredFn = _functions()

    class LinearOut(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.weight, self.bias = lin.weight, lin.bias
            self.dims = (lin.in_features, lin.out_features)

        def forward(self, x):
            return GemmStoredFn.apply(x, self.weight, self.bias, *self.dims)

    class FipsOut(nn.Module):
        def __init__(self, m: FipsLinear):
            super().__init__()
            values, mask = m.packed()
            self.basis = m.basis  # shared module: its weight is traced once
            self.values = nn.Parameter(torch.from_numpy(values).to(dtype), requires_grad=False)
            self.register_buffer("mask", torch.from_numpy(mask))
            self.bias = m.bias
            self.orientation = m.orientation
            self.rows, self.cols = m.V.shape
            self.d = m.basis.weight.shape[0]

        def forward(self, x):
            U = self.basis.weight
            if self.orientation == "in":
                y = SparseMatMulFn.apply(x @ U, self.values, self.mask, self.rows, self.cols, 0)
            else:
                t = SparseMatMulFn.apply(x, self.values, self.mask, self.rows, self.cols, 1)
                y = GemmStoredFn.apply(t, U, None, self.rows, self.d)  # t·U^T, U [d, r] as stored
            return y if self.bias is None else y + self.bias

    class DeltaOut(nn.Module):
        def __init__(self, m: DeltaLinear):
            super().__init__()
            self.shared, self.A, self.B, self.bias = m.shared, m.A, m.B, m.bias
            self.scale = float(m.scale)
            self.dims = (int(m.shared.shape[0]), int(m.shared.shape[1]), int(m.A.shape[1]))  # python ints

        def forward(self, x):
            out_f, in_f, r = self.dims
            low = GemmStoredFn.apply(GemmStoredFn.apply(x, self.B, None, in_f, r), self.A, None, r, out_f)
            if self.scale == 0.0:
                y = low
            else:
                base = GemmStoredFn.apply(x, self.shared, None, in_f, out_f)
                y = (base if self.scale == 1.0 else base * self.scale) + low
            return y if self.bias is None else y + self.bias

    return LinearOut, FipsOut, DeltaOut


@contextlib.contextmanager
def _lowered(model, dtype):
    """Swap every linear for its export form; restore the originals afterwards."""
    from torch import nn
    LinearOut, FipsOut, DeltaOut = _wrappers(dtype)
    swapped = [(path, mod) for path, mod in model.named_modules()
               if path and (isinstance(mod, (FipsLinear, DeltaLinear)) or type(mod) is nn.Linear)]
    for path, mod in swapped:
        new = FipsOut(mod) if isinstance(mod, FipsLinear) else DeltaOut(mod) if isinstance(mod, DeltaLinear) \
            else LinearOut(mod)
        set_submodule(model, path, new)
    try:
        yield
    finally:
        for path, mod in swapped:
            set_submodule(model, path, mod)


def export_timm(model, path: str, *, dtype: str, opset: int, image_size: list[int]) -> onnx.ModelProto:
    """Trace ``model`` to ``path`` (a scratch file) and return the post-processed ModelProto."""
    import torch
    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    orig_dtype = next(model.parameters()).dtype
    x = torch.randn(2, *image_size, dtype=tdtype)
    try:
        model.to(tdtype)
        with _lowered(model, tdtype), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["pixel_values"], output_names=["logits"],
                              opset_version=opset, dynamic_axes={"pixel_values": {0: "batch_size"},
                                                                 "logits": {0: "batch_size"}},
                              custom_opsets={DOMAIN: DOMAIN_VERSION}, do_constant_folding=True,
                              external_data=False)
    finally:
        model.to(orig_dtype)
    proto = onnx.load(path)
    _postprocess(proto, model, dtype, opset)
    return proto


def _postprocess(proto: onnx.ModelProto, model, dtype: str, opset: int) -> None:
    """Add the SparseMatMul function, name the bases ``fips.basis.<i>``, drop unused initializers."""
    from onnx import TensorProto
    graph = proto.graph
    if any(n.domain == DOMAIN for n in graph.node):
        elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
        proto.functions.append(sparse_matmul_function(elem, opset))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    # rename each basis (traced under the name of its first user) to fips.basis.<i>
    renames: dict[str, str] = {}
    seen: dict[int, str] = {}
    for mpath, mod in model.named_modules():
        if isinstance(mod, FipsLinear) and id(mod.basis.weight) not in seen:
            seen[id(mod.basis.weight)] = f"fips.basis.{len(seen)}"
            renames[f"{mpath}.basis.weight"] = seen[id(mod.basis.weight)]
    if renames:
        for init in graph.initializer:
            if init.name in renames:
                init.name = renames[init.name]
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    proto.producer_name = "fips-rt"
    proto.producer_version = __import__("fips_rt").__version__
    proto.ir_version = min(proto.ir_version, 9)
