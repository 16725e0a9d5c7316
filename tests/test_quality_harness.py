"""The quality harness (benchmarks/quality.py) and the low-rank baselines (fips_rt/baselines.py) on tiny
random models: every method at one budget, the rows and their fields, parameters at the budget, resume.
No wall-clock assertions."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fips_rt import baselines
from fips_rt.accounting import count_model
from fips_rt.adapters import get_submodule, linear_paths
from fips_rt.modules import FipsLinear
from fips_rt.testing import tiny_model

LM_FIELDS = {"method", "budget", "model_budget", "ppl", "ppl_ratio", "params", "bytes", "seconds", "device", "split",
             "settings"}
ENC_FIELDS = {"method", "budget", "model_budget", "cosine_mean", "cosine_min", "retrieval_agreement", "params",
              "bytes", "seconds", "device", "split", "settings"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def q(quality_harness):
    return quality_harness


def tiny_settings(q):
    return q.Settings(budgets=(0.5,), calib_batch=2, group_size=2, steps=4, batch_tokens=64, global_steps=2,
                      distill_warmup=1, share=2)


def lm_context(q, layers=12):
    lm = tiny_model("llama", layers=layers)
    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(4)]
    windows = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(2)]
    ctx = q.Context("tiny-llama", lm, calib, {"windows": windows}, tiny_settings(q), "test", torch.device("cpu"),
                    log=lambda *a: None)
    ctx.dense = count_model(lm.model, lm.adapter)
    return ctx


def enc_batches(g, n, rows=4, length=16):
    out = []
    for _ in range(n):
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, length // 2:] = 0  # padding, excluded from the statistics
        out.append({"input_ids": torch.randint(0, 256, (rows, length), generator=g), "attention_mask": mask})
    return out


def enc_context(q):
    lm = tiny_model("bert", layers=4)
    g = torch.Generator().manual_seed(4)
    ev = {"texts": enc_batches(g, 2), "queries": enc_batches(g, 2), "corpus": enc_batches(g, 2)}
    ctx = q.Context("tiny-bert", lm, enc_batches(g, 4), ev, tiny_settings(q), "test", torch.device("cpu"),
                    log=lambda *a: None)
    ctx.dense = count_model(lm.model, lm.adapter)
    return ctx


# --------------------------------------------------------------------------- baselines (pure parts)
def test_lowrank_init_full_rank_is_exact_and_whitening_helps():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)]
    L = torch.linalg.cholesky(torch.eye(8) + 0.5 * torch.ones(8, 8))
    F = torch.linalg.cholesky(torch.eye(12) * 2 + 0.1 * torch.ones(12, 12))
    U, V = baselines.lowrank_init(W, 8, d_factor=L, ff_factors=[F, None])
    for w, v in zip(W, V):
        assert torch.allclose(U @ v, w, atol=1e-4)
    # overcomplete rank: zero padding, still exact
    U, V = baselines.lowrank_init(W[:1], 10)
    assert U.shape == (8, 10) and V[0].shape == (10, 12) and torch.allclose(U @ V[0], W[0], atol=1e-4)
    # d -> d_ff linear y = x W with correlated inputs: the whitened rank-3 factors give a smaller output error
    X = torch.randn(512, 8, generator=g) @ torch.randn(8, 8, generator=g)
    Lx = torch.linalg.cholesky(X.T @ X / 512 + 1e-6 * torch.eye(8))
    errs = []
    for factor in (None, Lx):
        U, V = baselines.lowrank_init(W[:1], 3, d_factor=factor)
        errs.append(float((X @ (W[0] - U @ V[0])).pow(2).sum()))
    assert errs[1] < errs[0]
    # d_ff -> d linear y = h W^T, weighted on the d_ff side
    H = torch.randn(512, 12, generator=g) @ torch.randn(12, 12, generator=g)
    Lh = torch.linalg.cholesky(H.T @ H / 512 + 1e-6 * torch.eye(12))
    errs = []
    for factor in (None, Lh):
        U, V = baselines.lowrank_init(W[:1], 3, ff_factors=[factor])
        errs.append(float((H @ (W[0] - U @ V[0]).T).pow(2).sum()))
    assert errs[1] < errs[0]


def test_layouts_and_budget():
    lm = tiny_model("llama", layers=5)
    d, d_ff = 64, 128
    per = baselines.per_linear_layout(lm.model, lm.adapter, 0.5)
    assert len(per) == 15 and all(len(g.linears) == 1 for g in per)
    assert {g.rank for g in per} == {int(0.5 * d * d_ff / (d + d_ff))}
    bs = baselines.basis_sharing_layout(lm.model, lm.adapter, 0.5, share=2)
    by_kind = {}
    for g in bs:
        by_kind.setdefault(g.linears[0][0].rsplit(".", 1)[1], []).append(g)
    assert [g.layers for g in by_kind["gate_proj"]] == [[0, 1], [2, 3], [4]]
    assert [g.layers for g in by_kind["up_proj"]] == [[0, 1], [2, 3], [4]]
    assert [g.layers for g in by_kind["down_proj"]] == [[i] for i in range(5)]
    assert sorted(p for g in bs for p, _ in g.linears) == sorted(p for layer in linear_paths(lm.model, lm.adapter)
                                                                   for p, _ in layer)
    for g in per + bs:
        n = len(g.linears)
        assert d * g.rank + n * g.rank * d_ff <= 0.5 * n * d * d_ff


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_linear_input_covariances_match_recorded_inputs(family):
    from fips_rt.capture import teacher_io
    lm = tiny_model(family, layers=4)
    g = torch.Generator().manual_seed(5)
    if family == "bert":
        batches = enc_batches(g, 3)
    else:
        batches = [{"input_ids": torch.randint(0, 256, (n, 16), generator=g)} for n in (1, 3, 2)]
    covs = baselines.linear_input_covariances(lm.model, lm.adapter, batches)
    X, _ = teacher_io(lm.model, lm.adapter, list(range(4)), batches)  # MLP inputs, padding dropped
    for li, layer in enumerate(linear_paths(lm.model, lm.adapter)):
        for path, o in layer:
            xtx, n = covs[path]
            if o == "in":
                assert n == X[li].shape[0]
                assert torch.allclose(xtx, (X[li].T @ X[li]).double(), rtol=1e-4, atol=1e-3)
            else:
                assert xtx.shape[0] == get_submodule(lm.model, path).in_features and n == X[li].shape[0]


@torch.no_grad()
def test_svd_llm_installs_one_dense_basis_per_linear():
    import copy
    base = tiny_model("llama", layers=3)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32))} for _ in range(2)]
    x = calib[0]["input_ids"]
    dense = base.model(input_ids=x).logits.detach()
    errs = {}
    for whiten in (False, True):
        lm = copy.deepcopy(base)
        baselines.svd_llm_(lm.model, lm.adapter, 0.6, calib, whiten=whiten)
        mods = [get_submodule(lm.model, p) for layer in linear_paths(lm.model, lm.adapter) for p, _ in layer]
        assert all(isinstance(m, FipsLinear) and bool(m.mask.all()) for m in mods)
        assert len({id(m.basis) for m in mods}) == len(mods)
        c = count_model(lm.model, lm.adapter)
        assert c["mlp_params"] <= 0.6 * c["mlp_params_dense"]
        assert baselines.stored_bytes(lm.model, c) == c["params"] * 4  # dense factors: no mask bytes
        errs[whiten] = float((lm.model(input_ids=x).logits.detach() - dense).pow(2).mean() / dense.pow(2).mean())
    assert errs[True] < errs[False]


# --------------------------------------------------------------------------- the harness
def test_lm_all_methods_one_budget_and_resume(q, tmp_path, monkeypatch):
    ctx = lm_context(q)
    methods = q.methods_for("causal-lm")
    assert methods == ["fips-init", "fips-local", "fips-global", "svd", "svd-local", "svd-global", "basis-sharing",
                       "deltallm", "drop-heal"]
    out = tmp_path / "quality_tiny"
    res = q.run(ctx, methods, [0.5], out, meta={"methods": methods})
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["dense"] + methods
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert LM_FIELDS <= set(r), LM_FIELDS - set(r)
        assert r["split"] == "test" and r["device"] == "cpu"
    dense = rows[0]
    assert dense["ppl_ratio"] == 1.0 and dense["params"] == ctx.dense["params"] and dense["model_budget"] == 1.0
    by = {r["method"]: r for r in rows}
    for r in rows[1:]:
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / dense["ppl"])
        assert r["budget"] == 0.5
    # FiPS rows: exactly the planned parameters, MLPs within the budget
    target = q.fips_params(ctx, 0.5)
    for m in ("fips-init", "fips-local", "fips-global"):
        assert by[m]["params"] == target
        assert by[m]["mlp_params"] <= 0.5 * ctx.dense["mlp_params_dense"]
    for m in ("svd", "svd-local", "svd-global", "basis-sharing"):
        assert by[m]["mlp_budget_reached"] <= 0.5
        assert by[m]["details"]["whitened"] is True
    assert by["svd-global"]["params"] == by["svd"]["params"] and len(by["svd-global"]["details"]["global"]["losses"]) == 2
    assert by["svd-local"]["details"]["local"][0]["layers"] == [0, 1]  # the FiPS groups
    # whole-model peers at the FiPS row's parameter count
    tb = target / ctx.dense["params"]
    assert by["deltallm"]["details"]["target_model_budget"] == pytest.approx(tb)
    assert tb - 0.005 - 1e-9 <= by["deltallm"]["model_budget"] <= tb + 1e-9
    assert by["drop-heal"]["model_budget"] <= tb + 1e-9 and by["drop-heal"]["details"]["dropped"]
    assert by["fips-global"]["settings"]["global_steps"] == by["deltallm"]["settings"]["global_steps"] == 2
    # training helps the local-error methods (same data, same steps)
    assert by["fips-local"]["details"]["local_loss"][0] is not None
    # outputs
    for ext in (".json", ".md", ".png"):
        assert out.with_suffix(ext).is_file()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in saved["rows"]] == [r["method"] for r in rows]
    md = out.with_suffix(".md").read_text()
    assert all(f"| {m} | 0.5 |" in md for m in methods)

    # --resume with the same settings: nothing is rebuilt
    def boom(c, b):
        raise AssertionError("rebuilt a row that --resume should keep")
    for name, m in list(q.METHODS.items()):
        monkeypatch.setitem(q.METHODS, name, dataclasses.replace(m, build=boom))
    res2 = q.run(ctx, methods, [0.5], out, resume=True)
    assert [r["method"] for r in res2["rows"]] == [r["method"] for r in rows]
    assert all("error" not in r for r in res2["rows"])
    assert [r["ppl"] for r in res2["rows"]] == [r["ppl"] for r in saved["rows"]]

    # a changed local-training setting reruns exactly the rows that depend on it
    built = []
    for name, m in list(q.METHODS.items()):
        monkeypatch.setitem(q.METHODS, name, dataclasses.replace(
            m, build=lambda c, b, name=name: built.append(name) or (copy_model(c), {})))
    ctx.S = dataclasses.replace(ctx.S, steps=5)
    q.run(ctx, methods, [0.5], out, resume=True)
    assert sorted(built) == ["fips-global", "fips-local", "svd-local"]


def copy_model(ctx):
    import copy
    return copy.deepcopy(ctx.base.model)


def test_encoder_methods(q, tmp_path):
    ctx = enc_context(q)
    methods = q.methods_for("encoder")
    assert methods == ["fips-init", "fips-local", "svd", "svd-local", "basis-sharing"]
    res = q.run(ctx, methods, [0.5], tmp_path / "quality_tiny_enc", meta={"methods": methods})
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["dense"] + methods
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert ENC_FIELDS <= set(r), ENC_FIELDS - set(r)
        assert -1.0 - 1e-6 <= r["cosine_min"] <= r["cosine_mean"] <= 1.0 + 1e-6
        assert 0.0 <= r["retrieval_agreement"] <= 1.0
    assert rows[0]["cosine_mean"] == pytest.approx(1.0) and rows[0]["retrieval_agreement"] == 1.0
    by = {r["method"]: r for r in rows}
    assert by["fips-init"]["params"] == q.fips_params(ctx, 0.5)
    for m in ("svd", "svd-local", "basis-sharing"):
        assert by[m]["mlp_budget_reached"] <= 0.5
    assert (tmp_path / "quality_tiny_enc.md").is_file() and not (tmp_path / "quality_tiny_enc.png").exists()


def test_retrieval_pairs_and_settings(q):
    texts = ["Paris is the capital of France. It has many museums.", "One sentence only without a split",
             "Dr. Who is a show. It is British and long running."]
    qs, cs = q.retrieval_pairs(texts, 0)
    assert qs == ["Paris is the capital of France.", "Dr. Who is a show."]
    assert cs == ["It has many museums.", "It is British and long running."]
    s = q.parse_set(q.Settings(), ["steps=7", "lr=3e-4", "budgets=0.5,0.9"])
    assert s.steps == 7 and s.lr == 3e-4 and s.budgets == (0.5, 0.9)
    with pytest.raises(SystemExit):
        q.parse_set(q.Settings(), ["nope=1"])
