"""The one training loop (fips_rt.train): its lr schedule, its optimizer modes and hooks, its resumable
state, and a regression check of every stage that runs through it (FiPS local with GMP / RigL / N:M, FiPS
global distillation, DeltaLLM distillation with an interrupted and resumed run, block-drop healing, the
baselines' local fit) against the losses the three loops it replaced gave (tests/fixtures/train_losses.json,
recorded before the refactor on commit 1017725; bitwise equal there, compared here with rtol 1e-4 so that
another CPU's float reduction order does not fail it)."""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

import fips_rt.train as T
from fips_rt.errors import FipsError
from fips_rt.train import StateFile, fips_warmup, loss_summary, lr_factor, train_loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "train_losses.json"


# ----------------------------------------------------------------------------- the schedule (pure)
def test_lr_factor_warmup_then_cosine_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert lr_factor(4, 100, 10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert lr_factor(9, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 100)))  # warm-up done
    assert lr_factor(50, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, 100, 10) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    fs = [lr_factor(t, 100, 10) for t in range(100)]
    assert all(b > a for a, b in zip(fs[:9], fs[1:10]))  # rises during the warm-up
    assert all(b <= a for a, b in zip(fs[9:], fs[10:]))  # then only decays
    assert lr_factor(0, 10, 0) == lr_factor(0, 10, 1) == pytest.approx(1.0)  # warm-up 0 counts as 1
    assert lr_factor(3, 0, 5) == 1.0  # no steps: a neutral factor


def test_lr_factor_keeps_both_old_schedules():
    """FiPS's LambdaLR (warm-up steps/20) and DeltaLLM's lr_factor (its own warm-up): the same numbers,
    bit for bit, from the one function."""
    for steps in (1, 7, 20, 60, 200, 1000):
        warm = max(1, steps // 20)
        assert fips_warmup(steps) == warm
        for t in range(steps):
            old_fips = min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1)))
            assert lr_factor(t, steps, warm) == old_fips
            old_delta = min(1.0, (t + 1) / max(1, 10)) * 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
            assert lr_factor(t, steps, 10) == old_delta


def test_loss_summary():
    assert loss_summary([]) == {"loss_first": None, "loss_last": None}
    s = loss_summary([float(i) for i in range(20)])
    assert s["loss_first"] == 0.0 and s["loss_last"] == pytest.approx(14.5)


# ----------------------------------------------------------------------------- the loop
def _problem(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(4, 5, generator=g)) for _ in range(n)]
    target = [torch.randn(4, 5, generator=g) for _ in range(n)]

    def loss(step):
        return sum(((p - t) ** 2).sum() * (1 + 0.1 * step) for p, t in zip(ps, target))
    return ps, loss


def _adamw(ps, lr=0.05):
    return torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, betas=(0.9, 0.95), fused=True)


def test_optimizer_sees_base_lr_times_the_schedule():
    ps, loss = _problem()
    seen = []
    opt_box = []

    def make(tensors):
        opt_box.append(_adamw(tensors, lr=0.2))
        return opt_box[-1]
    out = train_loop(loss, ps, make, steps=12, warmup=3,
                     after_step=lambda s: seen.append(opt_box[0].param_groups[0]["lr"]))
    assert seen == [0.2 * lr_factor(t, 12, 3) for t in range(12)]
    assert len(out["losses"]) == 12 and out["resumed_at"] == 0
    assert out["losses"][-1] < out["losses"][0]
    assert all(not p.requires_grad and p.grad is None for p in ps)  # trainable only during the loop


def test_per_tensor_updates_in_backward_equal_one_optimizer():
    """AdamW is elementwise: one optimizer per tensor stepped inside backward gives the same update."""
    a, loss_a = _problem()
    b, loss_b = _problem()
    train_loop(loss_a, a, _adamw, steps=6, warmup=2)
    train_loop(loss_b, b, _adamw, steps=6, warmup=2, per_tensor=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_update_hooks_constrain_every_tensor(per_tensor):
    """before_update sees each gradient right before its update, after_update runs right after it (how
    FiPS keeps V inside its mask), in both optimizer modes."""
    ps, loss = _problem()
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) > 0.5 for i, p in enumerate(ps)]
    with torch.no_grad():
        for p, m in zip(ps, masks):
            p.mul_(m)
    owner = {id(p): m for p, m in zip(ps, masks)}
    calls = []

    def before(p):
        calls.append("before")
        p.grad.mul_(owner[id(p)])

    def after(p):
        calls.append("after")
        p.data.mul_(owner[id(p)])
    train_loop(loss, ps, _adamw, steps=5, warmup=1, per_tensor=per_tensor, before_update=before, after_update=after)
    assert calls.count("before") == calls.count("after") == 5 * len(ps)
    for p, m in zip(ps, masks):
        assert bool((p[~m] == 0).all()) and bool((p[m] != 0).any())


