"""Graph pieces shared by the hand-built graphs: linears (dense, FiPS, DeltaLLM), MLPs, norms, attention.

Activations inside a block are 2-D ``[N, d]`` (N = batch x sequence), so every linear is one ``Gemm``
(or ``MatMul``) on the weight's stored layout: no ``Transpose`` of an initializer is ever emitted
(onnxruntime would fold it into a second, transposed copy of the weight).

The FiPS MLP (gated: Llama, Qwen2, Gemma-2; ``fc1``/``fc2`` MLPs have no gate)::

                      U [d, r] (one initializer per group, shared by every layer of the group)
                        │
      x [N, d] ──MatMul─┴──► t [N, r]           (computed once, shared by gate and up)
                               │
              ┌────────────────┴────────────────┐
              ▼                                 ▼
      fips.SparseMatMul(transB=0)       fips.SparseMatMul(transB=0)
      (t, V_gate.values, V_gate.mask)   (t, V_up.values, V_up.mask)
              │ [N, d_ff]                       │ [N, d_ff]
              ▼                                 │
            act() ──────────────► Mul ◄─────────┘
                                   │ h [N, d_ff]
                                   ▼
                      fips.SparseMatMul(transB=1)  (h, V_down.values, V_down.mask)
                                   │ [N, r]
                                   ▼
                      Gemm(transB=1) with U  ──► y [N, d]   (U in its stored layout)
                                   │
                              (+ bias: Add, BERT/ViT only)

Quantized exports use fips.QSparseMatMul in the same places; with int8 VNNI factors (``stores_transposed``) gate
and up are written as Vᵀ [d_ff, r] behind transB=1, stacked in one node [2 d_ff, r] followed by a Split
(``_fused_gate_up``; docs/sparse-op.md, "Layout of the r -> d_ff factors").

DeltaLLM linear: ``Gemm(x, W_shared, transB=1)`` (W_shared one initializer used by several layers)
``+ Gemm(Gemm(x, B, transB=1), A, transB=1)`` (the low-rank delta as two matrix products).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from fips_rt.errors import FipsError
from fips_rt.modules import DeltaLinear, FipsLinear

from .builder import GraphBuilder

NEG_INF_FP32 = float(np.finfo(np.float32).min)


# ---------------------------------------------------------------------- linears
def used_rank(model) -> dict[int, np.ndarray]:
    """Per shared basis (keyed by ``id(basis.weight)``): the basis directions some layer still uses.

    Direction k of U is dead when row k of every V built on U was pruned away entirely: then x·U[:, k]
    only ever meets zeros. Magnitude pruning of a whitened SVD init empties the weakest directions
    wholesale (SmolLM2 at --mlp-budget 0.5: ~640 of 1024 rows used per group), so the exporter keeps
    only the used ones -- the same function, a smaller U, shorter V's, fewer products.
    """
    used: dict[int, np.ndarray] = {}
    for m in model.modules():
        if isinstance(m, FipsLinear):
            rows = m.mask.detach().cpu().numpy().any(axis=1)
            key = id(m.basis.weight)
            used[key] = rows if key not in used else (used[key] | rows)
    # an all-pruned basis keeps one direction: no zero-sized tensors in the graph
    return {k: np.flatnonzero(v) if v.any() else np.array([0]) for k, v in used.items()}


def plan_fips(b: GraphBuilder, model, *, balance: bool = False) -> None:
    """Call once before building a graph with FiPS layers: records the used basis directions and, with
    ``balance`` (8-bit basis products), the exact per-direction rescaling of exporter/balance.py."""
    b.memo["basis_keep"] = used_rank(model)
    if balance:
        from .balance import basis_scales
        b.memo["basis_scale"] = basis_scales(model)


def _scale(b: GraphBuilder, basis, keep: np.ndarray | None) -> np.ndarray | None:
    """The balance factors of ``basis`` restricted to its used directions (None: no rescaling)."""
    s = b.memo.get("basis_scale", {}).get(id(basis.weight))
    if s is None:
        return None
    return (s if keep is None else s[keep]).astype(np.float32)


def _keep(b: GraphBuilder, basis) -> np.ndarray | None:
    """Indices of the used directions of ``basis``, or None when all are used (or no plan was made)."""
    keep = b.memo.get("basis_keep", {}).get(id(basis.weight))
    if keep is None or len(keep) == basis.weight.shape[1]:
        return None
    return keep


def _basis_name(b: GraphBuilder, basis) -> str:
    names = b.memo.setdefault("basis_names", {})
    key = id(basis.weight)
    if key not in names:
        keep = _keep(b, basis)
        s = _scale(b, basis, keep)
        # the trimmed U goes in as a numpy array: GraphBuilder.weight deduplicates torch tensors by data
        # pointer, and a temporary tensor's memory can be reused by the next one
        U = basis.weight if keep is None and s is None else basis.weight.detach().float().cpu().numpy()
        if keep is not None:
            U = U[:, keep]
        if s is not None:
            U = U * s[None, :]
        if not hasattr(U, "detach"):
            U = np.ascontiguousarray(U, dtype=np.float32)
        name = f"fips.basis.{len(names)}"
        if b.matmul_form:  # keep the float U for the transposed copy of t·Uᵀ
            b.memo.setdefault("basis_orig", {})[key] = (U.detach().float().cpu().numpy() if hasattr(U, "detach")
                                                        else np.asarray(U, np.float32))
        names[key] = b.weight(U, name, tag="mlp")
    return names[key]


def _packed(b: GraphBuilder, m: FipsLinear) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, mask bytes, rows, cols) of V restricted to the used directions of its basis."""
    keep = _keep(b, m.basis)
    s = _scale(b, m.basis, keep)
    if keep is None and s is None:
        values, mask = m.packed()
        r, c = m.V.shape
        return values, mask, r, c
    from fips_rt.sparse_format import pack
    V, M = m.V.detach().float().cpu().numpy(), m.mask.cpu().numpy()
    if keep is not None:
        V, M = V[keep], M[keep]
    if s is not None:
        V = V / s[:, None]
    values, mask = pack(np.ascontiguousarray(V, dtype=np.float32), M)
    return values, mask, V.shape[0], V.shape[1]


