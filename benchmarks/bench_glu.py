"""``glu``: the cases of ``fastpeft bench`` (shapes, inputs, variants documented in
``fastpeft/bench/cases/ops/glu.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_glu.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_glu = op_benchmark("glu")
