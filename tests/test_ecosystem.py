"""The ecosystem's loaders on export folders as written (docs/runtime.md, "Loading an export elsewhere"):
Hugging Face Optimum (``ORTModelForCausalLM`` + ``AutoTokenizer``) and onnxruntime-genai generate the same
greedy tokens as ``fips_rt.runtime.Model.generate``, for a dense and a FiPS tiny export, with and without
fips-rt's kernel library registered in their session options.

Neither package is a dependency of fips-rt. Each runs in a subprocess with a test-only package folder
(``pip install --no-deps --target``, pinned, cached under ``$FIPS_RT_CACHE/test-envs/``, ~20 s the first
time) in front of this interpreter's site-packages: Optimum's ONNX Runtime side (optimum-onnx 0.1.0) needs
transformers < 4.58, so that folder brings its own transformers / huggingface-hub / tokenizers and reuses
this venv's torch, numpy and onnxruntime (nothing large is downloaded). Where the folder cannot be had (no
package index, ``FIPS_RT_TEST_NO_INSTALL=1``) the test is skipped with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir

pytestmark = needs_exporter

# optimum-onnx 0.1.0 (the newest) pins optimum~=2.1.0 and transformers<4.58; transformers 4.57 wants
# huggingface-hub<1.0 and tokenizers<=0.23.0
OPTIMUM_PINS = ("optimum==2.1.0", "optimum-onnx==0.1.0", "transformers==4.57.6", "huggingface-hub==0.36.2",
                "tokenizers==0.22.2")
GENAI_PINS = ("onnxruntime-genai==0.18.0",)  # needs onnxruntime >= 1.31 (this venv's)
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,"]
NEW_TOKENS = 16
INSTALL_TIMEOUT_S = 300


def _cache_root() -> Path:
    root = os.environ.get("FIPS_RT_CACHE", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fips_rt"


def _package_dir(name: str, pins: tuple[str, ...]) -> Path:
    """A folder holding ``pins`` (no dependencies), installed once; skips the test when it cannot be had."""
    key = hashlib.sha256(" ".join((sys.version, *pins)).encode()).hexdigest()[:12]
    root = _cache_root() / "test-envs" / f"{name}-{key}"
    if (root / ".complete").is_file():
        return root
    if os.environ.get("FIPS_RT_TEST_NO_INSTALL", "").strip() not in ("", "0"):
        pytest.skip(f"{name} is not installed for this test and FIPS_RT_TEST_NO_INSTALL is set")
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(tmp), *pins]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot install {' '.join(pins)} for this test: {e}")
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        why = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else f"pip exit {res.returncode}")
        pytest.skip(f"cannot install {' '.join(pins)} for this test (no package index?): {why.strip()}")
    (tmp / ".complete").write_text(" ".join(pins) + "\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return root


_OPTIMUM_DRIVER = r"""
import json, sys
import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
args = json.loads(sys.argv[1])
out = []
for case in args["cases"]:
    tok = AutoTokenizer.from_pretrained(case["folder"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if case["library"]:
        so.register_custom_ops_library(case["library"])  # what docs/runtime.md tells users to do
    model = ORTModelForCausalLM.from_pretrained(case["folder"], session_options=so, provider="CPUExecutionProvider")
    runs = []
    for prompt in args["prompts"]:
        enc = tok(prompt, return_tensors="pt")
        seq = model.generate(**enc, max_new_tokens=args["new_tokens"], do_sample=False)
        n = enc["input_ids"].shape[1]
        runs.append({"prompt": enc["input_ids"][0].tolist(), "tokens": seq[0, n:].tolist()})
    out.append({"tokenizer": type(tok).__name__, "runs": runs})
print("RESULT " + json.dumps(out))
"""

_GENAI_DRIVER = r"""
import json, sys
import onnxruntime_genai as og
args = json.loads(sys.argv[1])
out = []
for case in args["cases"]:
    model = og.Model(og.Config(case["folder"]))
    tok = og.Tokenizer(model)
    runs = []
    for prompt in args["prompts"]:
        ids = [int(i) for i in tok.encode(prompt)]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + args["new_tokens"], do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        runs.append({"prompt": ids, "tokens": tokens})
    out.append({"runs": runs})
print("RESULT " + json.dumps(out))
"""


def _drive(driver: str, packages: Path, cases: list[dict], timeout: int = 600) -> list[dict]:
    env = runtime_env()
    env["PYTHONPATH"] = os.pathsep.join([str(packages), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    args = json.dumps({"cases": cases, "prompts": PROMPTS, "new_tokens": NEW_TOKENS})
    res = subprocess.run([sys.executable, "-c", driver, args], capture_output=True, text=True, env=env, check=False,
                         timeout=timeout)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, (res.stdout + res.stderr)[-4000:]
    return json.loads(line[len("RESULT "):])


def _library() -> str | None:
    from fips_rt.runtime import native
    path = native.library_path(build=True)
    return str(path) if path is not None else None


def _expected(folder: Path, kernel: str) -> list[dict]:
    from fips_rt.runtime import Model
    model = Model.load(folder, threads=1, kernel=kernel)
    out = []
    for p in PROMPTS:
        r = model.generate(p, max_new_tokens=NEW_TOKENS, temperature=0.0)
        out.append({"prompt": r.prompt_token_ids, "tokens": r.token_ids, "stopped": r.finish_reason == "stop",
                    "eos": sorted(model.tokenizer.eos_token_ids)})
    return out


def _assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["prompt"] == w["prompt"], f"{what}: prompt ids differ"
        tokens = g["tokens"]
        if w["stopped"] and len(tokens) == len(w["tokens"]) + 1 and tokens[-1] in w["eos"]:
            tokens = tokens[:-1]  # the loaders keep the eos token they stopped at; the runtime does not
        assert tokens == w["tokens"], f"{what}: {tokens} != Model.generate's {w['tokens']}"


@pytest.fixture(scope="module")
def folders():
    return {"dense": tiny_lm_dir("dense"), "fips": tiny_lm_dir("fips")}


def test_export_writes_the_loaders_files(folders):
    for kind, d in folders.items():
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "generation_config.json", "genai_config.json"} <= names, kind
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and cfg["use_cache"]
        contract = json.loads((d / "fips_config.json").read_text())
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == contract["eos_token_ids"] and gen["pad_token_id"] == contract["pad_token_id"]
        tok = json.loads((d / "tokenizer_config.json").read_text())
        assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert tok["model_input_names"] == ["input_ids", "attention_mask"] and tok["chat_template"]
        genai = json.loads((d / "genai_config.json").read_text())["model"]
        assert genai["decoder"]["filename"] == "model.onnx" and genai["decoder"]["num_key_value_heads"] == 2
        assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_transformers_autotokenizer_loads_the_export(folders):
    from fips_rt.runtime import Model
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folders["fips"]))
    rt = Model.load(folders["fips"], threads=1).tokenizer
    for p in PROMPTS:
        assert tok(p)["input_ids"] == rt.encode(p)
    assert set(tok(PROMPTS[0])) == {"input_ids", "attention_mask"}


def test_optimum_generates_like_the_runtime(folders):
    packages = _package_dir("optimum", OPTIMUM_PINS)
    lib = _library()
    cases = [("dense", None, "reference"), ("fips", None, "reference")]
    if lib is not None:
        cases.append(("fips", lib, "native"))
    got = _drive(_OPTIMUM_DRIVER, packages, [{"folder": str(folders[k]), "library": l} for k, l, _ in cases])
    for (kind, l, kernel), g in zip(cases, got, strict=True):
        assert g["tokenizer"] == "PreTrainedTokenizerFast"
        _assert_same(g["runs"], _expected(folders[kind], kernel), f"Optimum, {kind}, kernel library {l}")


def test_onnxruntime_genai_generates_like_the_runtime(folders, tmp_path):
    import onnxruntime
    if tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) < (1, 31):
        pytest.skip(f"onnxruntime-genai 0.18 needs onnxruntime >= 1.31 (this venv has {onnxruntime.__version__})")
    packages = _package_dir("onnxruntime-genai", GENAI_PINS)
    cases = [("dense", folders["dense"], "reference"), ("fips", folders["fips"], "reference")]
    lib = _library()
    if lib is not None:  # the documented recipe: the library inside the folder, named in genai_config.json
        d = tmp_path / "fips-genai"
        shutil.copytree(folders["fips"], d)
        shutil.copy(lib, d / "libfips_sparse.so")
        cfg = json.loads((d / "genai_config.json").read_text())
        cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = "libfips_sparse.so"
        (d / "genai_config.json").write_text(json.dumps(cfg, indent=2))
        cases.append(("fips", d, "native"))
    got = _drive(_GENAI_DRIVER, packages, [{"folder": str(d)} for _, d, _ in cases])
    for (kind, d, kernel), g in zip(cases, got, strict=True):
        _assert_same(g["runs"], _expected(folders[kind], kernel), f"onnxruntime-genai, {kind}, {kernel}")