def _basis_product(b: GraphBuilder, basis, x: str) -> str:
    """t = x · U, computed once per (input, basis)."""
    memo = b.memo.setdefault("xU", {})
    key = (x, id(basis.weight))
    if key not in memo:
        memo[key] = b.op("MatMul", [x, _basis_name(b, basis)])
        b.basis_nodes.add(memo[key].rsplit("_out", 1)[0])
    return memo[key]


def _basis_t_product(b: GraphBuilder, basis, t: str) -> str:
    """y = t · U^T. Float form: Gemm(transB=1) on U as stored. Quantizable form: MatMul on a second,
    transposed copy of U ([r, d]): MatMulNBits blocks run along K, which is d for x·U and r here, so the
    two products need two quantized layouts of U (int8: together half of one fp32 U)."""
    if not b.matmul_form or b.basis_float:
        y = b.gemm(t, _basis_name(b, basis))
        b.basis_nodes.add(y.rsplit("_out", 1)[0])
        return y
    names = b.memo.setdefault("basis_t_names", {})
    key = id(basis.weight)
    if key not in names:
        u = _basis_name(b, basis)
        U = b.memo["basis_orig"][key]
        names[key] = b.weight(np.ascontiguousarray(U.T), f"{u}.T", tag="mlp")
    y = b.op("MatMul", [t, names[key]])
    b.basis_nodes.add(y.rsplit("_out", 1)[0])
    return y


def _bias(b: GraphBuilder, y: str, module, path: str) -> str:
    if getattr(module, "bias", None) is None:
        return y
    return b.op("Add", [y, b.weight(module.bias, f"{path}.bias")])


