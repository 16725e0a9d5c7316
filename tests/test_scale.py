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


def _dies_on_second_call(fn):
    """``fn`` wrapped to raise KeyboardInterrupt (a killed run) from its second call on."""
    calls = []

    def wrapped(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return fn(*a, **k)
    return wrapped


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
    real = S._pack_group
    monkeypatch.setattr(S, "_pack_group", _dies_on_second_call(real))  # killed while group 1 trains
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


INIT_ONLY = {"mlp_budget": 0.5, "group_size": 2, "sparsity": 0.75, "steps": 0, "refit": "after"}


def test_compact_state_resume_gives_the_same_checkpoint(folder, tmp_path, monkeypatch):
    """Without local steps each group's init waits for the allocation compact (kept-candidate values +
    packed bitmask); a finished group's init is deleted; resuming from that state (killed in the init
    phase, or in the local phase) gives the uninterrupted run's tensors, which are the in-memory engine's."""
    import fips_rt.streamed as S
    from fips_rt.cli import run_compress
    cfg = FipsConfig(**INIT_ONLY)
    _streamed(folder, cfg, tmp_path / "ref.pt")
    run_compress(str(folder), cfg, tmp_path / "m.pt", calib_tokens=512, seq_len=128, progress=False)
    ref = _tensors(tmp_path / "ref.pt")
    m = _tensors(tmp_path / "m.pt")
    assert set(ref) == set(m) and all(torch.equal(ref[k], m[k]) for k in ref)

    real_pack, real_init = S._pack_group, S.init_group
    monkeypatch.setattr(S, "_pack_group", _dies_on_second_call(real_pack))  # killed while group 1 is refitted
    with pytest.raises(KeyboardInterrupt):
        _streamed(folder, cfg, tmp_path / "r.pt")
    st = tmp_path / "r.pt.state"
    assert (st / "group_000.pt").is_file() and not (st / "init_000.pt").exists()  # the group supersedes its init
    assert (st / "threshold.json").is_file()
    ini = torch.load(str(st / "init_001.pt"), weights_only=True)
    assert "V" not in ini and ini["values"] and ini["masks"][0].dtype == torch.uint8  # compact
    dense_bytes = sum(s[0] * s[1] * 4 for s in ini["shapes"])
    assert sum(v.numel() * 4 + m.numel() for v, m in zip(ini["values"], ini["masks"])) < dense_bytes
    assert not list(st.glob(".*.tmp"))
    monkeypatch.setattr(S, "_pack_group", real_pack)
    _streamed(folder, cfg, tmp_path / "r.pt", resume=True)
    got = _tensors(tmp_path / "r.pt")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not st.exists()  # removed once the checkpoint is written

    monkeypatch.setattr(S, "init_group", _dies_on_second_call(real_init))  # killed during the second group's init
    with pytest.raises(KeyboardInterrupt):
        _streamed(folder, cfg, tmp_path / "i.pt")
    assert (tmp_path / "i.pt.state" / "init_000.pt").is_file()
    monkeypatch.setattr(S, "init_group", real_init)
    _streamed(folder, cfg, tmp_path / "i.pt", resume=True, keep_state=True)
    got = _tensors(tmp_path / "i.pt")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    kept = tmp_path / "i.pt.state"  # --keep-state: the finished groups stay, the inits are gone
    assert sorted(f.name for f in kept.glob("*.pt")) == ["group_000.pt", "group_001.pt"]


def test_refused_up_front_when_disk_cannot_fit(folder, tmp_path, monkeypatch):
    import fips_rt.streamed as S
    from fips_rt.cli import run_compress
    monkeypatch.setattr(S, "disk_free", lambda path: 1 << 20)
    with pytest.raises(FipsError, match=r"needs about .* of disk \(state folder: .*checkpoint .*\) but only "
                                        r"0.00 GiB is free"):
        _streamed(folder, FipsConfig(**INIT_ONLY), tmp_path / "d.pt")
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "d.pt.state").exists()
    with pytest.raises(FipsError, match=r"needs about .* of disk .* but only 0.00 GiB is free"):  # in memory too
        run_compress(str(folder), FipsConfig(**INIT_ONLY), tmp_path / "d.pt", calib_tokens=512, seq_len=128,
                     progress=False)
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.parametrize("kind", ["oserror", "zipwriter"])
def test_full_disk_is_one_error_line(folder, tmp_path, monkeypatch, capsys, kind):
    """ENOSPC in the middle of the run (here: writing the second group's init) is one error line and a
    non-zero exit, no traceback; the half-written temporary is removed, the finished state stays."""
    import errno

    import fips_rt.streamed as S
    from fips_rt.cli import _run, cli
    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(str(f))
        if len(calls) == 2:
            with open(f, "wb") as h:
                h.write(b"partial")
            if kind == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1856568832 vs 1856568720")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(S.torch, "save", full)
    out = tmp_path / "f.pt"
    with pytest.raises(SystemExit) as e:
        _run(cli, ["compress", str(folder), "--onload", "on", "--mlp-budget", "0.5", "--group-size", "2", "--steps",
                   "0", "--calib-tokens", "512", "--seq-len", "128", "--quiet", "--out", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0])
    assert errors[0].startswith("error: the disk filled up while writing to") and "--resume" in errors[0]
    st = tmp_path / "f.pt.state"
    assert (st / "init_000.pt").is_file() and not list(st.glob(".*.tmp")) and not out.exists()
    monkeypatch.setattr(S.torch, "save", real)  # space freed: the run resumes
    with pytest.raises(SystemExit) as e:
        _run(cli, ["compress", str(folder), "--onload", "on", "--mlp-budget", "0.5", "--group-size", "2", "--steps",
                   "0", "--calib-tokens", "512", "--seq-len", "128", "--quiet", "--resume", "--out", str(out)])
    assert e.value.code == 0 and out.is_file()
