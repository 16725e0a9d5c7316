"""The FiPS engine on tiny random models of every family: compress_, masks, budget, resume, checkpoint."""
import copy

import pytest
import torch

from fips_rt import FipsConfig, compress_
from fips_rt.accounting import count_model
from fips_rt.adapters import adapter_for, linear_paths, get_submodule
from fips_rt.checkpoint import load_checkpoint, save_checkpoint
from fips_rt.errors import FipsError
from fips_rt.evaluate import forward
from fips_rt.modules import FipsLinear
from fips_rt.testing import FAMILIES, tiny_model


def calib_for(lm, n=4):
    g = torch.Generator().manual_seed(1)
    if lm.kind == "vit":
        return [{"x": torch.randn(8, 3, 32, 32, generator=g)} for _ in range(n)]
    if lm.kind == "encoder":
        return [{"input_ids": torch.randint(0, 256, (4, 32), generator=g),
                 "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(n)]
    return [{"input_ids": torch.randint(0, 256, (4, 64), generator=g)} for _ in range(n)]


def rel_err(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_adapter_compresses_and_round_trips(family, tmp_path):
    lm = tiny_model(family)
    dense = copy.deepcopy(lm.model)
    calib = calib_for(lm)
    cfg = FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=20)
    rep = compress_(lm, cfg, calib, log=lambda *a: None)
    mods = [m for m in lm.model.modules() if isinstance(m, FipsLinear)]
    n_lin = sum(len(layer) for layer in linear_paths(lm.model, lm.adapter))
    assert len(mods) == n_lin
    # one shared basis per group, referenced by all its linears
    assert len({id(m.basis) for m in mods}) == len(rep.details["groups"])
    for m in mods:
        assert torch.all(m.V[~m.mask] == 0)
    counts = count_model(lm.model, lm.adapter)
    assert counts["mlp_params"] <= 0.5 * counts["mlp_params_dense"] + sum(
        m.bias.numel() for m in mods if m.bias is not None)
    # the compressed model still approximates the dense one
    x = calib[0]
    assert rel_err(forward(lm.model, x, lm.kind), forward(dense, x, lm.kind)) < 1.0
    # checkpoint round trip: same outputs
    path = tmp_path / "m.pt"
    save_checkpoint(path, lm, "fips", cfg.to_dict(), rep.to_dict())
    lm2 = load_checkpoint(path)
    assert torch.allclose(forward(lm2.model, x, lm.kind), forward(lm.model, x, lm.kind), atol=1e-5, rtol=0)
    assert count_model(lm2.model, lm2.adapter)["mlp_params"] == counts["mlp_params"]


def test_local_training_lowers_error():
    lm = tiny_model("llama", layers=4)
    dense = copy.deepcopy(lm.model)
    calib = calib_for(lm, 6)
    init_only = copy.deepcopy(lm)
    compress_(init_only, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=0), calib, log=lambda *a: None)
    compress_(lm, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=60, lr=3e-3), calib, log=lambda *a: None)
    x = calib[0]
    ref = forward(dense, x, "causal-lm")
    assert rel_err(forward(lm.model, x, "causal-lm"), ref) < rel_err(forward(init_only.model, x, "causal-lm"), ref)


def test_whitened_init_beats_plain_svd_init():
    lm = tiny_model("llama", layers=4)
    dense = copy.deepcopy(lm.model)
    calib = calib_for(lm, 6)
    plain = copy.deepcopy(lm)
    compress_(plain, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=0, init="svd"), calib, log=lambda *a: None)
    compress_(lm, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=0), calib, log=lambda *a: None)
    x = calib[0]
    ref = forward(dense, x, "causal-lm")
    assert rel_err(forward(lm.model, x, "causal-lm"), ref) < rel_err(forward(plain.model, x, "causal-lm"), ref)


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_full_rank_init_is_exact(init):
    """At rank d with a dense V the shared init reproduces every MLP weight (plain and whitened)."""
    from fips_rt.capture import input_statistics
    from fips_rt.fips import init_group, install_group, plan_groups
    lm = tiny_model("llama", layers=2)
    dense = copy.deepcopy(lm.model)
    cfg = FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.0, steps=0, init=init)
    plans, _ = plan_groups(lm.model, lm.adapter, cfg)
    stats = input_statistics(lm.model, lm.adapter, linear_paths(lm.model, lm.adapter), calib_for(lm))
    for plan in plans:
        plan.rank = plan.d  # full rank
        ini = init_group(lm.model, plan, cfg, stats)
        install_group(lm.model, plan, ini.U, ini.V, [torch.ones_like(v, dtype=torch.bool) for v in ini.V], "cpu")
    for path, _ in sum(linear_paths(lm.model, lm.adapter), []):
        m = get_submodule(lm.model, path)
        assert isinstance(m, FipsLinear)
        assert torch.allclose(m.dense_weight(), get_submodule(dense, path).weight, atol=1e-4)
    x = calib_for(lm)[0]
    assert torch.allclose(forward(lm.model, x, "causal-lm"), forward(dense, x, "causal-lm"), atol=1e-3)


