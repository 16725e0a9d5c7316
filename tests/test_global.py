"""Global error minimization (fips_rt.fips.train_global): KL distillation of the compressed model to the
dense one. On a tiny random llama: it lowers the KL on its own batches; only U, V (and MLP biases, and
with global_norms the norm weights) change; masks, V's sparsity pattern and the budget stay as they were."""
import copy

import pytest
import torch

from fips_rt.accounting import count_model
from fips_rt.config import FipsConfig
from fips_rt.delta_math import distill_loss
from fips_rt.errors import FipsError
from fips_rt.evaluate import forward
from fips_rt.fips import _global_batch, compress_fips, global_params, train_global
from fips_rt.modules import FipsLinear
from fips_rt.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _calib(seed=0, rows=4, T=32):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (rows, T), generator=g)} for _ in range(2)]


def _compressed(layers=4):
    """A tiny llama, FiPS-compressed by its whitened init (no local steps), and its dense copy."""
    lm = tiny_model("llama", layers=layers)
    teacher = copy.deepcopy(lm.model).eval()
    calib = _calib()
    compress_fips(lm.model, lm.adapter, FipsConfig(group_size=2, steps=0, sparsity=0.5), calib, device=CPU,
                  log=lambda m: None)
    return lm, teacher, calib


@torch.no_grad()
def _kl(model, teacher, calib, kind="causal-lm"):
    return sum(float(distill_loss(forward(model, b, kind), forward(teacher, b, kind), kind)) for b in calib) / len(calib)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def test_global_distillation_lowers_kl_on_its_batches():
    lm, teacher, calib = _compressed()
    before = _kl(lm.model, teacher, calib)
    cfg = FipsConfig(group_size=2, steps=0, sparsity=0.5, global_steps=30, global_lr=3e-3, global_batch=0)
    rep = train_global(lm.model, teacher, lm.adapter, calib, cfg, CPU)
    after = _kl(lm.model, teacher, calib)
    assert before > 0
    assert after < 0.8 * before
    assert len(rep["losses"]) == 30 and rep["trained_params"] > 0
    assert rep["loss_last"] < rep["loss_first"]


@pytest.mark.parametrize("norms", [False, True])
def test_only_intended_parameters_change_and_masks_hold(norms):
    lm, teacher, calib = _compressed()
    model = lm.model
    trained = {id(p) for p in global_params(model, norms)}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert any(n.endswith(".V") for n in names) and any(n.endswith("basis.weight") for n in names)
    assert any("norm" in n for n in names) == norms
    counts0 = count_model(model, lm.adapter)
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    t_before = _snapshot(teacher)
    cfg = FipsConfig(group_size=2, steps=0, sparsity=0.5, global_steps=5, global_lr=1e-3, global_batch=2,
                     global_norms=norms)
    train_global(model, teacher, lm.adapter, calib, cfg, CPU)
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert changed <= names  # nothing outside U, V, MLP biases (and the norms when asked)
    assert any(k.endswith(".V") for k in changed) and any(k.endswith("basis.weight") for k in changed)
    assert any("norm" in k for k in changed) == norms
    for k, v in t_before.items():  # the teacher is never touched
        assert torch.equal(v, _snapshot(teacher)[k])
    for m in model.modules():
        if isinstance(m, FipsLinear):
            assert not torch.any(m.V.detach()[~m.mask])  # V stays inside its mask
    masks = [k for k in before if k.endswith(".mask")]
    assert masks and all(torch.equal(before[k], after[k]) for k in masks)  # sparsity pattern unchanged
    counts1 = count_model(model, lm.adapter)
    assert counts1["mlp_params"] == counts0["mlp_params"] and counts1["params"] == counts0["params"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags  # flags restored
    assert all(p.grad is None for p in model.parameters())


def test_global_batch_rows_and_windows():
    calib = _calib(rows=4, T=32)
    gen = torch.Generator().manual_seed(0)
    b = _global_batch(calib, FipsConfig(global_batch=1, global_seq_len=8), gen)
    assert b["input_ids"].shape == (1, 8)
    row_sets = [set(map(tuple, c["input_ids"].unfold(1, 8, 1).reshape(-1, 8).tolist())) for c in calib]
    assert any(tuple(b["input_ids"][0].tolist()) in s for s in row_sets)  # a window of a calibration row
    assert _global_batch(calib, FipsConfig(global_batch=0, global_seq_len=0), gen)["input_ids"].shape == (4, 32)
    assert _global_batch(calib, FipsConfig(global_batch=2, global_seq_len=64), gen)["input_ids"].shape == (2, 32)


def test_compress_with_global_stage_reports_it():
    lm = tiny_model("llama", layers=4)
    cfg = FipsConfig(group_size=2, steps=0, sparsity=0.5, refit="after", refit_iters=3, global_steps=3,
                     global_lr=1e-3, global_batch=1, global_seq_len=16)
    rep = compress_fips(lm.model, lm.adapter, cfg, _calib(), device=CPU, log=lambda m: None)
    g = rep["global"]
    assert len(g["losses"]) == 3 and g["seconds"] >= 0 and g["trained_params"] > 0
    assert all(torch.isfinite(torch.tensor(g["losses"])))


@pytest.mark.parametrize("bad", [dict(global_lr=0.0), dict(global_lr=float("nan")), dict(global_seq_len=-1),
                                 dict(global_steps=-2)])
def test_global_config_is_checked(bad):
    with pytest.raises(FipsError):
        FipsConfig(**bad)


def test_cli_global_flags_are_checked_and_documented():
    from click.testing import CliRunner
    from fips_rt.cli import cli
    r = CliRunner().invoke(cli, ["demo", "--global-lr", "0"])
    assert r.exit_code == 2 and "global-lr" in r.output  # refused before anything is loaded
    r = CliRunner().invoke(cli, ["demo", "--global-steps", "-1"])
    assert r.exit_code == 2
    demo_help = CliRunner().invoke(cli, ["demo", "--help"]).output
    assert "--global-steps" in demo_help and "KL" in demo_help
    compress_help = CliRunner().invoke(cli, ["compress", "--help"]).output
    assert "--global-seq-len" in compress_help and "--global-norms" in compress_help
