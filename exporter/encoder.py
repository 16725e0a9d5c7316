"""Hand-built BERT-style encoder graph (BERT, RoBERTa, XLM-R; MiniLM sentence encoders).

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch, seq] (int64) ->
``last_hidden_state`` [batch, seq, d] and ``sentence_embedding`` [batch, d], the mean of the
hidden states over the tokens whose attention_mask is 1 (sentence-transformers' mean pooling)::

    ids ─Gather(word)─┐
    tt  ─Gather(type)─┼─Add─LayerNorm─► h [N, d]
    pos ─Gather(pos)──┘                         (RoBERTa: pos = cumsum(ids != pad) * (ids != pad) + pad)
    per layer:  h ─► q,k,v (Gemm+bias) ─► softmax(q·kᵀ/√hd | mask) · v ─► dense ─Add(h)─LayerNorm─► h
                h ─► MLP (intermediate.dense ─GELU─ output.dense: dense / FiPS / DeltaLLM) ─Add(h)─LayerNorm─► h
    pooling:    Σ h·mask / max(Σ mask, 1e-9)
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .builder import GraphBuilder
from .layers import attention, fc_mlp, layer_norm, linear, merge_heads, split_heads


def build_encoder(b: GraphBuilder, model) -> None:
    cfg = model.config
    d, n_heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // n_heads
    act = getattr(cfg, "hidden_act", "gelu")
    ft = b.float_type
    input_ids = b.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    attention_mask = b.add_input("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"])
    token_type_ids = b.add_input("token_type_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    bs_shape = b.op("Shape", [input_ids])
    emb = model.embeddings
    with b.scope("embeddings", tag="embedding"):
        words = b.op("Gather", [b.weight(emb.word_embeddings.weight, "embeddings.word_embeddings.weight"), input_ids])
        types = b.op("Gather", [b.weight(emb.token_type_embeddings.weight, "embeddings.token_type_embeddings.weight"),
                                token_type_ids])
        h = b.op("Add", [words, types])
        if getattr(emb, "position_embeddings", None) is not None:
            pad = getattr(emb, "padding_idx", None)
            if pad is not None and type(model).__name__ in ("RobertaModel", "XLMRobertaModel"):
                keep = b.cast(b.op("Not", [b.op("Equal", [input_ids, b.const(np.int64(pad))])]), TensorProto.INT64)
                pos = b.op("Add", [b.op("Mul", [b.op("CumSum", [keep, b.const(np.int64(1))]), keep]),
                                   b.const(np.int64(pad))])
            else:
                seq = b.op("Reshape", [b.op("Slice", [bs_shape, b.i64([1]), b.i64([2])]), b.i64([])])
                pos = b.op("Unsqueeze", [b.op("Range", [b.const(np.int64(0)), seq, b.const(np.int64(1))]), b.i64([0])])
            table = b.weight(emb.position_embeddings.weight, "embeddings.position_embeddings.weight")
            h = b.op("Add", [h, b.op("Gather", [table, pos])])
        h = layer_norm(b, b.op("Reshape", [h, b.i64([-1, d])]), emb.LayerNorm, "embeddings.LayerNorm")
    with b.scope("mask", tag="mask"):
        allowed = b.op("Unsqueeze", [b.cast(attention_mask, TensorProto.BOOL), b.i64([1, 2])])  # [B, 1, 1, S]
    for i, layer in enumerate(model.encoder.layer):
        path = f"encoder.layer.{i}"
        att = layer.attention
        with b.scope(path, tag="attention"):
            sa = att.self
            q = split_heads(b, linear(b, sa.query, h, f"{path}.attention.self.query"), bs_shape, n_heads, hd)
            k = split_heads(b, linear(b, sa.key, h, f"{path}.attention.self.key"), bs_shape, n_heads, hd)
            v = split_heads(b, linear(b, sa.value, h, f"{path}.attention.self.value"), bs_shape, n_heads, hd)
            a = attention(b, q, k, v, allowed, n_heads=n_heads, n_kv=n_heads, head_dim=hd, scaling=hd ** -0.5)
            o = linear(b, att.output.dense, merge_heads(b, a, n_heads, hd), f"{path}.attention.output.dense")
            h = layer_norm(b, b.op("Add", [o, h]), att.output.LayerNorm, f"{path}.attention.output.LayerNorm")
        m = fc_mlp(b, layer.intermediate.dense, layer.output.dense, h, f"{path}.intermediate.dense",
                   f"{path}.output.dense", act)
        with b.scope(path, tag="norm"):
            h = layer_norm(b, b.op("Add", [m, h]), layer.output.LayerNorm, f"{path}.output.LayerNorm")
    with b.scope("pooling", tag="pooling"):
        h3 = b.op("Reshape", [h, b.op("Concat", [bs_shape, b.i64([d])], axis=0)])
        m32 = b.op("Unsqueeze", [b.cast(attention_mask, TensorProto.FLOAT), b.i64([-1])])  # [B, S, 1]
        total = b.reduce_sum(b.op("Mul", [b.to_fp32(h3), m32]), [1], keepdims=0)
        count = b.op("Max", [b.reduce_sum(m32, [1], keepdims=0), b.const(np.float32(1e-9))])
        pooled = b.from_fp32(b.op("Div", [total, count]))
    b.add_output(h3, "last_hidden_state", ft, ["batch_size", "sequence_length", d])
    b.add_output(pooled, "sentence_embedding", ft, ["batch_size", d])
