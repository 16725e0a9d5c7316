"""Helpers shared by the exporter tests (no tests here): tiny models of every family, greedy loops.

The real runtime is not the exporter's business: the numpy greedy loop below is the smallest
client of an exported decoder (prefill, then one token at a time with the KV cache).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch

from fips_rt.exporter.synthetic import deltafy_, fipsify_
from fips_rt.models import LoadedModel
from fips_rt.testing import tiny_model


def tiny(family: str, method: str = "dense", **kw) -> LoadedModel:
    """tiny_model(family), optionally compressed by the synthetic helpers."""
    lm = tiny_model(family, **kw)
    if method == "fips":
        fipsify_(lm, group_size=2)
    elif method == "delta":
        deltafy_(lm, unit=2)
    return lm


def empty_past(cfg: dict, batch: int, dtype=np.float32) -> dict:
    z = np.zeros((batch, cfg["num_kv_heads"], 0, cfg["head_dim"]), dtype)
    return {f"past_key_values.{i}.{kv}": z for i in range(cfg["num_layers"]) for kv in ("key", "value")}


def greedy_onnx(session, cfg: dict, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of ``n`` tokens with the exported KV cache (batch 1, no padding)."""
    names = [o.name for o in session.get_outputs()]
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **empty_past(cfg, 1)}
    out = []
    for _ in range(n):
        res = dict(zip(names, session.run(None, feeds)))
        tok = int(res["logits"][0, -1].argmax())
        out.append(tok)
        mask = np.concatenate([mask, [[1]]], axis=1)
        feeds = {"input_ids": np.asarray([[tok]], np.int64), "attention_mask": mask,
                 "position_ids": np.asarray([[mask.shape[1] - 1]], np.int64)}
        for i in range(cfg["num_layers"]):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = res[f"present.{i}.{kv}"]
    return out


@torch.no_grad()
def greedy_torch(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    cache, toks = out.past_key_values, []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        toks.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return toks


def initializers(path) -> dict[str, onnx.TensorProto]:
    m = onnx.load(str(path), load_external_data=False)
    return {t.name: t for t in m.graph.initializer}


def consumers(path) -> dict[str, list[str]]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out: dict[str, list[str]] = {}
    for node in m.graph.node:
        for name in node.input:
            if name in inits:
                out.setdefault(name, []).append(node.op_type)
    return out


def clone(lm: LoadedModel) -> LoadedModel:
    return copy.deepcopy(lm)