def fips_linear(b: GraphBuilder, m: FipsLinear, x: str, path: str) -> str:
    values, mask, r, d_ff = _packed(b, m)
    if b.sparse_bits:  # fips.QSparseMatMul: V's kept values quantized (exporter/sparse_op.quantize_sparse)
        from .sparse_op import DEFAULT_GROUP_SIZE, quantize_sparse, stores_transposed
        group = DEFAULT_GROUP_SIZE[b.sparse_bits] if b.sparse_group_size is None else b.sparse_group_size
        values = np.ascontiguousarray(values, dtype=np.float32)
        if m.orientation == "in" and stores_transposed(b.sparse_bits, group, b.sparse_activation_bits, r):
            from fips_rt.sparse_format import transpose_packed
            vt, mt = transpose_packed(values, mask, (r, d_ff))
            q = quantize_sparse(vt, mt, d_ff, r, b.sparse_bits, group)
            return _bias(b, b.qsparse_matmul(_basis_product(b, m.basis, x), q, 1, path), m, path)
        q = quantize_sparse(values, mask, r, d_ff, b.sparse_bits, group)
        if m.orientation == "in":
            y = b.qsparse_matmul(_basis_product(b, m.basis, x), q, 0, path)
        else:
            y = _basis_t_product(b, m.basis, b.qsparse_matmul(x, q, 1, path))
        return _bias(b, y, m, path)
    v = b.weight(values, f"{path}.values")
    k = b.weight(mask, f"{path}.mask")
    if m.orientation == "in":
        y = b.sparse_matmul(_basis_product(b, m.basis, x), v, k, r, d_ff, 0)
    else:
        t = b.sparse_matmul(x, v, k, r, d_ff, 1)
        y = _basis_t_product(b, m.basis, t)  # t [N, r] · U^T, U [d, r] as stored
    return _bias(b, y, m, path)


def delta_linear(b: GraphBuilder, m: DeltaLinear, x: str, path: str) -> str:
    names = b.memo.setdefault("delta_shared", {})
    low = None if m.rank == 0 else b.linear_weight(b.linear_weight(x, m.B, f"{path}.B"), m.A, f"{path}.A")
    if m.scale == 0.0 and low is not None:  # anchor_scale="fit" came out 0: the shared product is skipped
        return _bias(b, low, m, path)
    if id(m.shared) not in names:
        names[id(m.shared)] = f"delta.shared.{len(names)}"
    base = b.linear_weight(x, m.shared, names[id(m.shared)])  # one initializer per shared tensor (by identity)
    if m.scale != 1.0:  # W_f = s W_a + A B
        base = b.op("Mul", [base, b.fconst(m.scale)])
    if low is None:  # an anchor block: the shared weight alone
        return _bias(b, base, m, path)
    return _bias(b, b.op("Add", [base, low]), m, path)


def linear(b: GraphBuilder, module, x: str, path: str) -> str:
    """Any supported linear on a 2-D input [N, in] -> [N, out]."""
    import torch.nn as nn
    if isinstance(module, FipsLinear):
        return fips_linear(b, module, x, path)
    if isinstance(module, DeltaLinear):
        return delta_linear(b, module, x, path)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else b.weight(module.bias, f"{path}.bias")
        return b.linear_weight(x, module.weight, f"{path}.weight", bias)
    raise FipsError(f"Cannot export {type(module).__name__} at {path}: expected Linear, FipsLinear or DeltaLinear.")


# ---------------------------------------------------------------------- activations and MLPs
def activation(b: GraphBuilder, x: str, name: str) -> str:
    name = name.lower()
    if name in ("silu", "swish"):
        return b.op("Mul", [x, b.op("Sigmoid", [x])])
    if name in ("gelu", "gelu_python"):  # exact (erf)
        e = b.op("Erf", [b.op("Mul", [x, b.fconst(1.0 / math.sqrt(2.0))])])
        return b.op("Mul", [b.op("Mul", [x, b.fconst(0.5)]), b.op("Add", [e, b.fconst(1.0)])])
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
        x3 = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [x3, b.fconst(0.044715)])]), b.fconst(math.sqrt(2.0 / math.pi))])
        return b.op("Mul", [b.op("Mul", [x, b.fconst(0.5)]), b.op("Add", [b.op("Tanh", [inner]), b.fconst(1.0)])])
    if name == "relu":
        return b.op("Relu", [x])
    raise FipsError(f"Activation {name!r} is not supported by the exporter.")


