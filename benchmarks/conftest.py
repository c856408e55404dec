"""Shared setup of the pytest-benchmark files (bench_*.py; settings in pytest.ini).

The files are thin wrappers over the cases of ``fastpeft bench`` (``fastpeft/bench/cases/``,
``fastpeft/bench/e2e.py``): the same shapes, inputs and variants, one pytest-benchmark test per
case and variant, grouped (``benchmark.group``) per case so the variants compare side by side.

Run:  pytest benchmarks/ --benchmark-only --benchmark-group-by=group
``FASTPEFT_BENCH_SUITE`` picks the suite (default: ``full`` for the op files, ``quick`` for
``bench_e2e.py``); ``FASTPEFT_BENCH_TINY=1`` means ``smoke``.  Benchmarks marked ``gpu`` are
skipped without a CUDA device.
"""
import importlib
import os

import pytest
import torch

from fastpeft.bench.cases import Skip


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def tiny() -> bool:
    """FASTPEFT_BENCH_TINY=1: smoke-test sizes."""
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def suite(default: str) -> str:
    """The suite whose cases the files run: smoke with FASTPEFT_BENCH_TINY=1, else
    FASTPEFT_BENCH_SUITE, else ``default``."""
    return "smoke" if tiny() else os.environ.get("FASTPEFT_BENCH_SUITE", default)


def case_params(cases_of, variants, suite_name: str) -> list:
    """pytest params ``(device, case, variant)`` for every case ``cases_of(suite_name, device)`` on the
    CPU and, marked ``gpu``, on CUDA, times every name in ``variants``."""
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for case in cases_of(suite_name, torch.device(device)):
            for v in variants:
                params.append(pytest.param(device, case, v, marks=marks,
                                           id=f"{device}-{case.name.split('/', 1)[-1]}-{v}"))
    return params


_BUILT: dict = {}


def _built(device: str, case):
    """(Built, None) or (None, why it cannot run); one case's tensors / models alive at a time,
    shared by its variants."""
    key = (device, case.name)
    if key not in _BUILT:
        _BUILT.clear()
        try:
            _BUILT[key] = case.build(torch.device(device)), None
        except Skip as e:
            _BUILT[key] = None, str(e)
    return _BUILT[key]


def run_variant(benchmark, device: str, case, variant: str, rounds: int | None = None) -> None:
    """Time ``variant`` of ``case`` on ``device``: pytest-benchmark's calibrated loop, or ``rounds``
    rounds of one call (long calls, e.g. training steps)."""
    built, why = _built(device, case)
    if built is None:
        pytest.skip(why)
    if variant not in built.variants:
        pytest.skip(built.skipped.get(variant, f"variant {variant!r} is not available here"))
    fn = built.variants[variant]
    if device == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize()
    benchmark.group = f"{case.group}-{device}-{case.name.split('/', 1)[-1]}"
    benchmark.extra_info.update(variant=variant, note=built.notes.get(variant), **case.params)
    fn()  # warm up (compiles, allocator)
    if rounds is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


def op_benchmark(package: str):
    """The test of ``benchmarks/bench_<package>.py``: every case of ``fastpeft/bench/cases/ops/<package>.py``
    in the suite, on each device, for each of its ``VARIANTS``."""
    mod = importlib.import_module(f"fastpeft.bench.cases.ops.{package}")

    @pytest.mark.parametrize("device,case,variant", case_params(mod.cases, mod.VARIANTS, suite("full")))
    def test(benchmark, device, case, variant):
        run_variant(benchmark, device, case, variant)

    test.__name__ = f"test_{package}"
    return test
