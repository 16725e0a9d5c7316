"""A ``model.pt`` is hostile until checked (issue 10): crafted files for every attack class, seeded
mutations, the files an earlier release wrote, and the temporaries of killed exports.

Every crafted or mutated file is re-sealed with a recomputed checksum (``checkpoint._seal``), as an
attacker would, so the loader's own checks are what is tested. The mutation engine and the crafted
cases live in benchmarks/fuzz_checkpoints.py (its full run adds crash and hang detection).
"""
from __future__ import annotations

import builtins
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fips_rt import checkpoint_schema as S
from fips_rt.adapters import get_submodule, set_submodule
from fips_rt.checkpoint import load_checkpoint, read_header, save_checkpoint
from fips_rt.errors import CheckpointError, FipsError
from fips_rt.sparse_format import pack_mask, packed_mask_problem, unpack, unpack_mask
from fips_rt.tempfiles import owner_pid, remove_stale_temporaries, stale_temporaries

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
BIN = Path(sys.executable).parent


def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_checkpoints", ROOT / "benchmarks" / "fuzz_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = _fuzz()


def _craft(tmp_path, fixture: str, change, name: str = "crafted.pt") -> Path:
    obj = F.load_raw(FIXTURES / f"{fixture}.pt")
    obj = change(obj) or obj
    return F.write_sealed(obj, tmp_path / name)


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _outputs(lm, x):
    with torch.no_grad():
        return lm.model(x).numpy() if lm.kind == "vit" else lm.model(input_ids=x).logits.numpy()


# ------------------------------------------------------------------------ no over-refusal
@pytest.mark.parametrize("name", F.FIXTURE_NAMES)
def test_files_written_by_the_previous_release_load_and_give_the_same_outputs(name):
    lm = load_checkpoint(FIXTURES / f"{name}.pt")
    ref = np.load(FIXTURES / f"{name}.npz")
    np.testing.assert_allclose(_outputs(lm, torch.from_numpy(ref["input"])), ref["output"], atol=1e-5, rtol=0)
    if name == "tiny_llama_fips":
        assert lm.tokenizer is not None and lm.tokenizer("w3 w4 w255")["input_ids"][-3:] == [3, 4, 255]
    assert read_header(FIXTURES / f"{name}.pt")["method"] == lm.extra["checkpoint_header"]["method"]


def test_a_fresh_roundtrip_still_loads(tmp_path):
    from fips_rt.testing import tiny_model
    lm = tiny_model("swin", layers=2)  # timm kwargs with per-stage lists
    path = save_checkpoint(tmp_path / "swin.pt", lm, "dense", {})
    back = load_checkpoint(path)
    x = torch.randn(1, 3, 32, 32)
    assert np.abs(_outputs(lm, x) - _outputs(back, x)).max() <= 1e-5


# ------------------------------------------------------------------------ crafted classes
def test_every_crafted_attack_gets_its_expected_outcome(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("the loader prompted"))
    cases = F.crafted(tmp_path)
    assert len(cases) >= 50
    got = {c["id"]: F.run_case(c) for c in cases}
    wrong = {k: v for k, v in got.items() if v["outcome"] != next(c["expect"] for c in cases if c["id"] == k)}
    assert not wrong
    for c in cases:
        if got[c["id"]]["outcome"] == "refused":
            assert got[c["id"]]["message"].startswith(c["file"])  # names the file, then the entry
    assert not marker.exists()


def test_code_shipped_in_tokenizer_files_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("the loader prompted"))

    def evil(o):
        cfg = json.loads(o["tokenizer_files"]["tokenizer_config.json"])
        cfg.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
        o["tokenizer_files"]["tokenizer_config.json"] = json.dumps(cfg).encode()
        o["tokenizer_files"]["evil.py"] = F.EVIL_PY.replace("{env}", F.MARKER_ENV).encode()
    msg = _refusal(_craft(tmp_path, "tiny_llama_fips", evil))
    assert "tokenizer_files['evil.py']" in msg
    # the same code under an allowed name is only text; auto_map is dropped, never honoured
    def disguised(o):
        evil(o)
        o["tokenizer_files"]["chat_template.jinja"] = o["tokenizer_files"].pop("evil.py")
    assert "tokenizer_class" in _refusal(_craft(tmp_path, "tiny_llama_fips", disguised, "d.pt"))
    assert not marker.exists()