@pytest.mark.parametrize("pruning", ["rigl", "nm"])
def test_pruning_variants(pruning):
    lm = tiny_model("llama", layers=2)
    cfg = FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=20, pruning=pruning)
    compress_(lm, cfg, calib_for(lm), log=lambda *a: None)
    mods = [m for m in lm.model.modules() if isinstance(m, FipsLinear)]
    if pruning == "nm":
        for m in mods:
            rows, cols = m.mask.shape
            assert m.mask[:, : cols - cols % 4].reshape(rows, -1, 4).sum(-1).le(2).all()
    total = sum(m.mask.numel() for m in mods)
    assert sum(m.nnz for m in mods) <= 0.5 * total + 1


def test_global_allocation_sums_to_budget():
    lm = tiny_model("llama", layers=4)
    rep = compress_(lm, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.75, steps=0), calib_for(lm),
                    log=lambda *a: None)
    g = rep.details["groups"]
    assert len(g) == 2
    total = sum(x["nnz"] for x in g)
    from fips_rt.budget import kept_nnz
    assert total == sum(kept_nnz(x["rank"], 6 * 128, 0.75) for x in g)


def test_resume_after_interruption(tmp_path, monkeypatch):
    import fips_rt.fips as F
    cfg = FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=15)
    ref = tiny_model("llama", layers=6)
    calib = calib_for(ref)
    compress_(ref, cfg, calib, log=lambda *a: None)

    lm = tiny_model("llama", layers=6)
    real = F.train_group_local
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies while training the second group
        return real(*a, **k)
    monkeypatch.setattr(F, "train_group_local", flaky)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        compress_(lm, cfg, calib, state_dir=state, log=lambda *a: None)
    assert (state / "group_000.pt").is_file() and not (state / "group_001.pt").exists()
    saved = torch.load(str(state / "group_000.pt"), weights_only=True)  # compact: kept values + packed mask
    assert "V0" not in saved["tensors"] and saved["tensors"]["mask0"].dtype == torch.uint8
    r, c = saved["shapes"][0]
    assert saved["tensors"]["values0"].numel() < r * c and saved["tensors"]["mask0"].numel() == (r * c + 7) // 8
    assert not list(state.glob(".*.tmp"))
    monkeypatch.setattr(F, "train_group_local", real)
    lm = tiny_model("llama", layers=6)
    rep = compress_(lm, cfg, calib, state_dir=state, resume=True, log=lambda *a: None)
    assert rep.details["groups"][0].get("resumed") is True and not rep.details["groups"][1].get("resumed")
    for (pa, a), (pb, b) in zip(ref.model.named_parameters(), lm.model.named_parameters()):
        assert pa == pb and torch.allclose(a, b, atol=1e-6), pa
    resumed = [m for n, m in lm.model.named_modules() if n.startswith(("model.layers.0.", "model.layers.1."))
               and hasattr(m, "mask")]
    for i, m in enumerate(resumed):  # group 0 came back from its compact state unchanged
        vals = saved["tensors"][f"values{i}"]
        assert torch.equal(m.V.detach(), vals.new_zeros(m.V.shape).masked_scatter_(m.mask, vals))
    # settings changed -> refuse to resume
    with pytest.raises(FipsError):
        compress_(tiny_model("llama", layers=6), FipsConfig(mlp_budget=0.4, group_size=2, sparsity=0.5, steps=15),
                  calib, state_dir=state, resume=True, log=lambda *a: None)


def test_group_larger_than_layers_is_refused():
    lm = tiny_model("llama", layers=2)
    with pytest.raises(FipsError, match="larger than"):
        compress_(lm, FipsConfig(group_size=3, steps=0, init="svd"), None, log=lambda *a: None)


def test_model_budget_is_met():
    lm = tiny_model("llama", layers=4)
    compress_(lm, FipsConfig(model_budget=0.8, mlp_budget=None, group_size=2, sparsity=0.5, steps=0),
              calib_for(lm), log=lambda *a: None)
    c = count_model(lm.model, lm.adapter)
    assert c["params"] / c["params_dense"] <= 0.8
    assert c["params"] / c["params_dense"] > 0.78


def test_unsupported_architecture_lists_supported():
    import transformers as T
    m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(FipsError, match="Supported: llama"):
        adapter_for(m)


def test_config_validation():
    for kw in ({"mlp_budget": 1.5}, {"mlp_budget": 0.0}, {"sparsity": 1.0}, {"init": "x"}, {"pruning": "x"},
               {"steps": -1}):
        with pytest.raises(FipsError):
            FipsConfig(**kw)
    assert FipsConfig(pruning="nm", nm=(2, 4)).sparsity == 0.5
    assert FipsConfig.from_dict(FipsConfig(groups=((0, 1), (2,))).to_dict()).groups == ((0, 1), (2,))