def test_after_backward_sees_raw_gradients_and_refuses_per_tensor():
    ps, loss = _problem()
    grads = []
    train_loop(loss, ps, _adamw, steps=2, warmup=1,
               after_backward=lambda s: grads.append([p.grad.clone() for p in ps]))
    assert len(grads) == 2 and all(g is not None for g in grads[0])
    with pytest.raises(ValueError):
        train_loop(loss, ps, _adamw, steps=2, warmup=1, per_tensor=True, after_backward=lambda s: None)


def test_a_loss_without_gradient_skips_the_update():
    ps, _ = _problem()
    before = [p.detach().clone() for p in ps]
    steps_seen = []

    def loss(step):
        return torch.tensor(1.0)  # e.g. every compressed block drawn dense this step
    out = train_loop(loss, ps, _adamw, steps=3, warmup=1, after_step=steps_seen.append)
    assert out["losses"] == [1.0, 1.0, 1.0] and steps_seen == [0, 1, 2]
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_step_callback_and_progress_postfix(monkeypatch):
    ps, loss = _problem()
    seen = []
    monkeypatch.setattr(T, "_step_callback", lambda step, value: seen.append((step, value)))
    out = train_loop(loss, ps, _adamw, steps=4, warmup=1, progress=True, postfix=lambda: {"x": "1"},
                     postfix_every=2)
    assert [s for s, _ in seen] == [0, 1, 2, 3] and [v for _, v in seen] == out["losses"]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_state_file_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, per_tensor):
    ref, loss = _problem()
    full = train_loop(loss, ref, _adamw, steps=7, warmup=2, per_tensor=per_tensor)

    class Stop(Exception):
        pass

    def boom(step, value):
        if step == 4:  # 5 steps done; the last save was after step 4 (every 2)
            raise Stop
    ps, loss = _problem()
    state = StateFile(tmp_path / "train.pt", {f"p{i}": p for i, p in enumerate(ps)}, every=2, meta={"a": 1})
    monkeypatch.setattr(T, "_step_callback", boom)
    with pytest.raises(Stop):
        train_loop(loss, ps, _adamw, steps=7, warmup=2, per_tensor=per_tensor, state=state)
    monkeypatch.setattr(T, "_step_callback", lambda step, value: None)
    assert torch.load(tmp_path / "train.pt", weights_only=True)["step"] == 4
    assert [f.name for f in tmp_path.iterdir()] == ["train.pt"]  # written under a temporary name, renamed
    again, loss = _problem()
    msgs = []
    state = StateFile(tmp_path / "train.pt", {f"p{i}": p for i, p in enumerate(again)}, every=2, meta={"a": 1},
                      resume=True)
    out = train_loop(loss, again, _adamw, steps=7, warmup=2, per_tensor=per_tensor, state=state, log=msgs.append)
    assert out["resumed_at"] == 4 and any("resumed" in m for m in msgs)
    assert out["losses"] == full["losses"]
    for x, y in zip(ref, again):
        assert torch.equal(x, y)
    assert torch.load(tmp_path / "train.pt", weights_only=True)["step"] == 7  # the last step is saved too
    # other settings refuse to resume; without resume the file is not read
    other, loss = _problem()
    named = {f"p{i}": p for i, p in enumerate(other)}
    with pytest.raises(FipsError, match="other settings"):
        train_loop(loss, other, _adamw, steps=7, warmup=2, per_tensor=per_tensor,
                   state=StateFile(tmp_path / "train.pt", named, every=2, meta={"a": 2}, resume=True))
    out = train_loop(loss, other, _adamw, steps=7, warmup=2, per_tensor=per_tensor,
                     state=StateFile(tmp_path / "train.pt", named, every=0, meta={"a": 2}))
    assert out["resumed_at"] == 0


# ----------------------------------------------------------------------------- regression of every stage
CPU = torch.device("cpu")
QUIET = dict(log=lambda *a: None)


def _calib(n=4, rows=2, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (rows, seq), generator=g)} for _ in range(n)]


