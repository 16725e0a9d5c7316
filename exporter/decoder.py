"""Hand-built decoder graph with a KV cache (Llama, Qwen2, Mistral, SmolLM; Gemma-2), names as Optimum.

Inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq] (1 = token, 0 = padding),
``position_ids`` [batch, seq], ``past_key_values.N.key|value`` [batch, kv_heads, past, head_dim].
Outputs: ``logits`` [batch, seq | 1, vocab], ``present.N.key|value`` [batch, kv_heads, past+seq, head_dim].

The graph is written from the weights with ``onnx.helper`` (the layout of every initializer is
ours: one tied embedding used by Gather and by the LM head's Gemm, one U per FiPS group...)::

    input_ids ─Gather(embed)─(×sqrt(d): Gemma)─► h [N, d]        position_ids ─► cos, sin [B,1,S,hd]
                                                                   attention_mask ─► allowed [B,1,S,T]
    per layer:   h ─RMSNorm─► q,k,v (Gemm) ─RoPE─► Concat(past) ─► present
                                  └─► softmax(q·kᵀ·scale (softcap) | allowed) · v ─► o_proj ─(Gemma: norm)─► +h
                 h ─RMSNorm─► MLP (dense / FiPS / DeltaLLM, see layers.py) ─(Gemma: norm)─► +h
    final:       h ─RMSNorm─(last position only?)─► Gemm(lm_head or embed, transB=1) ─(softcap)─► logits

The mask follows transformers' semantics in cache coordinates: query i (absolute index past+i) sees
key j iff j <= past+i, attention_mask[b, j] = 1, and, on sliding-window layers, past+i - j < window.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fips_rt.errors import FipsError

from .builder import GraphBuilder
from .layers import attention, gated_mlp, linear, merge_heads, rms_norm, split_heads

INT64_MAX = np.iinfo(np.int64).max


def decoder_dims(config) -> dict:
    heads = config.num_attention_heads
    return {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
    }


def layer_windows(config) -> list[int | None]:
    """Sliding window of each layer (None: full attention), as transformers applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    if config.model_type == "mistral":
        return [window] * n
    return [None] * n


def _rotary(b: GraphBuilder, model, position_ids: str) -> tuple[str, str]:
    rot = model.model.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise FipsError(f"RoPE type {rope_type!r} depends on the sequence length at run time; the exporter "
                        f"supports position-independent RoPE types (default, linear, llama3, yarn).")
    inv_freq = rot.inv_freq.detach().float().cpu().numpy()
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    with b.scope("rotary", tag="rotary"):
        pos = b.op("Unsqueeze", [b.cast(position_ids, TensorProto.FLOAT), b.i64([-1])])  # [B, S, 1]
        freqs = b.op("Mul", [pos, b.weight(inv_freq.astype(np.float32), "rotary.inv_freq", dtype="fp32")])
        emb = b.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = b.op(fn, [emb])
            if scaling != 1.0:
                t = b.op("Mul", [t, b.const(np.float32(scaling))])
            out.append(b.from_fp32(b.op("Unsqueeze", [t, b.i64([1])])))  # [B, 1, S, hd]
    return out[0], out[1]


def _apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    x1 = b.op("Slice", [x, b.i64([0]), b.i64([half]), b.i64([-1])])
    x2 = b.op("Slice", [x, b.i64([half]), b.i64([head_dim]), b.i64([-1])])
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])


def _masks(b: GraphBuilder, attention_mask: str, bs_shape: str, windows: list[int | None]) -> dict:
    """allowed[window] = bool [B, 1, S, T] for each distinct window (None = causal only)."""
    with b.scope("mask", tag="mask"):
        seq = b.op("Slice", [bs_shape, b.i64([1]), b.i64([2])])  # [1]
        total = b.op("Shape", [attention_mask], start=1)  # [1]
        past = b.op("Sub", [total, seq])
        scalar = b.i64([])  # empty shape: reshape [1] -> scalar
        q_pos = b.op("Range", [b.op("Reshape", [past, scalar]), b.op("Reshape", [total, scalar]), b.const(np.int64(1))])
        k_pos = b.op("Range", [b.const(np.int64(0)), b.op("Reshape", [total, scalar]), b.const(np.int64(1))])
        q_col = b.op("Unsqueeze", [q_pos, b.i64([1])])  # [S, 1]
        k_row = b.op("Unsqueeze", [k_pos, b.i64([0])])  # [1, T]
        causal = b.op("LessOrEqual", [k_row, q_col])  # [S, T]
        pad = b.op("Unsqueeze", [b.cast(attention_mask, TensorProto.BOOL), b.i64([1, 2])])  # [B, 1, 1, T]
        out = {}
        for w in sorted(set(windows), key=lambda v: -1 if v is None else v):
            allowed = causal
            if w is not None:
                in_window = b.op("Less", [b.op("Sub", [q_col, k_row]), b.const(np.int64(w))])
                allowed = b.op("And", [causal, in_window])
            out[w] = b.op("And", [b.op("Unsqueeze", [allowed, b.i64([0, 1])]), pad])
    return out


