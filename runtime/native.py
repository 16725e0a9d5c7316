"""Native CPU kernel for ``fips.SparseMatMul``: find (or build) the library, register it with onnxruntime.

The kernel library ``libfips_sparse.so`` (C++ sources in ``kernels/``) holds the products at three
levels, each compiled with its own flags -- portable (the target's baseline), AVX2/FMA and
AVX-512F -- and chooses one when it is first registered, from the CPU's features (see
``kernels/sparse_dispatch.cc``). No ``-march=native``: a library built on one x86-64 machine runs on
any other. Where it comes from, in this order:

1. **prebuilt**: ``kernels/libfips_sparse.so`` next to the sources, built with the package (``pip
   wheel`` / ``pip install`` build it into the wheel; ``pip install -e .`` builds it in place).
   It is used when it was built from exactly these sources (a hash of the sources and of the build
   plan is embedded in it), so an installed wheel needs no compiler.
2. **compiled**: otherwise (a source checkout without an up-to-date in-place build, or extra compiler
   flags asked for) the same per-level build runs with the system C++ compiler on first use, into

       ${FIPS_RT_CACHE:-~/.cache/fips_rt}/kernels/<onnxruntime version>-<hash>/libfips_sparse.so

   where the hash covers the sources, the build plan, the flags and the compiler.

Without either (no compiler, or ``FIPS_RT_NO_NATIVE=1``) everything still works through the function
bodies the exporter puts in the model (the "reference" path). The plan itself (which objects, which
flags, the link order) is ``fips_rt.runtime.kernel_build``, shared with ``setup.py``.

    import onnxruntime as ort
    from fips_rt.runtime import native

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2                                  # the kernel uses this pool
    so.add_session_config_entry("session.disable_prepacking", "1")  # keeps weight RAM at 1x
    path_taken = native.register(so)            # "native" or "reference"
    sess = ort.InferenceSession("model.onnx", so, providers=["CPUExecutionProvider"])
    native.kernel_info()                        # {"isa": "avx512", "build": "prebuilt", ...}

The kernel splits its work over onnxruntime's own intra-op thread pool (no OpenMP), so
``session.intra_op.allow_spinning`` can keep its default. Register it for CPU sessions
only: in a CUDA session a CPU kernel forces device copies around every sparse node.

float16 nodes: with the library registered, onnxruntime runs them on the float32 kernel
through Casts it inserts (not through the node's function body; see kernels/fips_sparse.cc).

Environment:
    FIPS_RT_NO_NATIVE=1           never build or load the native library
    FIPS_RT_PREBUILT=0            ignore the prebuilt library (compile from the sources instead)
    FIPS_RT_CACHE=DIR             cache root of compiled libraries (default ~/.cache/fips_rt)
    CXX=...                       compiler to use (else c++, g++, clang++ on PATH)
    FIPS_RT_CXXFLAGS="..."        extra compiler flags, appended after the plan's (so e.g. "-O1"
                                  wins over "-O3"): a compiled build, in its own cache entry.
                                  An AddressSanitizer build:
                                  FIPS_RT_CXXFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g"
                                  (load it with LD_PRELOAD=$(gcc -print-file-name=libasan.so)),
                                  or library_path(extra_flags=ASAN_FLAGS)
  read by the library when it is first registered (in each process):
    FIPS_SPARSE_ISA=LEVEL         auto (default: the best level the CPU has), portable, avx2 or
                                  avx512; a level the CPU lacks is an error (FipsRuntimeError,
                                  one line), not a silent fallback
    FIPS_SPARSE_FORCE_SCALAR=1    the portable level (as FIPS_SPARSE_ISA=portable; wins over it)
    FIPS_SPARSE_EXPAND=register   AVX-512: masked load + register expand (the AMD default)
                                  instead of expanding straight from memory (the Intel default)
    FIPS_SPARSE_SERIAL=1          run the kernel on the calling thread only (no ParallelFor)
    FIPS_SPARSE_NO_FP16_SCHEMA=1  do not declare the float16 schema (float16 nodes then fail
                                  to load in sessions that have the library)
    FIPS_SPARSE_TEST_CPU_LACKS=   tests only: a comma list of CPU features (avx512f, avx2, fma,
                                  popcnt; avx512vbmi2 for the kernel below) the library should treat as absent
  fips.QSparseMatMul (int8 / int4 codes, kernels/qsparse_kernels.cc; same library, same levels):
    FIPS_QSPARSE_NO_VBMI2=1       AVX-512 level: keep the AVX-512F int8 kernel where the CPU has VBMI2
    FIPS_QSPARSE_FUSED_MAX_T=N    largest token count for the fused decode kernels (default 16 for int8
                                  per-row scales, 8 otherwise; above: dequantize once, fp32 kernels)
    FIPS_QSPARSE_NO_VNNI=1        AVX-512 level: no int8-activation VNNI kernels (activation_bits=8 nodes:
                                  transB=1 then runs the AVX2 int8-activation kernel, transB=0 exactly)
    FIPS_QSPARSE_NO_ACT8=1        every level: activation_bits=8 nodes compute exactly (float activations),
                                  no int8-activation kernel (VNNI or AVX2)
    FIPS_QSPARSE_ACT8_TASK_STEPS=N  64-column steps x tokens per task of the VNNI kernels (default 3072;
                                  for measurements); FIPS_SPARSE_TEST_CPU_LACKS=avx512vnni also turns them off
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import warnings
from pathlib import Path

from . import kernel_build

__all__ = ["library_path", "register", "kernel_info", "KERNEL_CHOICES", "SOURCES_DIR", "LIBRARY_NAME",
           "PREBUILT_PATH", "ASAN_FLAGS"]

SOURCES_DIR = Path(__file__).resolve().parent / "kernels"
LIBRARY_NAME = kernel_build.LIBRARY_NAME
# where setup.py puts the library it builds (in the wheel, or in place for `pip install -e .`)
PREBUILT_PATH = SOURCES_DIR / LIBRARY_NAME
KERNEL_CHOICES = ("auto", "native", "reference")

_BUILD_TIMEOUT_S = 600
# an AddressSanitizer build of the kernel (tests/test_hardening_onnx.py)
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g")
# the library's registration error for a kernel level this CPU lacks starts with this
_LEVEL_ERROR = "fips_sparse: kernel level: "

# compiler path -> its `--version` output and target (asked once per process)
_compiler_ids: dict[str, tuple[str, str]] = {}
# library path -> "prebuilt" or "compiled"; and the library the last register() call registered
_built_as: dict[str, str] = {}
_registered: Path | None = None
# (path, size, mtime) of a prebuilt library -> the sources hash embedded in it
_prebuilt_ids: dict[tuple, str | None] = {}


def _sources() -> list[Path]:
    return kernel_build.sources(SOURCES_DIR)


def _find_compiler() -> tuple[list[str] | None, str]:
    """The compiler command (CXX, else c++ / g++ / clang++ on PATH), or None and why."""
    return kernel_build.find_compiler()


def _compiler_id(cmd: list[str]) -> tuple[str, str]:
    """(``--version`` output, target triple) of a compiler."""
    key = " ".join(cmd)
    if key not in _compiler_ids:
        try:
            out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
            version = (out.stdout or out.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            version = f"unknown ({e})"
        _compiler_ids[key] = (version, kernel_build.target_machine(cmd))
    return _compiler_ids[key]


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


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip() in ("0", "no", "false", "off")


def _prebuilt() -> tuple[Path | None, str]:
    """(the prebuilt library, "") when there is one built from these sources, else (None, why not)."""
    lib = PREBUILT_PATH
    try:
        st = lib.stat()
    except OSError:
        return None, ""
    key = (str(lib), st.st_size, st.st_mtime_ns)
    if key not in _prebuilt_ids:
        _prebuilt_ids[key] = kernel_build.read_sources_id(lib)
    built_from = _prebuilt_ids[key]
    if not _sources():  # nothing to compare with (sources not shipped): trust it
        return lib, ""
    if built_from != kernel_build.sources_hash(SOURCES_DIR):
        return None, (f"the prebuilt {lib} was built from other sources than {SOURCES_DIR} "
                      "(a source checkout: `pip install -e .` rebuilds it)")
    return lib, ""


def _resolve(build: bool, extra_flags=None) -> tuple[Path | None, str]:
    """(path, "") when the library is ready, else (None, reason). Records how it was built."""
    if os.environ.get("FIPS_RT_NO_NATIVE", "").strip() not in ("", "0"):
        return None, "disabled by FIPS_RT_NO_NATIVE"
    extra = _extra_flags(extra_flags)
    stale = ""
    if not extra and not _env_off("FIPS_RT_PREBUILT"):
        lib, stale = _prebuilt()
        if lib is not None:
            _built_as[str(lib)] = "prebuilt"
            return lib, ""
    note = f"; {stale}" if stale else ""
    sources = _sources()
    if not any(p.suffix == ".cc" for p in sources):
        return None, f"kernel sources not found in {SOURCES_DIR}{note}"
    cmd, why = _find_compiler()
    if cmd is None:
        return None, why + note
    version, machine = _compiler_id(cmd)
    h = hashlib.sha256()
    h.update(kernel_build.sources_hash(SOURCES_DIR).encode() + b"\0")
    h.update(" ".join(extra).encode() + b"\0")
    h.update(" ".join(cmd).encode() + b"\0" + version.encode() + b"\0" + machine.encode())
    out_dir = _cache_root() / "kernels" / f"{_ort_version()}-{h.hexdigest()[:16]}"
    lib = out_dir / LIBRARY_NAME
    if lib.is_file():
        _built_as[str(lib)] = "compiled"
        return lib, ""
    if not build:
        return None, f"not built yet ({lib})"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return None, f"cannot write the kernel cache {out_dir}: {e}"
    try:
        kernel_build.build(cmd, SOURCES_DIR, lib, extra_flags=extra, machine=machine, timeout=_BUILD_TIMEOUT_S)
    except kernel_build.BuildError as e:
        return None, str(e)
    except OSError as e:
        return None, f"compilation failed: {e}"
    _built_as[str(lib)] = "compiled"
    return lib, ""


def library_path(build: bool = True, extra_flags=None) -> Path | None:
    """Path of the kernel library: the prebuilt one when it matches the sources, else one
    compiled into the cache (built now if needed).

    Returns None (with one warning) when it cannot be had: no compiler, compilation error,
    or ``FIPS_RT_NO_NATIVE=1``. With ``build=False`` nothing is compiled: the prebuilt or an
    already compiled library, else None (silently). ``extra_flags`` (a string or a sequence;
    default: ``FIPS_RT_CXXFLAGS``) are appended to the compiler flags; such a build is always
    compiled, into its own cache entry (e.g. ``extra_flags=ASAN_FLAGS`` for an AddressSanitizer
    build).
    """
    path, why = _resolve(build, extra_flags)
    if path is None and build:
        warnings.warn(f"fips_rt: native sparse kernel unavailable: {why}", RuntimeWarning, stacklevel=2)
    return path


def _level_error(exc: Exception) -> str | None:
    """The one-line kernel-level error in an onnxruntime registration failure, if that is what it is."""
    msg = str(exc)
    i = msg.find(_LEVEL_ERROR)
    if i < 0:
        return None
    return "native sparse kernel: " + msg[i + len(_LEVEL_ERROR):].strip().splitlines()[0]


def register(session_options, kernel: str = "auto") -> str:
    """Make ``fips.SparseMatMul`` nodes run on the native kernel in sessions built from
    ``session_options`` (an ``onnxruntime.SessionOptions``).

    kernel: "native" (raise RuntimeError when the library is unavailable), "reference"
    (register nothing: onnxruntime runs the nodes' function bodies), or "auto" (native when
    available, else one warning and reference). Returns the path taken: "native" or
    "reference". A kernel level forced through FIPS_SPARSE_ISA that this CPU lacks raises
    ``FipsRuntimeError`` (one line) whatever ``kernel`` is, other than "reference".
    """
    global _registered
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel == "reference":
        return "reference"
    path, why = _resolve(build=True)
    if path is not None:
        try:
            session_options.register_custom_ops_library(str(path))
            _registered = path
            return "native"
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            level = _level_error(e)
            if level is not None:
                from .session import FipsRuntimeError

                raise FipsRuntimeError(level) from None
            why = f"onnxruntime could not load {path}: {e}"
    if kernel == "native":
        raise RuntimeError(f"fips_rt: native sparse kernel requested but unavailable: {why}")
    warnings.warn(
        f"fips_rt: native sparse kernel unavailable ({why}); using the reference function-body path",
        RuntimeWarning,
        stacklevel=2,
    )
    return "reference"


def kernel_info(path: str | os.PathLike | None = None) -> dict:
    """What the kernel library in use is: ``{"path", "build", "isa", "levels"}``.

    ``path``: a library (default: the one ``register`` last registered in this process, else
    ``library_path(build=False)``). ``build`` is "prebuilt" (shipped with the package) or
    "compiled" (built from the sources on this machine); ``isa`` the kernel level the library
    chose ("portable", "avx2", "avx512"; "unavailable" when a forced level cannot run), as
    FipsSparseKernelIsa reports it (the library is loaded to ask: ask after registering, so the
    level read is the one onnxruntime's sessions use); ``levels`` the levels compiled in. All
    None when there is no library.
    """
    import ctypes

    lib = Path(path) if path is not None else (_registered or _resolve(build=False)[0])
    info: dict = {"path": None, "build": None, "isa": None, "levels": None}
    if lib is None:
        return info
    lib = Path(lib)
    info["path"] = str(lib)
    info["build"] = _built_as.get(str(lib)) or ("prebuilt" if lib == PREBUILT_PATH else "compiled")
    try:
        handle = ctypes.CDLL(str(lib))
        for key, fn in (("isa", "FipsSparseKernelIsa"), ("levels", "FipsSparseKernelLevels")):
            f = getattr(handle, fn)
            f.restype = ctypes.c_char_p
            value = f()
            info[key] = value.decode() if value is not None else None
    except (OSError, AttributeError):
        pass
    if info["levels"] is not None:
        info["levels"] = info["levels"].split(",")
    return info