def _bert_calib(n=3, rows=2, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        am = torch.ones(rows, seq, dtype=torch.long)
        am[0, seq - 5:] = 0
        out.append({"input_ids": torch.randint(0, 256, (rows, seq), generator=g), "attention_mask": am})
    return out


TRAINED = (".V", "basis.weight", ".A", ".B")


def _fingerprint(model, everything_in_blocks=False) -> float:
    """Sum of |x| over the trained tensors (FiPS U, V; DeltaLLM A, B; with ``everything_in_blocks``
    every tensor of the blocks: block-drop healing trains them all)."""
    return sum(float(v.double().abs().sum()) for k, v in model.state_dict().items()
               if v.is_floating_point() and (k.endswith(TRAINED) or (everything_in_blocks and ".layers." in k)))


def _fips_case(lm, cfg, calib):
    from fips_rt.api import compress_
    rep = compress_(lm, cfg, calib, device="cpu", **QUIET).details
    losses = [x for g in rep["groups"] for x in (g["loss_first"], g["loss_last"])] + rep["global"].get("losses", [])
    return losses, _fingerprint(lm.model)


def _run_stages() -> dict:
    from fips_rt.api import compress_
    from fips_rt.baselines import svd_llm_, train_local_
    from fips_rt.blockdrop import drop_blocks_, heal_
    from fips_rt.config import DeltaConfig, FipsConfig
    from fips_rt.testing import tiny_model
    res = {}
    for pruning, steps in (("gmp", 12), ("rigl", 12), ("nm", 8)):  # per-tensor AdamW; one AdamW (RigL); N:M
        res[f"fips_{pruning}"] = _fips_case(tiny_model("llama", layers=4), FipsConfig(
            mlp_budget=0.5, group_size=2, steps=steps, lr=1e-2, batch_tokens=64, pruning=pruning, sparsity=0.5,
            mask_every=2), _calib())
    res["fips_global"] = _fips_case(tiny_model("llama", layers=4), FipsConfig(
        mlp_budget=0.5, group_size=2, steps=4, lr=1e-2, batch_tokens=64, sparsity=0.5, weight_decay=0.01,
        global_steps=9, global_lr=3e-3, global_norms=True, global_batch=1, global_seq_len=16), _calib())
    res["fips_global_bert"] = _fips_case(tiny_model("bert", layers=2), FipsConfig(
        mlp_budget=0.5, group_size=2, steps=3, lr=1e-2, batch_tokens=32, sparsity=0.5, global_steps=5,
        global_lr=3e-3, global_batch=0), _bert_calib())
    dcfg = DeltaConfig(model_budget=0.85, keep_first=1, keep_last=1, steps=7, lr=1e-2, warmup=2, batch=2,
                       anchor_scale="one", train_scope="deltas", layout="sequential", share_attention=False,
                       residual_init="fit",
                       save_every=2, replace_start=0.2, replace_end=0.5, hidden_mse=0.1, train_norms=True)
    with tempfile.TemporaryDirectory() as td:
        lm = tiny_model("llama", layers=8)
        rep = compress_(lm, dcfg, _calib(6), device="cpu", state_dir=Path(td) / "a", **QUIET).details
        res["deltallm"] = (rep["losses"], _fingerprint(lm.model))

        class Stop(Exception):
            pass

        def boom(step, loss):
            if step == 3:
                raise Stop
        real, T._step_callback = T._step_callback, boom
        try:
            with pytest.raises(Stop):
                compress_(tiny_model("llama", layers=8), dcfg, _calib(6), device="cpu", state_dir=Path(td) / "b",
                          **QUIET)
        finally:
            T._step_callback = real
        lm = tiny_model("llama", layers=8)
        rep = compress_(lm, dcfg, _calib(6), device="cpu", state_dir=Path(td) / "b", resume=True, **QUIET).details
        assert rep["train"]["resumed_at"] == 4
        res["deltallm_resumed"] = (rep["losses"], _fingerprint(lm.model))
    lm = tiny_model("bert", layers=6)
    rep = compress_(lm, DeltaConfig(model_budget=0.9, keep_first=1, keep_last=1, steps=5, lr=1e-2, warmup=1,
                                    anchor_scale="one", train_scope="deltas", layout="sequential",
                                    share_attention=False, residual_init="fit",
                                    replace_start=1.0, replace_end=0.0), _bert_calib(), device="cpu", **QUIET).details
    res["deltallm_bert"] = (rep["losses"], _fingerprint(lm.model))
    lm = tiny_model("llama", layers=6)
    teacher = copy.deepcopy(lm)
    drop_blocks_(lm, lm.adapter, 0.8, _calib())
    h = heal_(lm, teacher, _calib(4), steps=6, lr=1e-3, warmup=2, device="cpu", seed=3, **QUIET)
    res["heal"] = (h["losses"], _fingerprint(lm.model, everything_in_blocks=True))
    lm = tiny_model("llama", layers=4)
    teacher = copy.deepcopy(lm.model)
    svd_llm_(lm.model, lm.adapter, 0.5, _calib())
    out = train_local_(lm.model, lm.adapter, teacher, [[0, 1], [2, 3]], _calib(), steps=7, lr=1e-2, batch_tokens=64,
                       weight_decay=0.01, seed=1)
    res["baseline_local"] = ([x for g in out for x in (g["loss_first"], g["loss_last"])], _fingerprint(lm.model))
    return res


def test_every_stage_reproduces_the_losses_of_the_loops_it_replaced():
    ref = json.loads(FIXTURE.read_text())["cases"]
    got = _run_stages()
    assert set(got) == set(ref)
    for k, (losses, fingerprint) in got.items():
        assert losses == pytest.approx(ref[k]["losses"], rel=1e-4, abs=1e-9), k
        assert fingerprint == pytest.approx(ref[k]["fingerprint"], rel=1e-5), k
