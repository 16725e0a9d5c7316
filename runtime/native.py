"""Native CPU kernel for ``fips.SparseMatMul``: build (cached) and register with onnxruntime.

The kernel library is compiled from the C++ sources in ``kernels/`` with the system C++
compiler the first time it is needed, into

    ${FIPS_RT_CACHE:-~/.cache/fips_rt}/kernels/<onnxruntime version>-<hash>/libfips_sparse.so

where the hash covers the sources, the compiler and its flags and the machine (the build uses
``-march=native``). Without a compiler, or with ``FIPS_RT_NO_NATIVE=1``, everything still
works through the function bodies the exporter puts in the model (the "reference" path).

    import onnxruntime as ort
    from fips_rt.runtime import native

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2                                  # the kernel uses this pool
    so.add_session_config_entry("session.disable_prepacking", "1")  # keeps weight RAM at 1x
    path_taken = native.register(so)            # "native" or "reference"
    sess = ort.InferenceSession("model.onnx", so, providers=["CPUExecutionProvider"])

The kernel splits its work over onnxruntime's own intra-op thread pool (no OpenMP), so
``session.intra_op.allow_spinning`` can keep its default. Register it for CPU sessions
only: in a CUDA session a CPU kernel forces device copies around every sparse node.

float16 nodes: with the library registered, onnxruntime runs them on the float32 kernel
through Casts it inserts (not through the node's function body; see kernels/fips_sparse.cc).

Environment:
    FIPS_RT_NO_NATIVE=1           never build or load the native library
    FIPS_RT_CACHE=DIR             cache root (default ~/.cache/fips_rt)
    CXX=...                       compiler to use (else c++, g++, clang++ on PATH)
    FIPS_RT_CXXFLAGS="..."        extra compiler flags, appended after the default ones (so e.g.
                                  "-O1" wins over "-O3"); the build goes to its own cache entry.
                                  An AddressSanitizer build:
                                  FIPS_RT_CXXFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g"
                                  (load it with LD_PRELOAD=$(gcc -print-file-name=libasan.so)),
                                  or library_path(extra_flags=ASAN_FLAGS)
  read by the library when it is loaded / first registered:
    FIPS_SPARSE_FORCE_SCALAR=1    use the portable scalar loops instead of AVX2/FMA
    FIPS_SPARSE_ISA=avx2          on an AVX-512 CPU, use the AVX2 kernels for few tokens too
    FIPS_SPARSE_EXPAND=register   AVX-512: masked load + register expand (the AMD default)
                                  instead of expanding straight from memory (the Intel default)
    FIPS_SPARSE_SERIAL=1          run the kernel on the calling thread only (no ParallelFor)
    FIPS_SPARSE_NO_FP16_SCHEMA=1  do not declare the float16 schema (float16 nodes then fail
                                  to load in sessions that have the library)
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["library_path", "register", "KERNEL_CHOICES", "SOURCES_DIR", "LIBRARY_NAME", "ASAN_FLAGS"]

SOURCES_DIR = Path(__file__).resolve().parent / "kernels"
LIBRARY_NAME = "libfips_sparse.so"
KERNEL_CHOICES = ("auto", "native", "reference")

_CXXFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden")
_BUILD_TIMEOUT_S = 600
# an AddressSanitizer build of the kernel (tests/test_hardening_onnx.py)
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g")

# compiler path -> its `--version` output (asked once per process)
_compiler_ids: dict[str, str] = {}


def _sources() -> list[Path]:
    return sorted(p for p in SOURCES_DIR.iterdir() if p.suffix in (".cc", ".h")) if SOURCES_DIR.is_dir() else []


def _find_compiler() -> tuple[list[str] | None, str]:
    """The compiler command (CXX, else c++ / g++ / clang++ on PATH), or None and why."""
    tried = []
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        cmd = shlex.split(cxx)
        exe = shutil.which(cmd[0])
        if exe:
            return [exe, *cmd[1:]], ""
        tried.append(f"CXX={cxx!r}")
    for name in ("c++", "g++", "clang++"):
        exe = shutil.which(name)
        if exe:
            return [exe], ""
        tried.append(name)
    return None, "no C++ compiler found (tried " + ", ".join(tried) + ")"


def _compiler_id(cmd: list[str]) -> str:
    key = " ".join(cmd)
    if key not in _compiler_ids:
        try:
            out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
            _compiler_ids[key] = (out.stdout or out.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            _compiler_ids[key] = f"unknown ({e})"
    return _compiler_ids[key]


def _machine_id() -> str:
    """What -march=native depends on: CPU model and feature flags."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("vendor_id", "model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    parts.append(line.strip())
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except Exception:  # noqa: BLE001 - any import failure means "no onnxruntime"
        return "no-onnxruntime"


