"""How the ``fips.SparseMatMul`` kernel library is built from ``kernels/`` (one plan, two users).

``setup.py`` builds it with this plan when the wheel is built (the library then ships as package
data, ``fips_rt/runtime/kernels/libfips_sparse.so``), and ``fips_rt.runtime.native`` builds it the
same way in a source checkout that has no (or an out-of-date) prebuilt library, or when extra flags
are asked for (an AddressSanitizer build). Standard library only: ``setup.py`` loads this file by
its path, before anything is installed.

The plan (no ``-march=native`` anywhere; the kernel level is chosen at run time, see
``kernels/sparse_dispatch.cc``):

    fips_sparse.cc, sparse_tables.cc, sparse_dispatch.cc   BASE_FLAGS (the target's baseline)
    sparse_kernels.cc, qsparse_kernels.cc -DFIPS_KERNEL_LEVEL=0   BASE_FLAGS             (portable)
    sparse_kernels.cc, qsparse_kernels.cc -DFIPS_KERNEL_LEVEL=1   + -mavx2 -mfma -mpopcnt (x86-64)
    sparse_kernels.cc, qsparse_kernels.cc -DFIPS_KERNEL_LEVEL=2   + -mavx512f -mavx2 ...  (x86-64)
    c++ -shared <the objects, in this order> -o libfips_sparse.so

Non-x86 targets (e.g. aarch64 with ``aarch64-linux-gnu-g++``) get the portable level only. The
objects are linked baseline first: an inline function that several objects instantiate (from the
C++ library's headers) is kept from the first object that has it, so code that runs before the
level is chosen never comes from an AVX object (tests/test_native_kernel.py checks the library's
disassembly for this). Extra flags go after the plan's flags on every compile and on the link.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["LIBRARY_NAME", "BASE_FLAGS", "LEVEL_FLAGS", "BuildError", "find_compiler", "target_machine",
           "levels_for", "compile_units", "sources", "sources_hash", "read_sources_id", "build"]

LIBRARY_NAME = "libfips_sparse.so"
BASE_FLAGS = ("-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden")
# kernel level -> (FIPS_KERNEL_LEVEL, its instruction-set flags)
LEVEL_FLAGS = {
    "portable": (0, ()),
    "avx2": (1, ("-mavx2", "-mfma", "-mpopcnt")),
    "avx512": (2, ("-mavx512f", "-mavx2", "-mfma", "-mpopcnt")),
}
COMMON_SOURCES = ("fips_sparse.cc", "sparse_tables.cc", "sparse_dispatch.cc")
LEVEL_SOURCE = "sparse_kernels.cc"
# every source compiled once per kernel level (fips.SparseMatMul, fips.QSparseMatMul)
LEVEL_SOURCES = ("sparse_kernels.cc", "qsparse_kernels.cc")
SOURCES_ID_PREFIX = b"fips-sparse-sources-sha256:"
_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686")


class BuildError(RuntimeError):
    """The library could not be built; the message is one line (the compiler's first error)."""


def find_compiler() -> tuple[list[str] | None, str]:
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


def target_machine(cmd: list[str]) -> str:
    """The compiler's target triple (``-dumpmachine``, e.g. x86_64-linux-gnu), else this machine's."""
    try:
        out = subprocess.run([*cmd, "-dumpmachine"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.machine()


def levels_for(machine: str) -> tuple[str, ...]:
    """The kernel levels built for a target: all three on x86, the portable one elsewhere."""
    return tuple(LEVEL_FLAGS) if machine.lower().startswith(_X86) else ("portable",)


def sources(src_dir: Path) -> list[Path]:
    src_dir = Path(src_dir)
    return sorted(p for p in src_dir.iterdir() if p.suffix in (".cc", ".h")) if src_dir.is_dir() else []


def sources_hash(src_dir: Path) -> str:
    """sha256 of the kernel sources and of this plan's flags (what a prebuilt library must match)."""
    h = hashlib.sha256()
    for p in sources(src_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((BASE_FLAGS, LEVEL_FLAGS, COMMON_SOURCES, LEVEL_SOURCES)).encode())
    return h.hexdigest()


def read_sources_id(lib: Path) -> str | None:
    """The sources hash a library was built with (embedded by sparse_dispatch.cc), or None."""
    try:
        data = Path(lib).read_bytes()
    except OSError:
        return None
    i = data.find(SOURCES_ID_PREFIX)
    if i < 0:
        return None
    j = i + len(SOURCES_ID_PREFIX)
    end = data.find(b"\0", j)
    return data[j:end if end >= 0 else j + 64].decode("ascii", "replace")


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln), lines[0] if lines else "")


def compile_units(src_dir: Path, machine: str, levels: tuple[str, ...] | None = None) -> list[tuple[str, str, tuple]]:
    """(source, object name, flags) of every compilation, in link order (baseline objects first)."""
    levels = levels_for(machine) if levels is None else tuple(levels)
    x86 = "avx2" in levels or "avx512" in levels
    digest = sources_hash(src_dir)
    units = []
    for name in COMMON_SOURCES:
        defs: tuple = ()
        if name == "sparse_dispatch.cc":
            defs = (f'-DFIPS_SOURCES_SHA256="{digest}"',) + (("-DFIPS_KERNEL_X86_LEVELS=1",) if x86 else ())
        units.append((name, Path(name).stem + ".o", (*BASE_FLAGS, *defs)))
    for level in levels:  # level by level: every portable (baseline) object before any x86 one
        num, flags = LEVEL_FLAGS[level]
        for src in LEVEL_SOURCES:
            units.append((src, f"{Path(src).stem}.{level}.o", (*BASE_FLAGS, *flags, f"-DFIPS_KERNEL_LEVEL={num}")))
    return units


def build(cmd: list[str], src_dir: Path, out: Path, *, extra_flags=(), machine: str | None = None,
          levels: tuple[str, ...] | None = None, jobs: int | None = None, timeout: float = 600) -> Path:
    """Compile and link the library into ``out`` (atomically: a temporary file, then a rename).

    ``levels``: the kernel levels to build (default: all the target has; an x86 build needs all
    three, the dispatcher links against them). Raises BuildError (one line) on failure.
    """
    src_dir, out = Path(src_dir).resolve(), Path(out)
    machine = machine or target_machine(cmd)
    extra = tuple(extra_flags)
    units = compile_units(src_dir, machine, levels)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs or min(len(units), os.cpu_count() or 1))
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        objs, pending, running = [], list(units), []

        def reap(proc, argv):
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise BuildError(f"compilation timed out after {timeout:.0f} s")
            if proc.returncode != 0:
                raise BuildError(f"compilation failed ({argv[0]} exit {proc.returncode}): {_first_error(err)}")

        try:
            for src, obj, flags in units:
                objs.append(str(Path(tmp) / obj))
            while pending or running:
                while pending and len(running) < jobs:
                    src, obj, flags = pending.pop(0)
                    argv = [*cmd, *flags, *extra, "-c", str(src_dir / src), "-o", str(Path(tmp) / obj)]
                    running.append((subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     text=True), argv))
                proc, argv = running.pop(0)
                reap(proc, argv)
        except OSError as e:
            raise BuildError(f"compilation failed: {e}") from e
        finally:
            for proc, _ in running:
                proc.kill()
                proc.communicate()
        tmp_lib = Path(tmp) / LIBRARY_NAME
        argv = [*cmd, "-shared", "-fPIC", *extra, *objs, "-o", str(tmp_lib)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise BuildError(f"linking timed out after {timeout:.0f} s") from e
        except OSError as e:
            raise BuildError(f"linking failed: {e}") from e
        if res.returncode != 0:
            raise BuildError(f"linking failed ({argv[0]} exit {res.returncode}): {_first_error(res.stderr or res.stdout)}")
        os.replace(tmp_lib, out)  # atomic: concurrent builders race harmlessly
    return out
