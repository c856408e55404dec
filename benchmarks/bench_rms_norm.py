"""``rms_norm``: the cases of ``fastpeft bench`` (shapes, inputs, variants documented in
``fastpeft/bench/cases/ops/rms_norm.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_rms_norm.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_rms_norm = op_benchmark("rms_norm")
