"""Driven by the registry: what every op package must have, and one check every op gets.

* Structure: every op package (``fastpeft.ops.op_packages()``) defines registry ops with example
  inputs, has its test file, its benchmark cases (``fastpeft/bench/cases/ops/<package>.py``) and
  pytest-benchmark file, and, with Triton kernels, ``triton_kernel.aot_launches()`` (checked by
  ``test_triton_aot.py``); every op of ``fastpeft.ops`` belongs to one.
* Every backend of every op agrees with the float64 torch reference on the op's example inputs:
  here on the CPU (float32; Triton through the interpreter), and on CUDA (``-m gpu``,
  ``benchmarks/gpu_run.sh``) in every dtype the backend declares.  Forward only: the op test
  files check gradients, odd shapes and options.
"""
import ast
import importlib
import os

import pytest
import torch

import fastpeft
from fastpeft import backends
from fastpeft.ops import op_packages

from ..helpers import TOL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_of(op) -> str:
    """The op package an op's implementations live in (``fastpeft.ops.<package>...``)."""
    return op.impls["torch"].fn.__module__.split(".")[2]


def _ops():
    """The registry's ops of fastpeft.ops (tests may register toy ops of their own)."""
    return {n: op for n, op in sorted(backends.all_ops().items())
            if "torch" in op.impls and op.impls["torch"].fn.__module__.startswith("fastpeft.ops.")}


# -- structure ----------------------------------------------------------------------------
@pytest.mark.parametrize("package", op_packages())
def test_op_package_has_its_files(package):
    ops = [n for n, op in _ops().items() if _package_of(op) == package]
    assert ops, f"fastpeft/ops/{package}/ defines no op (define_op) or is not imported by fastpeft/ops/__init__.py"
    for name in ops:
        op = backends.get_op(name)
        assert op.example is not None, f"op {name}: define_op({name!r}, example=...) is missing"
        assert set(op.impls) <= set(backends.BACKENDS) and "torch" in op.impls, f"op {name}: no torch backend"
    for rel in (f"tests/ops/test_{package}.py", f"benchmarks/bench_{package}.py",
                f"fastpeft/bench/cases/ops/{package}.py"):
        assert os.path.exists(os.path.join(ROOT, rel)), f"op package {package}: {rel} is missing (see CONTRIBUTING.md)"
    cases = importlib.import_module(f"fastpeft.bench.cases.ops.{package}")
    assert cases.VARIANTS and callable(cases.cases), f"{cases.__name__}: needs VARIANTS and cases(suite, device)"
    assert cases.cases("smoke", torch.device("cpu")), f"{cases.__name__}: no case in the smoke suite"
    kernel = os.path.join(ROOT, "fastpeft", "ops", package, "triton_kernel.py")
    if os.path.exists(kernel):  # parsed, not imported: Triton may be missing here
        tree = ast.parse(open(kernel).read())
        assert "aot_launches" in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, \
            f"{kernel}: no aot_launches() (the launches tests/triton_aot.py compiles for GPUs)"


def test_every_op_belongs_to_an_op_package():
    packages = set(op_packages())
    assert {_package_of(op) for op in _ops().values()} <= packages
    assert len(_ops()) >= len(packages)


# -- every backend agrees with the reference on the example inputs ---------------------------
def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _copy(x, **to):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().to(**to) if x.is_floating_point() else x.detach().clone().to(to.get("device"))
    if isinstance(x, (list, tuple)):
        return type(x)(_copy(v, **to) for v in x)
    return x


def _run(name: str, backend: str, args: tuple) -> list:
    """The op's outputs and then its tensor arguments (in-place ops change them), after one call."""
    with fastpeft.use_backend(backend, op=name), torch.no_grad():
        out = backends.get_op(name)(*args)
    return _tensors(out) + _tensors(args)


def check_against_reference(name: str, backend: str, device: str, dtype: torch.dtype) -> None:
    op = backends.get_op(name)
    args = op.example_inputs(device, dtype)
    reason = op.why_not(backend, *args)
    if reason is not None:
        pytest.skip(reason)
    expected = _run(name, "torch", _copy(args, device="cpu", dtype=torch.float64))
    actual = _run(name, backend, _copy(args))
    assert len(actual) == len(expected)
    atol, rtol = TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.device.type == device, f"{name} on {backend}: tensor {i}"
        big = 4.0 * max(1.0, float(e.abs().max()) if e.numel() else 1.0)
        torch.testing.assert_close(a.cpu().double(), e.double(), atol=atol * big, rtol=rtol,
                                   msg=lambda m, i=i: f"{name} on {backend} ({dtype}), tensor {i}: {m}")


def _cpu_params():
    return [pytest.param(name, b, id=f"{name}-{b}") for name, op in _ops().items() for b in op.impls if b != "torch"]


def _gpu_params():
    out = []
    for name, op in _ops().items():
        for b in ("cuda", "triton"):
            if b in op.impls:
                for dt in op.impls[b].dtypes or (torch.float32,):
                    out.append(pytest.param(name, b, dt, id=f"{name}-{b}-{str(dt).replace('torch.', '')}",
                                            marks=pytest.mark.gpu))
    return out


@pytest.mark.parametrize("name,backend", _cpu_params())
def test_backend_matches_reference_on_cpu(name, backend):
    check_against_reference(name, backend, "cpu", torch.float32)


@pytest.mark.parametrize("name,backend,dtype", _gpu_params())
def test_backend_matches_reference_on_gpu(name, backend, dtype):
    check_against_reference(name, backend, "cuda", dtype)


def test_the_check_can_fail(monkeypatch):
    """A backend that returns a wrong answer is caught (scaled_add's cpu backend made to drop alpha)."""
    impl = backends.get_op("scaled_add").impls["cpu"]
    if backends.get_op("scaled_add").why_not("cpu") is not None:
        pytest.skip("the cpu backend cannot run here")
    monkeypatch.setattr(impl, "fn", lambda a, b, alpha: a + b)
    with pytest.raises(AssertionError, match="scaled_add on cpu"):
        check_against_reference("scaled_add", "cpu", "cpu", torch.float32)
