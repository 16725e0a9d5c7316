"""Memory-bounded compression (issue 16): block-by-block onloading, exact streamed selection, resume,
activation offload and the up-front refusal; tiny random Llama folders with SmolLM2's tokenizer."""
from __future__ import annotations

import pytest
import torch

from fips_rt.config import FipsConfig
from fips_rt.errors import FipsError
from fips_rt.selection import magnitude_masks
from fips_rt.sparsity import global_magnitude_masks


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fips_rt.models import random_llama_folder
    return random_llama_folder(tmp_path_factory.mktemp("llama") / "tiny", "tiny", shard_bytes=1 << 20)


def _tensors(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)["tensors"]


def _streamed(folder, cfg, out, **kw):
    from fips_rt.cli import run_compress_streamed
    return run_compress_streamed(str(folder), cfg, out, calib_tokens=512, seq_len=128, progress=False, **kw)


CFG = dict(mlp_budget=0.5, group_size=2, sparsity=0.75, steps=3, batch_tokens=128, refit="after")


def test_selection_equals_global_magnitude_masks():
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        ts = [torch.randn(int(torch.randint(1, 40, (1,), generator=g)), 17, generator=g).abs() for _ in range(3)]
        if trial % 2:
            ts = [torch.round(t * 2) / 2 for t in ts]  # many ties at the threshold
            ts[0] = ts[0].masked_fill(ts[0] > 1, -1.0)
        total = sum(t.numel() for t in ts)
        for keep in (0, 1, total // 3, total - 1, total):
            a, b = global_magnitude_masks(ts, keep), magnitude_masks(ts, keep)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            assert sum(int(m.sum()) for m in b) == keep


def test_streamed_equals_in_memory_and_loads(folder, tmp_path):
    """Block by block (sharded safetensors, activations offloaded) gives the in-memory engine's tensors."""
    from fips_rt.checkpoint import load_checkpoint
    from fips_rt.cli import run_compress
    cfg = FipsConfig(**CFG, activation_memory_gb=0.0)  # 0: every layer's activations go to the state folder
    s = _streamed(folder, cfg, tmp_path / "s.pt")
    run_compress(str(folder), FipsConfig(**CFG), tmp_path / "m.pt", calib_tokens=512, seq_len=128, progress=False)
    a, b = _tensors(tmp_path / "s.pt"), _tensors(tmp_path / "m.pt")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert s["peak_rss"] > 0 and set(s["phases"]) >= {"statistics", "init", "local", "checkpoint write"}
    assert s["mlp_ratio"] == pytest.approx(0.5, abs=0.02)
    lm = load_checkpoint(tmp_path / "s.pt")
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(lm.model(input_ids=ids).logits).all()
    assert not (tmp_path / "s.pt.state").exists()


def test_streamed_resume_after_interruption(folder, tmp_path, monkeypatch):
    import fips_rt.streamed as S
    cfg = FipsConfig(**CFG)
    _streamed(folder, cfg, tmp_path / "ref.pt")
    real, calls = S._pack_group, []

    def dying(*a, **k):
        if calls:
            raise KeyboardInterrupt  # killed while group 1 trains
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(S, "_pack_group", dying)
    with pytest.raises(KeyboardInterrupt):
        _streamed(folder, cfg, tmp_path / "r.pt")
    assert (tmp_path / "r.pt.state" / "group_000.pt").is_file()
    monkeypatch.setattr(S, "_pack_group", real)
    with pytest.raises(FipsError, match="other settings"):  # the state of a run with other settings is refused
        _streamed(folder, FipsConfig(**dict(CFG, steps=2)), tmp_path / "r.pt", resume=True)
    _streamed(folder, cfg, tmp_path / "r.pt", resume=True)
    a, b = _tensors(tmp_path / "ref.pt"), _tensors(tmp_path / "r.pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_refused_up_front_when_memory_cannot_fit(folder, tmp_path, monkeypatch):
    import fips_rt.streamed as S
    monkeypatch.setattr(S, "mem_available", lambda: 64 << 20)
    with pytest.raises(FipsError, match=r"needs about .* but only 0.06 GiB is available"):
        _streamed(folder, FipsConfig(**CFG), tmp_path / "n.pt")
    assert not (tmp_path / "n.pt").exists()


def test_cli_onload_errors(folder, tmp_path):
    from click.testing import CliRunner

    from fips_rt.cli import cli
    r = CliRunner().invoke(cli, ["compress", str(folder), "--onload", "on", "--eval-tokens", "64", "--out",
                                 str(tmp_path / "e.pt")])
    assert r.exit_code != 0 and "fips eval" in str(r.exception)
    r = CliRunner().invoke(cli, ["compress", str(tmp_path), "--onload", "on", "--out", str(tmp_path / "e.pt")])
    assert r.exit_code != 0


def test_mismatched_shapes_are_refused(folder, tmp_path):
    """A config.json whose shapes disagree with the safetensors is one error line, not a traceback."""
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FipsError, match="has shape"):
        _streamed(bad, FipsConfig(**CFG), tmp_path / "b.pt")