def build_causal_lm(b: GraphBuilder, model, *, family: str, last_logits_only: bool) -> None:
    """Emit the whole decoder into ``b`` (inputs, nodes, initializers, outputs)."""
    cfg = model.config
    dims = decoder_dims(cfg)
    d, n_heads, n_kv, hd = dims["hidden_size"], dims["num_attention_heads"], dims["num_kv_heads"], dims["head_dim"]
    gemma = family == "gemma2"
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    windows = layer_windows(cfg)
    if gemma:
        scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        final_cap = getattr(cfg, "final_logit_softcapping", None)
    else:
        scaling, attn_cap, final_cap = hd ** -0.5, None, None
    ft = b.float_type

    input_ids = b.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    attention_mask = b.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    position_ids = b.add_input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    past = []
    for i in range(dims["num_layers"]):
        past.append((b.add_input(f"past_key_values.{i}.key", ft, ["batch_size", n_kv, "past_sequence_length", hd]),
                     b.add_input(f"past_key_values.{i}.value", ft, ["batch_size", n_kv, "past_sequence_length", hd])))

    bs_shape = b.op("Shape", [input_ids])  # [B, S]
    embed = model.model.embed_tokens
    with b.scope("model.embed_tokens", tag="embedding"):
        table = b.weight_rows(embed.weight, "model.embed_tokens.weight")  # row chunks when large
        h = b.op("Reshape", [b.gather_rows(table, input_ids), b.i64([-1, d])])  # [N, d]
        if gemma:
            scale = float(getattr(embed, "scalar_embed_scale", d ** 0.5))
            h = b.op("Mul", [h, b.fconst(scale)])
    cos, sin = _rotary(b, model, position_ids)
    allowed = _masks(b, attention_mask, bs_shape, windows)

    presents = []
    for i, layer in enumerate(model.model.layers):
        path = f"model.layers.{i}"
        attn = layer.self_attn
        with b.scope(path, tag="attention"):
            x = rms_norm(b, h, layer.input_layernorm.weight, eps, f"{path}.input_layernorm", offset_one=gemma)
            q = split_heads(b, linear(b, attn.q_proj, x, f"{path}.self_attn.q_proj"), bs_shape, n_heads, hd)
            k = split_heads(b, linear(b, attn.k_proj, x, f"{path}.self_attn.k_proj"), bs_shape, n_kv, hd)
            v = split_heads(b, linear(b, attn.v_proj, x, f"{path}.self_attn.v_proj"), bs_shape, n_kv, hd)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm of q and k
                q = rms_norm(b, q, attn.q_norm.weight, eps, f"{path}.self_attn.q_norm")
                k = rms_norm(b, k, attn.k_norm.weight, eps, f"{path}.self_attn.k_norm")
            q = _apply_rotary(b, q, cos, sin, hd)
            k = _apply_rotary(b, k, cos, sin, hd)
            k = b.op("Concat", [past[i][0], k], axis=2)
            v = b.op("Concat", [past[i][1], v], axis=2)
            presents.append((k, v))
            a = attention(b, q, k, v, allowed[windows[i]], n_heads=n_heads, n_kv=n_kv, head_dim=hd,
                          scaling=scaling, softcap=attn_cap)
            o = linear(b, attn.o_proj, merge_heads(b, a, n_heads, hd), f"{path}.self_attn.o_proj")
            if gemma:
                o = rms_norm(b, o, layer.post_attention_layernorm.weight, eps, f"{path}.post_attention_layernorm",
                             offset_one=True)
            h = b.op("Add", [h, o])
        with b.scope(path, tag="norm"):
            if gemma:
                x = rms_norm(b, h, layer.pre_feedforward_layernorm.weight, eps, f"{path}.pre_feedforward_layernorm",
                             offset_one=True)
            else:
                x = rms_norm(b, h, layer.post_attention_layernorm.weight, eps, f"{path}.post_attention_layernorm")
        m = gated_mlp(b, layer.mlp, x, f"{path}.mlp", act)
        if gemma:
            with b.scope(path, tag="norm"):
                m = rms_norm(b, m, layer.post_feedforward_layernorm.weight, eps, f"{path}.post_feedforward_layernorm",
                             offset_one=True)
        h = b.op("Add", [h, m])

    with b.scope("model.norm", tag="norm"):
        h = rms_norm(b, h, model.model.norm.weight, eps, "model.norm", offset_one=gemma)
    with b.scope("lm_head", tag="lm_head"):
        if last_logits_only:
            h3 = b.op("Reshape", [h, b.op("Concat", [bs_shape, b.i64([d])], axis=0)])
            h = b.op("Reshape", [b.op("Slice", [h3, b.i64([-1]), b.i64([INT64_MAX]), b.i64([1])]), b.i64([-1, d])])
        head = model.get_output_embeddings()
        bias = None if getattr(head, "bias", None) is None else b.weight(head.bias, "lm_head.bias")
        logits = b.head_rows(h, head.weight, "lm_head.weight", bias)  # tied: the embedding chunks
        if final_cap:
            logits = b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, b.fconst(final_cap)])]), b.fconst(final_cap)])
        if last_logits_only:
            out_shape = b.op("Concat", [b.op("Slice", [bs_shape, b.i64([0]), b.i64([1])]), b.i64([1, dims["vocab_size"]])],
                             axis=0)
        else:
            out_shape = b.op("Concat", [bs_shape, b.i64([dims["vocab_size"]])], axis=0)
        logits = b.op("Reshape", [logits, out_shape])
    b.add_output(logits, "logits", ft, ["batch_size", 1 if last_logits_only else "sequence_length", dims["vocab_size"]])
    for i, (k, v) in enumerate(presents):
        b.add_output(k, f"present.{i}.key", ft, ["batch_size", n_kv, "total_sequence_length", hd])
        b.add_output(v, f"present.{i}.value", ft, ["batch_size", n_kv, "total_sequence_length", hd])