def _cache_root() -> Path:
    root = os.environ.get("FIPS_RT_CACHE", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fips_rt"


def _extra_flags(extra_flags) -> tuple[str, ...]:
    """Extra compiler flags: the argument if given (a string or a sequence), else FIPS_RT_CXXFLAGS."""
    if extra_flags is None:
        extra_flags = os.environ.get("FIPS_RT_CXXFLAGS", "")
    if isinstance(extra_flags, str):
        return tuple(shlex.split(extra_flags))
    return tuple(str(f) for f in extra_flags)


def _resolve(build: bool, extra_flags=None) -> tuple[Path | None, str]:
    """(path, "") when the library is ready, else (None, reason)."""
    if os.environ.get("FIPS_RT_NO_NATIVE", "").strip() not in ("", "0"):
        return None, "disabled by FIPS_RT_NO_NATIVE"
    sources = _sources()
    if not any(p.suffix == ".cc" for p in sources):
        return None, f"kernel sources not found in {SOURCES_DIR}"
    cmd, why = _find_compiler()
    if cmd is None:
        return None, why
    flags = (*_CXXFLAGS, *_extra_flags(extra_flags))
    h = hashlib.sha256()
    for p in sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(flags).encode() + b"\0")
    h.update(" ".join(cmd).encode() + b"\0" + _compiler_id(cmd).encode() + b"\0")
    h.update(_machine_id().encode())
    out_dir = _cache_root() / "kernels" / f"{_ort_version()}-{h.hexdigest()[:16]}"
    lib = out_dir / LIBRARY_NAME
    if lib.is_file():
        return lib, ""
    if not build:
        return None, f"not built yet ({lib})"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as e:
        return None, f"cannot write the kernel cache {out_dir}: {e}"
    argv = [*cmd, *flags, *(str(p) for p in sources if p.suffix == ".cc"), "-o", tmp]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if res.returncode != 0:
            err = (res.stderr or res.stdout).strip().splitlines()
            first = next((ln for ln in err if "error" in ln), err[0] if err else "")
            return None, f"compilation failed ({argv[0]} exit {res.returncode}): {first.strip()}"
        os.replace(tmp, lib)  # atomic: concurrent builders race harmlessly
        return lib, ""
    except subprocess.TimeoutExpired:
        return None, f"compilation timed out after {_BUILD_TIMEOUT_S} s"
    except OSError as e:
        return None, f"compilation failed: {e}"
    finally:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def library_path(build: bool = True, extra_flags=None) -> Path | None:
    """Path of the compiled kernel library, building it into the cache if needed.

    Returns None (with one warning) when it cannot be had: no compiler, compilation error,
    or ``FIPS_RT_NO_NATIVE=1``. With ``build=False`` only an already built library is
    returned (None, silently, otherwise). ``extra_flags`` (a string or a sequence; default:
    ``FIPS_RT_CXXFLAGS``) are appended to the compiler flags; such a build has its own cache
    entry (e.g. ``extra_flags=ASAN_FLAGS`` for an AddressSanitizer build).
    """
    path, why = _resolve(build, extra_flags)
    if path is None and build:
        warnings.warn(f"fips_rt: native sparse kernel unavailable: {why}", RuntimeWarning, stacklevel=2)
    return path


def register(session_options, kernel: str = "auto") -> str:
    """Make ``fips.SparseMatMul`` nodes run on the native kernel in sessions built from
    ``session_options`` (an ``onnxruntime.SessionOptions``).

    kernel: "native" (raise RuntimeError when the library is unavailable), "reference"
    (register nothing: onnxruntime runs the nodes' function bodies), or "auto" (native when
    available, else one warning and reference). Returns the path taken: "native" or
    "reference".
    """
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel == "reference":
        return "reference"
    path, why = _resolve(build=True)
    if path is not None:
        try:
            session_options.register_custom_ops_library(str(path))
            return "native"
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            why = f"onnxruntime could not load {path}: {e}"
    if kernel == "native":
        raise RuntimeError(f"fips_rt: native sparse kernel requested but unavailable: {why}")
    warnings.warn(
        f"fips_rt: native sparse kernel unavailable ({why}); using the reference function-body path",
        RuntimeWarning,
        stacklevel=2,
    )
    return "reference"