def test_a_user_folder_with_remote_code_is_not_run(tmp_path, monkeypatch):
    from fips_rt.models import load_model
    from fips_rt.testing import tiny_model
    marker = tmp_path / "marker"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("the loader prompted"))
    folder = tmp_path / "hf"
    lm = tiny_model("llama", layers=2)
    lm.model.save_pretrained(folder)
    tok = F.load_raw(FIXTURES / "tiny_llama_fips.pt")["tokenizer_files"]
    for name, data in tok.items():
        (folder / name).write_bytes(data)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(conf))
    (folder / "evil.py").write_text(F.EVIL_PY.replace("{env}", F.MARKER_ENV))
    try:
        load_model(str(folder))
    except FipsError:
        pass
    assert not marker.exists()


def test_a_dunder_path_changes_no_class(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaMLP

    from fips_rt.testing import tiny_model
    forward = LlamaMLP.forward
    dense = tiny_model("llama", layers=2)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    before = _outputs(dense, ids)
    for i, path in enumerate(("model.layers.0.mlp.__class__.forward", "model.layers.0.mlp.__class__",
                              "model.layers.0.mlp.forward", "model.__dict__")):
        def change(o, p=path):
            o["header"]["structure"]["fips_linears"][0]["path"] = p
        assert "fips_linears[0].path" in _refusal(_craft(tmp_path, "tiny_llama_fips", change, f"{i}.pt"))
    assert LlamaMLP.forward is forward
    assert np.array_equal(_outputs(dense, ids), before)
    # the module helpers walk registered children only
    for bad in ("model.layers.0.mlp.__class__", "model.layers.0.mlp.forward", "model.layers.9", "model..norm"):
        with pytest.raises(FipsError):
            get_submodule(dense.model, bad)
    with pytest.raises(FipsError):
        set_submodule(dense.model, "model.layers.0.mlp.__class__.forward", torch.nn.Identity())
    with pytest.raises(FipsError):
        set_submodule(dense.model, "model.layers.0.mlp.extra", torch.nn.Identity())
    assert LlamaMLP.forward is forward


def test_a_huge_vocabulary_is_refused_before_any_allocation(tmp_path):
    huge = _craft(tmp_path, "tiny_qwen2_dense",
                  lambda o: o["header"]["source"]["config"].__setitem__("vocab_size", 10 ** 12), "huge.pt")
    assert "source.config.vocab_size" in _refusal(huge)
    # 2**24 x 64 fp32, embedding and head: 8 GiB if anything were built from the config
    big = _craft(tmp_path, "tiny_qwen2_dense",
                 lambda o: o["header"]["source"]["config"].__setitem__("vocab_size", 2 ** 24), "big.pt")
    assert big.stat().st_size < 600_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, this process's high-water mark
    assert "model.embed_tokens.weight" in _refusal(big)
    # building it would have touched 8 GiB: the high-water mark would have moved by that much
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024


def test_masks_are_never_padded_or_cut():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 7)) < 0.5  # 35 bits: 5 bytes, 5 padding bits
    packed = pack_mask(mask)
    assert packed_mask_problem(packed, (5, 7)) is None
    assert np.array_equal(unpack_mask(packed, (5, 7)), mask)
    for bad, why in ((packed[:-1], "bytes"), (np.concatenate([packed, [0]]).astype(np.uint8), "bytes"),
                     (packed.astype(np.int16), "uint8"), (packed.reshape(1, -1), "1-D")):
        with pytest.raises(ValueError, match=why):
            unpack_mask(bad, (5, 7))
    padded = packed.copy()
    padded[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        unpack_mask(padded, (5, 7))
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    with pytest.raises(ValueError):
        unpack(values[:-1], packed, (5, 7))


def test_refusals_are_one_line_and_exit_2_on_the_command_line(tmp_path):
    dunder = _craft(tmp_path, "tiny_llama_fips", lambda o: o["header"]["structure"]["fips_linears"][0].__setitem__(
        "path", "model.layers.0.mlp.__class__.forward"), "dunder.pt")
    header = _craft(tmp_path, "tiny_llama_fips", lambda o: o.__setitem__("header", [1, 2]), "header.pt")
    for cmd in ([str(BIN / "fips"), "info", str(dunder)], [str(BIN / "fips"), "eval", str(header)],
                [str(BIN / "fips-export"), str(dunder), "-o", str(tmp_path / "m.onnx")]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
        assert "fips_linears[0].path" in out.stderr or "header" in out.stderr
    assert not (tmp_path / "m.onnx").exists()


class Payload:
    """Unpickling this would import and build an arbitrary class: weights_only refuses it."""


def test_objects_other_than_tensors_are_refused_without_passing_on_torch_advice(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"format": "fips-rt", "format_version": 1, "x": Payload()}, path)
    from fips_rt.checkpoint import _seal
    _seal(path)
    msg = _refusal(path)
    assert "plain-tensor" in msg and "weights_only" not in msg and "False" not in msg


def test_compressed_archive_members_are_refused(tmp_path):
    src = FIXTURES / "tiny_qwen2_dense.pt"
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    from fips_rt.checkpoint import _seal
    _seal(path)
    assert "compressed" in _refusal(path)


# ------------------------------------------------------------------------ schema pieces
def test_schema_checks_name_the_entry():
    with pytest.raises(CheckpointError, match=r"header.config.x\[0\]: has type bytes"):
        S.check_header({"method": "fips", "config": {"x": [b"1"]}, "source": {}, "structure": {}})
    with pytest.raises(CheckpointError, match="header.method"):
        S.check_header({"method": "fips\n", "config": {}, "source": {}, "structure": {}})
    with pytest.raises(CheckpointError, match="source.kwargs.depth"):
        S.check_timm_source({"name": "deit_tiny_patch16_224", "kwargs": {"depth": True}}, {"deit_tiny_patch16_224"})
    assert S.check_timm_source({"name": "n", "kwargs": {"depths": [2, 2], "num_heads": [2, 4]}}, {"n"}) == \
        {"depths": (2, 2), "num_heads": (2, 4)}
    assert S.fips_expectations("in", (128, 64), 54) == {"U": (64, 54), "V": (54, 128), "mask": (864,), "bias": (128,)}
    assert S.fips_expectations("out", (64, 128), 54)["U"] == (64, 54)
    assert S.delta_expectations((128, 64), 4) == {"shared": (128, 64), "A": (128, 4), "B": (4, 64), "bias": (128,)}
    cleaned = S.check_tokenizer_files({"tokenizer_config.json": json.dumps(
        {"auto_map": {"AutoTokenizer": ["x.Y", None]}, "vocab_file": "/etc/passwd", "unk_token": "<unk>"}).encode()})
    assert json.loads(cleaned["tokenizer_config.json"]) == {"unk_token": "<unk>"}
    with pytest.raises(CheckpointError, match=r"tokenizer_files\['x.py'\]"):
        S.check_tokenizer_files({"x.py": b""})


# ------------------------------------------------------------------------ seeded mutations
class _Hang(Exception):
    pass


def test_seeded_mutations_are_refused_in_one_line_or_load_and_run(tmp_path):
    cases = F.mutation_cases(120, seed=1, out_dir=tmp_path)

    def alarm(*_):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, alarm)
    bad, counts = [], {}
    try:
        for case in cases:
            signal.alarm(30)
            try:
                res = F.run_case(case)
            except _Hang:
                res = {"outcome": "hang", "message": ""}
            finally:
                signal.alarm(0)
            counts[res["outcome"]] = counts.get(res["outcome"], 0) + 1
            if res["outcome"] not in ("accepted", "refused"):
                bad.append((case["id"], case["mutation"], res["outcome"], res["message"]))
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not bad
    assert counts.get("refused", 0) > 50 and counts.get("accepted", 0) > 10  # both paths exercised


