"""``benchmarks/quality.py --preset cpu`` machinery on a tiny random Llama (CPU, no downloads): the rank = d
sparsity rule, the LR grid on the validation split, the test-split run taking each method's best LR from
that file, rows written as each finishes, resume after an interruption, md/png (and --plot-only).
No wall-clock assertions."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fips_rt.accounting import count_model
from fips_rt.budget import rank_for_budget
from fips_rt.testing import tiny_model

METHODS = ["fips-global", "svd-global", "drop-heal", "deltallm"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def q(quality_harness):
    return quality_harness


# --------------------------------------------------------------------------- the rank = d rule
def test_square_u_sparsity_smollm2_numbers_and_minimal(q):
    from fips_rt.cli import DEMO
    d, d_ff, n = 576, 1536, 12  # SmolLM2-135M, groups of 4 MLPs x (gate, up, down)
    got = {b: q.square_u_sparsity(b, d, d_ff, n) for b in (0.5, 0.7, 0.9)}
    assert got == {0.5: 0.5315, 0.7: 0.3315, 0.9: 0.1315}
    assert got[0.5] == DEMO["sparsity"] and DEMO["mlp_budget"] == 0.5  # the demo's constant, by the same rule
    for b, s in got.items():
        assert rank_for_budget(b, d, d_ff, n, s) == d
        assert rank_for_budget(b, d, d_ff, n, round(s - 0.0005, 6)) < d  # the smallest multiple of the step
    with pytest.raises(ValueError):
        q.square_u_sparsity(0.02, d, d_ff, n)  # even an empty V leaves no room for a square U


def test_square_u_sparsity_for_a_model_gives_square_u(q):
    from fips_rt.config import FipsConfig
    from fips_rt.fips import plan_groups
    lm = tiny_model("llama", layers=5)  # groups of 2: [0,1] [2,3] [4]
    for b in (0.5, 0.7):
        s = q.square_u_sparsity_for(lm.model, lm.adapter, b, 2)
        plans, _ = plan_groups(lm.model, lm.adapter, FipsConfig(mlp_budget=b, group_size=2, sparsity=s))
        assert [p.rank for p in plans[:2]] == [64, 64] and plans[2].rank < 64


# --------------------------------------------------------------------------- the preset end to end
def tiny_preset(q):
    S = dataclasses.replace(q.PRESETS["cpu"].settings, budgets=(0.5, 0.7), calib_batch=2, group_size=2,
                            refit_rounds=1, global_steps=2, distill_warmup=1)
    return dataclasses.replace(q.PRESETS["cpu"], settings=S, smoke=S,
                               lr_grid={m: (1e-4, 3e-4) if m != "deltallm" else (1e-3, 3e-3) for m in METHODS})


def context(q, S, split, seed):
    lm = tiny_model("llama", layers=12)
    g = torch.Generator().manual_seed(3)  # the same calibration rows for both splits
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(4)]
    g = torch.Generator().manual_seed(seed)
    ev = {k: [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)}] for k in ("windows", "ood_windows")}
    ctx = q.Context("smollm2", lm, calib, ev, S, split, torch.device("cpu"), log=lambda *a: None)
    ctx.dense = count_model(lm.model, lm.adapter)
    return ctx


def saved_rows(path: Path) -> list[dict]:
    return json.loads(path.with_suffix(".json").read_text())["rows"]


def test_preset_select_lr_then_test_run_resume(q, tmp_path, monkeypatch):
    P = tiny_preset(q)
    S = P.settings
    lr_out, out = tmp_path / "quality_smollm2_cpu_lr", tmp_path / "quality_smollm2_cpu"
    lr_path = lr_out.with_suffix(".json")
    written = []  # rows in the JSON each time the outputs are written
    real_write = q.write_outputs

    def spy(result, path, figure=True):
        real_write(result, path, figure)
        written.append(len(saved_rows(path)))
    monkeypatch.setattr(q, "write_outputs", spy)

    # 1. --select-lr: each method's grid at one budget on the validation split
    vctx = context(q, S, "validation", seed=5)
    jobs, lr_meta = q.preset_jobs(vctx, P, METHODS, [0.7], True, lr_path)
    assert [(j.method, j.budget, j.tag) for j in jobs] == [
        (m, 0.7, f"lr={lr:g}") for m in METHODS for lr in P.lr_grid[m]]
    assert lr_meta == {"lr_budget": 0.7, "lr_grid": {m: list(P.lr_grid[m]) for m in METHODS}}
    meta = {"preset": "cpu", "command": "python benchmarks/quality.py --preset cpu --select-lr", **lr_meta}
    res = q.run(vctx, METHODS, [0.7], lr_out, resume=True, meta=meta, jobs=jobs, figure_each=True)
    rows = res["rows"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert written == list(range(1, 2 + len(jobs))) + [1 + len(jobs)]  # one more row in the file per run
    assert [(r["method"], r["lr"]) for r in rows[1:]] == [(m, lr) for m in METHODS for lr in P.lr_grid[m]]
    fields = {"fips-global": "global_lr", "svd-global": "svd_lr", "drop-heal": "heal_lr", "deltallm": "delta_lr"}
    for r in rows[1:]:
        assert r["lr_field"] == fields[r["method"]] and r["split"] == "validation" and r["lr_source"] == "grid"
        assert r["settings"][r["lr_field"]] == r["lr"]
        if r["method"] == "deltallm":  # its block parameters' rate follows the grid's (Method.lr_follow)
            assert r["settings"]["delta_block_lr"] == pytest.approx(r["lr"] / 10, rel=1e-9)
        assert {"ood_ppl", "ood_ppl_ratio", "machine_load", "cpu_seconds"} <= set(r)
    for ext in (".json", ".md", ".png"):
        assert lr_out.with_suffix(ext).is_file()
    assert "(best)" in lr_out.with_suffix(".md").read_text()

    # make the larger LR the winner of fips-global and drop-heal by its wiki-validation ratio
    data = json.loads(lr_path.read_text())
    for r in data["rows"]:
        if r["method"] in ("fips-global", "drop-heal"):
            r["ppl_ratio"] = 1.5 if r["lr"] == 3e-4 else 2.0
        elif r["method"] in ("svd-global", "deltallm"):
            r["ppl_ratio"] = 1.5 if r["lr"] in (1e-4, 1e-3) else 2.0
    lr_path.write_text(json.dumps(data))

    # 2. the test-split run takes each method's best LR from that file
    ctx = context(q, S, "test", seed=7)
    lrs = q.chosen_lrs(ctx, P, lr_path, METHODS)
    assert {m: v["lr"] for m, v in lrs.items()} == {"fips-global": 3e-4, "svd-global": 1e-4, "drop-heal": 3e-4,
                                                     "deltallm": 1e-3}
    assert all("lowest wiki-validation ratio" in v["source"] and lr_path.name in v["source"] for v in lrs.values())
    jobs, lr_meta = q.preset_jobs(ctx, P, METHODS, [0.5, 0.7], False, lr_path)
    assert [(j.method, j.budget) for j in jobs] == [(m, b) for b in (0.5, 0.7) for m in METHODS]  # 0.5 first
    meta = {"preset": "cpu", "command": "python benchmarks/quality.py --preset cpu", **lr_meta}

    # ended during the fourth row: the rows before it are in the file
    built = []
    real = dict(q.METHODS)

    def stop_at(n):
        for name, m in real.items():
            def build(c, b, name=name, m=m):
                built.append((name, b))
                if len(built) == n:
                    raise KeyboardInterrupt
                return m.build(c, b)
            monkeypatch.setitem(q.METHODS, name, dataclasses.replace(m, build=build))
    stop_at(4)
    with pytest.raises(KeyboardInterrupt):
        q.run(ctx, METHODS, [0.5, 0.7], out, resume=True, meta=meta, jobs=jobs, figure_each=True)
    assert [r["method"] for r in saved_rows(out)] == ["dense", "fips-global", "svd-global", "drop-heal"]

    # rerun: resumes at the fourth row
    built.clear()
    stop_at(0)
    res = q.run(ctx, METHODS, [0.5, 0.7], out, resume=True, meta=meta, jobs=jobs, figure_each=True)
    assert built == [("deltallm", 0.5)] + [(m, 0.7) for m in METHODS]
    rows = res["rows"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert [(r["method"], r["budget"]) for r in rows] == [("dense", 1.0)] + [(m, b) for b in (0.5, 0.7)
                                                                            for m in METHODS]
    dense = rows[0]
    assert dense["ppl_ratio"] == 1.0 and dense["ood_ppl_ratio"] == 1.0 and dense["params"] == ctx.dense["params"]
    by = {(r["method"], r["budget"]): r for r in rows}
    for b in (0.5, 0.7):
        fips = by[("fips-global", b)]
        assert fips["details"]["sparsity"] == q.square_u_sparsity_for(ctx.base.model, ctx.adapter, b, 2)
        assert fips["details"]["ranks"][-1] == 64  # the full groups: rank d
        assert fips["params"] == q.fips_params(ctx, b)
        assert fips["settings"]["config"]["refit"] == "after" and fips["settings"]["config"]["steps"] == 0
        tb = fips["params"] / ctx.dense["params"]
        assert by[("deltallm", b)]["details"]["target_model_budget"] == pytest.approx(tb)
        assert by[("drop-heal", b)]["model_budget"] <= tb + 1e-9
        for m in METHODS:
            r = by[(m, b)]
            assert r["lr"] == lrs[m]["lr"] and r["lr_source"] == lrs[m]["source"] and r["split"] == "test"
            assert r["ppl_ratio"] == pytest.approx(r["ppl"] / dense["ppl"])
            assert r["ood_ppl_ratio"] == pytest.approx(r["ood_ppl"] / dense["ood_ppl"])
        assert len(by[("svd-global", b)]["details"]["global"]["losses"]) == 2  # the same steps as fips-global
        assert by[("drop-heal", b)]["details"]["heal"]["steps"] == 2
    md = out.with_suffix(".md").read_text()
    assert "| method | MLP budget | LR | params | params / dense | wiki test ppl | wiki ratio | WordNet ppl |" in md
    assert "python benchmarks/quality.py --preset cpu`" in md and "(selected)" in md
    assert out.with_suffix(".png").is_file()

    # the same command again: nothing is rebuilt
    built.clear()
    q.run(ctx, METHODS, [0.5, 0.7], out, resume=True, meta=meta, jobs=jobs)
    assert built == []

    # another LR wins for drop-heal: exactly its rows are rerun, with the new LR
    data = json.loads(lr_path.read_text())
    for r in data["rows"]:
        if r["method"] == "drop-heal":
            r["ppl_ratio"] = 1.5 if r["lr"] == 1e-4 else 2.0
    lr_path.write_text(json.dumps(data))
    jobs, lr_meta = q.preset_jobs(ctx, P, METHODS, [0.5, 0.7], False, lr_path)
    res = q.run(ctx, METHODS, [0.5, 0.7], out, resume=True, meta={**meta, **lr_meta}, jobs=jobs)
    assert built == [("drop-heal", 0.5), ("drop-heal", 0.7)]
    assert [r["lr"] for r in res["rows"] if r["method"] == "drop-heal"] == [1e-4, 1e-4]

    # an incomplete grid (or rows made with other settings) leaves the default
    data["rows"] = [r for r in data["rows"] if not (r["method"] == "deltallm" and r["lr"] == 3e-3)]
    for r in data["rows"]:
        if r["method"] == "svd-global":
            r["settings"]["global_steps"] = 99
    lr_path.write_text(json.dumps(data))
    lrs = q.chosen_lrs(ctx, P, lr_path, METHODS)
    assert lrs["deltallm"]["lr"] == S.delta_lr and "1 of the 2 grid LRs" in lrs["deltallm"]["source"]
    assert lrs["svd-global"]["lr"] == S.svd_lr and "0 of the 2" in lrs["svd-global"]["source"]
    assert lrs["fips-global"]["lr"] == 3e-4
    lr_path.unlink()
    assert all(v["source"].startswith("the default (no ") for v in q.chosen_lrs(ctx, P, lr_path, METHODS).values())


def test_plot_only_redraws_md_and_png(q, tmp_path):
    P = tiny_preset(q)
    ctx = context(q, dataclasses.replace(P.settings, budgets=(0.5,)), "test", seed=7)
    out = tmp_path / "quality_smollm2_cpu"
    jobs, lr_meta = q.preset_jobs(ctx, P, ["fips-global"], [0.5], False, tmp_path / "none_lr.json")
    q.run(ctx, ["fips-global"], [0.5], out, resume=True, meta={"preset": "cpu", **lr_meta}, jobs=jobs)
    for ext in (".md", ".png"):
        out.with_suffix(ext).unlink()
    assert q.main(["--preset", "cpu", "--plot-only", "--out-dir", str(tmp_path)]) == 0
    assert out.with_suffix(".png").is_file() and "(default)" in out.with_suffix(".md").read_text()
    assert q.main(["--preset", "cpu", "--select-lr", "--plot-only", "--out-dir", str(tmp_path)]) == 1  # no LR file


# --------------------------------------------------------------------------- the LR grid grows past an edge
def test_next_grid_lr_steps_past_the_edge_only(q):
    r = {3e-5: 2.0, 1e-4: 1.7, 3e-4: 1.6}
    assert q.next_grid_lr([3e-5, 1e-4, 3e-4], r) == pytest.approx(9e-4)  # best at the top: one step up
    r = {3e-4: 1.2, 1e-3: 1.5, 3e-3: 1.9}
    assert q.next_grid_lr([3e-4, 1e-3, 3e-3], r) == pytest.approx(9e-5)  # best at the bottom: one step down
    assert q.next_grid_lr([3e-5, 1e-4, 3e-4], {3e-5: 2.0, 1e-4: 1.5, 3e-4: 1.6}) is None  # bracketed
    assert q.next_grid_lr([3e-5, 1e-4, 3e-4], {3e-5: 2.0, 3e-4: 1.6}) is None  # a grid row still missing
    assert q.next_grid_lr([1e-4], {1e-4: 1.0}) is None
    # at most max_extra LRs beyond the preset's grid
    base = (3e-5, 1e-4, 3e-4)
    grown = [3e-5, 1e-4, 3e-4, 9e-4, 2.7e-3]
    ratios = {lr: 3.0 - i * 0.1 for i, lr in enumerate(grown)}
    assert q.next_grid_lr(grown, ratios, base, max_extra=2) is None
    assert q.next_grid_lr(grown[:4], ratios, base, max_extra=2) == pytest.approx(2.7e-3)


def test_chosen_lrs_reads_the_grid_the_file_records(q, tmp_path):
    """An LR that --select-lr added past the edge counts once it is in the file's lr_grid, and must be there."""
    P = tiny_preset(q)
    ctx = context(q, P.settings, "test", seed=7)
    m, f = "drop-heal", "heal_lr"
    vctx = dataclasses.replace(ctx, split="validation")
    rows = []
    for lr, ratio in ((1e-4, 2.0), (3e-4, 1.6), (9e-4, 1.4)):
        sctx = dataclasses.replace(vctx, S=dataclasses.replace(ctx.S, **{f: lr}))
        rows.append({"method": m, "budget": 0.7, "lr": lr, "ppl_ratio": ratio,
                     "settings": q.row_settings(sctx, m, 0.7)})
    path = tmp_path / "lr.json"
    path.write_text(json.dumps({"lr_budget": 0.7, "lr_grid": {m: [1e-4, 3e-4, 9e-4]}, "rows": rows}))
    assert q.chosen_lrs(ctx, P, path, [m])[m]["lr"] == 9e-4
    path.write_text(json.dumps({"lr_budget": 0.7, "lr_grid": {m: [1e-4, 3e-4]}, "rows": rows}))
    assert q.chosen_lrs(ctx, P, path, [m])[m]["lr"] == 3e-4  # 9e-4 is not part of the recorded grid
