import os

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