# ------------------------------------------------------------------------ temporaries of killed runs
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    from fips_rt.exporter import export

    from fips_rt.testing import tiny_model
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "m.onnx"
        stale = [tmp_path / f".m.onnx.tmp-{dead}", tmp_path / f".m.onnx.build-{dead}-abc123"]
        for d in stale:
            d.mkdir()
            (d / "m.onnx").write_bytes(b"partial")
        kept = tmp_path / f".m.onnx.tmp-{live.pid}"  # a run still writing
        kept.mkdir()
        other = tmp_path / f".other.onnx.tmp-{dead}"  # another output's
        other.mkdir()
        assert owner_pid(stale[1].name, "m.onnx") == dead and owner_pid(other.name, "m.onnx") is None
        assert stale_temporaries(out) == sorted(stale)
        export(tiny_model("llama", layers=2), out, verify=False)
        assert out.is_file() and not any(d.exists() for d in stale)
        assert kept.is_dir() and other.is_dir()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx.") and p != kept]
        ckpt_tmp = tmp_path / f".model.pt.tmp-{dead}"
        ckpt_tmp.write_bytes(b"partial")
        save_checkpoint(tmp_path / "model.pt", tiny_model("llama", layers=2), "dense", {})
        assert not ckpt_tmp.exists() and (tmp_path / "model.pt").is_file()
        assert remove_stale_temporaries(out) == []
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------ real models
@pytest.mark.real
def test_a_real_encoder_checkpoint_with_its_tokenizer_files_loads(tmp_path):
    """all-MiniLM-L6-v2 (BERT WordPiece tokenizer files): no over-refusal of a real tokenizer."""
    from fips_rt import FipsConfig, compress_
    from fips_rt.data import encoder_batches
    from fips_rt.models import load_model
    lm = load_model("minilm-l6")
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today.", "Ein Hund läuft im Park."]
    compress_(lm, FipsConfig(mlp_budget=0.5, group_size=3, sparsity=0.5, steps=0), encoder_batches(lm.tokenizer, texts),
              log=lambda *a: None)
    back = load_checkpoint(save_checkpoint(tmp_path / "minilm.pt", lm, "fips", {}))
    batch = encoder_batches(back.tokenizer, texts)[0]
    assert batch["input_ids"].tolist() == encoder_batches(lm.tokenizer, texts)[0]["input_ids"].tolist()
    with torch.no_grad():
        a = lm.model(**batch).last_hidden_state
        b = back.model(**batch).last_hidden_state
    assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.real
def test_the_demo_checkpoint_loads_when_present():
    """The SmolLM2 demo checkpoint (``fips demo``) written by an earlier release, if one is named by
    FIPS_DEMO_CHECKPOINT: loads under the hardened loader and gives the logits recorded beside it
    (``<checkpoint>.logits.npz`` with ``ids`` and ``logits``, when present)."""
    path = os.environ.get("FIPS_DEMO_CHECKPOINT")
    if not path or not Path(path).is_file():
        pytest.skip("FIPS_DEMO_CHECKPOINT does not name a demo checkpoint")
    lm = load_checkpoint(path)
    assert lm.adapter.family == "llama" and lm.tokenizer is not None
    ref = Path(path + ".logits.npz")
    if ref.is_file():
        r = np.load(ref)
        with torch.no_grad():
            y = lm.model(input_ids=torch.from_numpy(r["ids"])).logits.numpy()
        # the reference may come from another torch thread count (other summation order): up to ~1e-4
        # apart on logits of magnitude ~30 (the same thread count gives identical logits)
        np.testing.assert_allclose(y, r["logits"], atol=5e-4, rtol=0)
