"""Real SmolLM2-135M: dense export, FiPS export from a real checkpoint (fips_rt.compress_, SVD init, no
training), parity with PyTorch, byte ratios, sidecar files, and 32 greedy tokens with the KV cache.
Marked ``real`` (a few minutes on 2 CPU cores: model load, compression, two exports with parity)."""
from __future__ import annotations

import copy
import json

import onnxruntime as ort
import pytest

from fips_rt.exporter import export
from test_export_support import consumers, greedy_onnx, greedy_torch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol_exports(smollm2, tmp_path_factory):
    from fips_rt import FipsConfig, compress_
    from fips_rt.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("smollm2-export")
    (root / "dense").mkdir()
    (root / "fips").mkdir()
    dense = export(smollm2, root / "dense" / "model.onnx")
    lm = copy.deepcopy(smollm2)  # the session fixture stays dense for other tests
    cfg = FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0, init="svd")
    rep = compress_(lm, cfg, device="cpu", log=lambda *a: None)
    ckpt = save_checkpoint(root / "fips.pt", lm, "fips", cfg.to_dict(), rep.to_dict())
    fips = export(ckpt, root / "fips" / "model.onnx")
    return {"dense": dense, "fips": fips, "lm": lm, "root": root}


def test_dense_export_matches_pytorch(smol_exports):
    r = smol_exports["dense"]
    assert r.passed, r.table()
    assert r.max_abs("logits") < 1e-3, r.table()
    assert r.audit["transposed_initializers"] == [] and r.audit["duplicate_initializers"] == []
    files = {p.name for p in (smol_exports["root"] / "dense").iterdir()}
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "fips_config.json"} <= files
    cfg = json.loads((smol_exports["root"] / "dense" / "fips_config.json").read_text())
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]) == (30, 3, 64)
    assert cfg["eos_token_ids"] and cfg["chat_template"] is True and cfg["method"] == "dense"
    tok_cfg = json.loads((smol_exports["root"] / "dense" / "tokenizer_config.json").read_text())
    assert tok_cfg.get("chat_template")


def test_fips_export_matches_pytorch_and_is_smaller(smol_exports):
    d, f = smol_exports["dense"], smol_exports["fips"]
    assert f.method == "fips" and f.passed, f.table()
    assert f.max_abs("logits") < 1e-3, f.table()
    assert f.mlp_bytes <= 0.56 * d.mlp_bytes, (f.mlp_bytes, d.mlp_bytes)
    assert f.file_bytes <= 0.75 * d.file_bytes, (f.file_bytes, d.file_bytes)
    # 30 layers in groups of 4 (last group of 2): 8 bases, each used by MatMul + Gemm per layer
    assert len(f.audit["bases"]) == 8 and f.audit["sparse_nodes"] == 90
    used = consumers(f.output)
    assert all(sorted(set(used[b])) == ["Gemm", "MatMul"] for b in f.audit["bases"])
    assert f.audit["transposed_initializers"] == [] and f.audit["duplicate_initializers"] == []


def test_greedy_32_tokens_with_kv_cache(smol_exports):
    lm = smol_exports["lm"]
    out = smol_exports["fips"].output
    cfg = json.loads((out.parent / "fips_config.json").read_text())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prompt = lm.tokenizer("The capital of France is")["input_ids"]
    assert greedy_onnx(session, cfg, prompt, 32) == greedy_torch(lm.model, prompt, 32)
