"""Shared setup of the pytest-benchmark files (bench_*.py; settings in pytest.ini).

Run:  pytest benchmarks/ --benchmark-only --benchmark-group-by=group
(``FASTPEFT_BENCH_TINY=1`` shrinks the cases to a smoke test).  Benchmarks marked
``gpu`` are skipped without a CUDA device.
"""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def tiny() -> bool:
    """FASTPEFT_BENCH_TINY=1: smoke-test sizes."""
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def run_benchmark(benchmark, fn, device: str) -> None:
    """Time the zero-argument ``fn`` with pytest-benchmark after one warm-up call; on CUDA each call
    ends with a synchronise so that the kernels' time is counted."""
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()

        timed()
        benchmark(timed)
    else:
        fn()  # warm up
        benchmark(fn)
