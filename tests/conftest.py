import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (loaded once per test session, ~30 s)."""
    from fips_rt.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one torch thread avoids OpenMP spin contention
    (many times faster than two). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_benchmark(script: str, module_name: str):
    """Import ``benchmarks/<script>`` (not a package) as ``module_name``; registered in sys.modules (dataclasses
    need it); ``sys.modules.pop(module_name)`` when done."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quality_harness():
    """benchmarks/quality.py as a module (one import per test module)."""
    yield load_benchmark("quality.py", "quality_harness")
    sys.modules.pop("quality_harness", None)
