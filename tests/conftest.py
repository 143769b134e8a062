"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here first."""
import os
from pathlib import Path

# Tests keep their own cache (converted model, kernel build, calibrations, stored measurements), so the quick
# measurements they make never become the figures a user's app shows. The browser test's server inherits it.
os.environ["XDG_CACHE_HOME"] = str(Path.home() / ".cache" / "sparse-lab-tests")
os.environ["SPARSE_LAB_WARMUP"] = "0"  # no background calibration beside tests that time things (test_warmup runs it)
# The compiled decode step is on by default in the app and the CLI; a first compile costs a minute or two on 2 cores,
# so tests decode with HF's forward unless they ask for it (test_fast_decode, and the toggle in test_app).
os.environ["SPARSE_LAB_COMPILE"] = "0"
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, loaded once per test session (converted to the cache on first use)."""
    from sparse_core import models
    return models.load()


def _vector_paths() -> tuple[str, ...]:
    from sparse_core.kernels import cpu_native
    return cpu_native.supported_paths() if cpu_native.native() else ("torch",)


@pytest.fixture(params=_vector_paths())
def vector_path(request):
    """The native kernels switched to one vector path this CPU has (every one in turn), and back after the test."""
    from sparse_core.kernels import cpu_native
    before = cpu_native.vector_path()
    assert cpu_native.vector_path(request.param) == request.param
    yield request.param
    cpu_native.vector_path(before)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
