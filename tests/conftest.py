"""Test setup: Triton runs through its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before Triton is imported, so this happens at the
top of conftest, before fastpeft (or anything importing triton) is imported.
Checking for a GPU here must not initialise CUDA in the parent process more than
torch itself does; nvidia-smi-free detection via torch is fine at this point.
"""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fastpeft import backends  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend(monkeypatch):
    """Each test starts with no forced backend (unless the environment forces one)."""
    yield
    backends._CTX_FORCED.clear()


@pytest.fixture
def real_data_run_selected(request):
    """Skip a long real-data run unless asked for: ``-m slow`` (or an expression naming slow, other than
    "not slow") or ``FASTPEFT_RUN_SLOW=1``. Use with ``pytest.mark.usefixtures("real_data_run_selected")``."""
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr.replace("not slow", "") and os.environ.get("FASTPEFT_RUN_SLOW") != "1":
        pytest.skip("slow real-data run: select with -m slow or FASTPEFT_RUN_SLOW=1")


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when it is not there."""
    path = os.path.normpath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}")
    return path
