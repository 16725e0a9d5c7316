"""The ``fips`` command: bad input gives one clear line and a non-zero exit; happy paths on tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fips_rt.testing import tiny_model

FIPS = [sys.executable, "-c", "from fips_rt.cli import main; main()"]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(FIPS + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def one_line_error(p):
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) >= 1
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer
    from fips_rt.models import builtin_path
    gguf = builtin_path("smollm2-135m")  # the real SmolLM2 tokenizer, on a tiny random model
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    d = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", layers=4, vocab_size=len(tok), tokenizer=tok)
    lm.model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n\n".join(f"document {i} " + "word " * 300 for i in range(20)))
    return p


def test_help_lists_commands():
    p = run("--help")
    assert p.returncode == 0
    for c in ("compress", "eval", "info", "demo", "export", "bench", "serve"):
        assert c in p.stdout


def test_missing_model_path(tmp_path):
    line = one_line_error(run("compress", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pt")))
    assert "Model not found" in line


def test_unsupported_architecture(tmp_path):
    import transformers as T
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    line = one_line_error(run("compress", str(tmp_path / "gpt2"), "--out", str(tmp_path / "m.pt")))
    assert "Unsupported architecture GPT2" in line and "Supported:" in line


@pytest.mark.parametrize("flag,value", [("--mlp-budget", "1.5"), ("--mlp-budget", "0"), ("--model-budget", "1")])
def test_budget_outside_unit_interval(tiny_folder, tmp_path, flag, value):
    line = one_line_error(run("compress", str(tiny_folder), flag, value, "--out", str(tmp_path / "m.pt")))
    assert "range" in line or "between" in line


def test_group_larger_than_layers(tiny_folder, text_file, tmp_path):
    line = one_line_error(run("compress", str(tiny_folder), "--group-size", "8", "--calib", str(text_file),
                              "--out", str(tmp_path / "m.pt"), "--quiet"))
    assert "larger than the model's 4 layers" in line


def test_empty_calibration_file(tiny_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  ")
    line = one_line_error(run("compress", str(tiny_folder), "--calib", str(empty), "--out", str(tmp_path / "m.pt")))
    assert "contains no text" in line


def test_truncated_and_altered_checkpoint(tmp_path):
    from fips_rt import FipsConfig, compress_
    from fips_rt.checkpoint import save_checkpoint
    lm = tiny_model("llama", layers=2)
    compress_(lm, FipsConfig(group_size=2, steps=0, init="svd"), None, log=lambda *a: None)
    good = tmp_path / "good.pt"
    save_checkpoint(good, lm, "fips", {})
    data = good.read_bytes()
    assert run("info", str(good)).returncode == 0
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(run("info", str(trunc)))
    for pos in (len(data) // 3, 10, len(data) - 30):  # tensor bytes, zip header, end record
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p = tmp_path / f"bad{pos}.pt"
        p.write_bytes(bytes(bad))
        line = one_line_error(run("info", str(p)))
        assert "corrupted" in line or "truncated" in line


def test_compress_info_eval_on_tiny_folder(tiny_folder, text_file, tmp_path):
    out = tmp_path / "model.pt"
    p = run("compress", str(tiny_folder), "--mlp-budget", "0.5", "--group-size", "2", "--sparsity", "0.5",
            "--calib", str(text_file), "--calib-tokens", "512", "--seq-len", "64", "--steps", "5",
            "--init", "svd", "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "MLP parameters" in p.stdout and out.is_file()
    assert not Path(str(out) + ".state").exists()
    info = json.loads(run("info", str(out), "--json").stdout)
    for k in ("mlp_params_dense", "mlp_params", "params_dense", "params", "bytes", "bytes_dense"):
        assert isinstance(info[k], int)
    assert info["mlp_params"] <= 0.5 * info["mlp_params_dense"]
    p = run("eval", str(out), "--data", str(text_file), "--dense", str(tiny_folder), "--eval-tokens", "512",
            "--seq-len", "64", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["ppl"] > 1 and res["ppl_dense"] > 1 and res["ppl_ratio"] == pytest.approx(res["ppl"] / res["ppl_dense"])


def test_refuses_to_overwrite_input(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    line = one_line_error(run("compress", str(f), "--out", str(f)))
    assert "overwrite" in line or "not a model" in line


@pytest.mark.parametrize("args,flags", [
    (["--sparsity", "0.75"], ["--sparsity"]),  # explicit, even at its default value
    (["--group-size", "2", "--refit", "after"], ["--group-size", "--refit"]),
    (["--global-steps", "5", "--global-lr", "1e-3"], ["--global-steps", "--global-lr"]),
    (["--no-global-norms", "--teacher-forcing"], ["--global-norms/--no-global-norms", "--sequential/--teacher-forcing"]),
    (["--pruning", "rigl", "--batch-tokens", "64", "--onload", "off"], ["--pruning", "--batch-tokens", "--onload"]),
])
def test_deltallm_refuses_fips_only_options(tmp_path, args, flags):
    line = one_line_error(run("compress", str(tmp_path / "nope"), "--method", "deltallm", *args,
                              "--out", str(tmp_path / "m.pt")))
    assert line.startswith("error: ") and "FiPS-only" in line and "--method deltallm" in line
    for f in flags:
        assert f in line


@pytest.mark.parametrize("args,flags", [
    (["--layout", "alternating"], ["--layout"]),
    (["--residual-init", "zero", "--share-attention"], ["--residual-init", "--share-attention"]),
    (["--keep-first", "2", "--keep-last", "1", "--delta-rank", "4"], ["--keep-first", "--keep-last", "--delta-rank"]),
])
def test_fips_refuses_deltallm_only_options(tmp_path, args, flags):
    for method in ([], ["--method", "fips"]):
        line = one_line_error(run("compress", str(tmp_path / "nope"), *method, *args, "--out", str(tmp_path / "m.pt")))
        assert line.startswith("error: ") and "DeltaLLM-only" in line and "--method fips" in line
        for f in flags:
            assert f in line


def test_every_compress_option_belongs_to_both_methods_or_one():
    """A new compress option must say which method reads it (fips_rt.cli.METHOD_ONLY_OPTIONS / SHARED_OPTIONS)."""
    from fips_rt.cli import METHOD_ONLY_OPTIONS, SHARED_OPTIONS, compress
    fips, delta, shared = (set(METHOD_ONLY_OPTIONS["fips"]), set(METHOD_ONLY_OPTIONS["deltallm"]), set(SHARED_OPTIONS))
    assert not (fips & delta or fips & shared or delta & shared)
    assert {p.name for p in compress.params} == fips | delta | shared


def test_shared_and_own_options_pass_the_method_check(tmp_path):
    """Options both methods read, and each method's own ones, get past the check (to the missing model)."""
    shared = ["--steps", "3", "--lr", "1e-3", "--seed", "1", "--mlp-budget", "0.7", "--calib-tokens", "512"]
    for own in (["--method", "deltallm", "--layout", "alternating", "--keep-first", "1"],
                ["--method", "fips", "--sparsity", "0.5", "--global-steps", "2", "--refit", "after"]):
        line = one_line_error(run("compress", str(tmp_path / "nope"), *own, *shared, "--out", str(tmp_path / "m.pt")))
        assert "Model not found" in line, line


def test_compress_deltallm_via_cli(tiny_folder, text_file, tmp_path):
    out = tmp_path / "delta.pt"
    # the tiny model's 49k-token embedding dominates its size: give the budget as a fraction of the MLPs
    p = run("compress", str(tiny_folder), "--method", "deltallm", "--mlp-budget", "0.7", "--keep-first", "0",
            "--keep-last", "0", "--calib", str(text_file), "--calib-tokens", "512", "--seq-len", "64", "--steps", "3",
            "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    info = json.loads(run("info", str(out), "--json").stdout)
    assert info["method"] == "deltallm"
    # an MLP budget is the whole-model count it would leave (the default plan shares attention linears too)
    target = (info["params_dense"] - info["mlp_params_dense"] * 0.3) / info["params_dense"]
    assert target - 0.005 - 1e-9 <= info["params"] / info["params_dense"] <= target + 1e-9
