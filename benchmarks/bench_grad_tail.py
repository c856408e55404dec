"""``grad_tail``: the cases of ``fastpeft bench`` (shapes, inputs, variants and floor documented in
``fastpeft/bench/cases/ops/grad_tail.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_grad_tail.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_grad_tail = op_benchmark("grad_tail")
