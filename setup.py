"""Builds the fips.SparseMatMul kernel library into the package (everything else is in pyproject.toml).

`pip wheel .` / `pip install .` compile runtime/kernels into fips_rt/runtime/kernels/libfips_sparse.so
(package data: an installed wheel needs no compiler); `pip install -e .` builds it in place, into
runtime/kernels/. The plan (one object per kernel level, each with its own flags, no -march=native;
the level is chosen at run time) is runtime/kernel_build.py, which fips_rt.runtime.native also uses
to compile the library on first use when no up-to-date prebuilt one is there.

Environment: CXX picks the compiler (else c++ / g++ / clang++). FIPS_RT_BUILD_KERNEL=0 skips the
library (the runtime then compiles it on first use, or runs the function bodies); =require makes a
failed build fail the install (by default it is a warning: the package still installs).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "runtime" / "kernels"
EXT_NAME = "fips_rt.runtime.kernels.libfips_sparse"


def _kernel_build():
    spec = importlib.util.spec_from_file_location("_fips_kernel_build", ROOT / "runtime" / "kernel_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildKernel(build_ext):
    """build_ext for the one 'extension': a plain shared library (no Python module in it)."""

    def get_ext_filename(self, fullname):
        if fullname.split(".")[-1] == "libfips_sparse":  # not <name>.cpython-*.so
            return os.path.join(*fullname.split(".")[:-1], "libfips_sparse.so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        mode = os.environ.get("FIPS_RT_BUILD_KERNEL", "").strip().lower()
        if mode in ("0", "no", "off", "false"):
            print("fips-rt: FIPS_RT_BUILD_KERNEL=0, the kernel library is not built")
            return
        kb = _kernel_build()
        out = Path(self.get_ext_fullpath(ext.name))
        cmd, why = kb.find_compiler()
        try:
            if cmd is None:
                raise kb.BuildError(why)
            machine = kb.target_machine(cmd)
            print(f"fips-rt: building {out.name} ({', '.join(kb.levels_for(machine))}) for {machine} "
                  f"with {' '.join(cmd)}")
            jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else None
            kb.build(cmd, KERNELS, out, machine=machine, jobs=jobs)
        except kb.BuildError as e:
            if mode == "require":
                raise RuntimeError(f"fips-rt: the kernel library could not be built: {e}") from None
            self.warn(f"fips-rt: the kernel library was not built ({e}); the runtime will compile it on "
                      "first use if a compiler is there, else run the models' function bodies")


setup(
    ext_modules=[Extension(EXT_NAME, sources=[str(p.relative_to(ROOT)) for p in sorted(KERNELS.glob("*.cc"))],
                           optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