def _fused_gate_up(b: GraphBuilder, mlp, x: str, path: str) -> tuple[str, str] | None:
    """gate and up of a quantized FiPS MLP as one ``fips.QSparseMatMul`` over [Vᵀ_gate; Vᵀ_up] [2 d_ff, r]
    and a ``Split``, when both are r -> d_ff factors on one basis stored as Vᵀ (``stores_transposed``).
    Per-row scales make the codes and scales those of the two factors quantized apart: the same function,
    with one activation quantization and one kernel call per layer instead of two (decode runs 90
    QSparseMatMul nodes a token on the SmolLM2 demo unfused, 62 fused: its last group has r = 542). None
    where the rule does not apply."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if not (b.sparse_bits and isinstance(gate, FipsLinear) and isinstance(up, FipsLinear)
            and gate.basis is up.basis and gate.orientation == up.orientation == "in"
            and getattr(gate, "bias", None) is None and getattr(up, "bias", None) is None):
        return None
    from fips_rt.sparse_format import pack, unpack, unpack_mask

    from .sparse_op import DEFAULT_GROUP_SIZE, quantize_sparse, stores_transposed
    group = DEFAULT_GROUP_SIZE[b.sparse_bits] if b.sparse_group_size is None else b.sparse_group_size
    keep = _keep(b, gate.basis)
    r = gate.V.shape[0] if keep is None else len(keep)  # the used rank, as _packed trims it
    d_ff = gate.V.shape[1]
    if tuple(up.V.shape) != tuple(gate.V.shape) or not stores_transposed(b.sparse_bits, group,
                                                                          b.sparse_activation_bits, r):
        return None  # (checked before packing: the fallback packs each factor itself)
    (vg, mg, *_), (vu, mu, *_) = _packed(b, gate), _packed(b, up)
    dense = np.concatenate([unpack(np.asarray(v, np.float32), k, (r, d_ff)).T for v, k in ((vg, mg), (vu, mu))])
    keep = np.concatenate([unpack_mask(k, (r, d_ff)).T for k in (mg, mu)])
    values, mask = pack(np.ascontiguousarray(dense), np.ascontiguousarray(keep))
    q = quantize_sparse(np.ascontiguousarray(values, np.float32), mask, 2 * d_ff, r, b.sparse_bits, group)
    y = b.qsparse_matmul(_basis_product(b, gate.basis, x), q, 1, f"{path}.gate_up_proj")
    g, u = b.op("Split", [y, b.i64([d_ff, d_ff])], 2, axis=1)
    return g, u


def gated_mlp(b: GraphBuilder, mlp, x: str, path: str, act: str) -> str:
    """down(act(gate(x)) * up(x)); gate and up share x·U when they share a basis (and one quantized sparse
    node where ``_fused_gate_up`` applies)."""
    with b.scope(path, tag="mlp"):
        fused = _fused_gate_up(b, mlp, x, path)
        if fused is not None:
            g, u = fused
        else:
            g = linear(b, mlp.gate_proj, x, f"{path}.gate_proj")
            u = linear(b, mlp.up_proj, x, f"{path}.up_proj")
        h = b.op("Mul", [activation(b, g, act), u])
        return linear(b, mlp.down_proj, h, f"{path}.down_proj")


def fc_mlp(b: GraphBuilder, fc1, fc2, x: str, path1: str, path2: str, act: str) -> str:
    with b.scope(path1, tag="mlp"):
        h = activation(b, linear(b, fc1, x, path1), act)
        return linear(b, fc2, h, path2)


# ---------------------------------------------------------------------- norms
def rms_norm(b: GraphBuilder, x: str, weight, eps: float, path: str, *, offset_one: bool = False) -> str:
    """RMSNorm computed in fp32. Llama: w * norm(x).to(dtype); Gemma: (norm(x) * (1 + w)).to(dtype)."""
    # Pow → ReduceMean → Add → Sqrt → Div: the pattern onnxruntime fuses into SimplifiedLayerNormalization
    x32 = b.to_fp32(x)
    var = b.reduce_mean(b.op("Pow", [x32, b.const(np.float32(2.0))]), [-1])
    y = b.op("Div", [x32, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps))])])])
    if offset_one:
        w = b.weight(weight, f"{path}.weight", dtype="fp32", transform=_one_plus)
        return b.from_fp32(b.op("Mul", [y, w]))
    return b.op("Mul", [b.from_fp32(y), b.weight(weight, f"{path}.weight")])


def _one_plus(a: np.ndarray) -> np.ndarray:
    return (np.float32(1.0) + a.astype(np.float32)).astype(np.float32)


def layer_norm(b: GraphBuilder, x: str, module, path: str) -> str:
    """nn.LayerNorm over the last axis, computed in fp32 (weights stored fp32)."""
    w = b.weight(module.weight, f"{path}.weight", dtype="fp32")
    bias = b.weight(module.bias, f"{path}.bias", dtype="fp32")
    y = b.op("LayerNormalization", [b.to_fp32(x), w, bias], axis=-1, epsilon=float(module.eps))
    return b.from_fp32(y)


# ---------------------------------------------------------------------- attention
def attention(b: GraphBuilder, q: str, k: str, v: str, allowed: str, *, n_heads: int, n_kv: int, head_dim: int,
              scaling: float, softcap: float | None = None) -> str:
    """Scaled dot-product attention on q [B, H, S, hd], k/v [B, KV, T, hd]; ``allowed`` bool [B, 1, S, T].

    Grouped-query attention without repeating K/V: q is viewed as [B, KV, H/KV, S, hd] and MatMul
    broadcasts over the group axis. Scores are masked and soft-maxed in fp32. Returns [B, H, S, hd].
    """
    rep = n_heads // n_kv
    bias = _mask_bias(b, allowed, grouped=rep > 1)
    if rep > 1:
        q = b.op("Reshape", [q, b.i64([0, n_kv, rep, -1, head_dim])])
        k = b.op("Unsqueeze", [k, b.i64([2])])
        v = b.op("Unsqueeze", [v, b.i64([2])])
        perm = [0, 1, 2, 4, 3]
    else:
        perm = [0, 1, 3, 2]
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=perm)]), b.fconst(scaling)])
    if softcap:
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, b.fconst(softcap)])]), b.fconst(softcap)])
    # masked scores: + the most negative float. An Add that broadcasts over the heads is much cheaper in
    # onnxruntime than a Where per layer (SmolLM2, 512-token prefill, 2 threads: 821 -> 720 ms dense)
    scores = b.op("Add", [b.to_fp32(scores), bias])
    probs = b.from_fp32(b.op("Softmax", [scores], axis=-1))
    out = b.op("MatMul", [probs, v])
    if rep > 1:
        out = b.op("Reshape", [out, b.i64([0, n_heads, -1, head_dim])])
    return out


def _mask_bias(b: GraphBuilder, allowed: str, *, grouped: bool) -> str:
    """fp32 0 / most-negative-float of the bool mask ``allowed`` [B, 1, S, T] (with an extra group axis
    [B, 1, 1, S, T] when ``grouped``), built once per mask and shared by every layer."""
    memo = b.memo.setdefault("mask_bias", {})
    key = (allowed, grouped)
    if key not in memo:
        a = b.op("Unsqueeze", [allowed, b.i64([2])]) if grouped else allowed
        memo[key] = b.op("Where", [a, b.const(np.float32(0.0)), b.const(np.float32(NEG_INF_FP32))])
    return memo[key]


def split_heads(b: GraphBuilder, x: str, bs_shape: str, n: int, head_dim: int) -> str:
    """[N, n*hd] -> [B, n, S, hd] given ``bs_shape`` = [B, S]."""
    shapes = b.memo.setdefault("head_shapes", {})
    if (bs_shape, n, head_dim) not in shapes:
        shapes[(bs_shape, n, head_dim)] = b.op("Concat", [bs_shape, b.i64([n, head_dim])], axis=0)
    return b.op("Transpose", [b.op("Reshape", [x, shapes[(bs_shape, n, head_dim)]])], perm=[0, 2, 1, 3])


def merge_heads(b: GraphBuilder, x: str, n: int, head_dim: int) -> str:
    """[B, n, S, hd] -> [N, n*hd]."""
    return b.op("Reshape", [b.op("Transpose", [x], perm=[0, 2, 1, 3]), b.i64([-1, n * head_dim])])


def cast_bool(b: GraphBuilder, x: str) -> str:
    return b.cast(x, TensorProto.BOOL)
