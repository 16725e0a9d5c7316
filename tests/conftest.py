import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (loaded once per test session, ~30 s)."""
    from fips_rt.models import load_model
    return load_model("smollm2-135m")
