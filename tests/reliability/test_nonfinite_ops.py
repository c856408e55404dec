"""NaN and inf propagate through every op exactly as its reference does (issue 16, item 11).

Driven by the registry, like ``tests/ops/test_every_op.py``: for every op, every backend that runs here
(the CPU kernels, Triton through the interpreter; CUDA and Triton on a GPU with ``-m gpu``), every floating
tensor argument and each of NaN, +inf and -inf planted at two positions, the backend's outputs (and the
arguments an in-place op changes) have NaN exactly where the reference's have NaN, the same infinities,
and the same finite values (within the dtype's tolerance).  ``VARIANTS`` adds the other values of an op's
option arguments (norms, activations) to its example call.
"""
import math

import pytest
import torch

from fastpeft import backends

from ..helpers import TOL
from ..ops.test_every_op import _copy, _ops, _run, _tensors

# op name -> {argument index: other values to try besides the example's}
VARIANTS = {
    "adv_perturb_update": {3: ("linf", "l2_token", "l2_example")},
    "adv_perturb_init": {},
    "bottleneck_adapter": {5: ("relu", "gelu", "silu")},
}
SPECIALS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _calls(name: str, args: tuple) -> list:
    out = [("example", args)]
    for i, values in VARIANTS.get(name, {}).items():
        out += [(f"{i}={v}", args[:i] + (v,) + args[i + 1:]) for v in values if v != args[i]]
    return out


def _slots(args) -> list:
    """(index into _tensors(args), flat position) of the floating tensor elements to poison."""
    out = []
    for i, t in enumerate(_tensors(args)):
        if t.is_floating_point() and t.numel():
            out += [(i, 0), (i, t.numel() // 2)] if t.numel() > 1 else [(i, 0)]
    return out


def _poisoned(args, slot, value):
    args = _copy(args)
    t = _tensors(args)[slot[0]]
    with torch.no_grad():
        t.view(-1)[slot[1]] = value
    return args


def _params(device: str):
    out = []
    for name, op in _ops().items():
        for b in op.impls:
            # the CPU run takes the C++ kernels and Triton through its interpreter; the GPU run cuda and triton
            if b == "torch" or (device == "cpu" and b == "cuda") or (device == "cuda" and b == "cpu"):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            out.append(pytest.param(name, b, id=f"{name}-{b}", marks=marks))
    return out


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, what
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (f"{what}: NaN at {nan_a.nonzero().tolist()[:8]}, the reference has NaN at "
                                       f"{nan_e.nonzero().tolist()[:8]}")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), \
        f"{what}: infinities {a[inf_a].tolist()[:8]} at {inf_a.nonzero().tolist()[:8]}, the reference " \
        f"{e[inf_e].tolist()[:8]} at {inf_e.nonzero().tolist()[:8]}"
    fin = torch.isfinite(e)
    atol, rtol = TOL[actual.dtype]
    big = 4.0 * max(1.0, float(e[fin].abs().max()) if fin.any() else 1.0)
    torch.testing.assert_close(a[fin], e[fin], atol=atol * big, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_nonfinite(name: str, backend: str, device: str, dtype=torch.float32) -> int:
    op = backends.get_op(name)
    example = op.example_inputs(device, dtype)
    reason = op.why_not(backend, *example)
    if reason is not None:
        pytest.skip(reason)
    n = 0
    for label, args in _calls(name, example):
        for slot in _slots(args):
            for vname, value in SPECIALS.items():
                bad = _poisoned(args, slot, value)
                expected = _run(name, "torch", _copy(bad))
                actual = _run(name, backend, _copy(bad))
                assert len(actual) == len(expected)
                for k, (a, e) in enumerate(zip(actual, expected)):
                    if a.is_floating_point():
                        assert_same_nonfinite(a, e, f"{name} on {backend} ({label}), {vname} in tensor argument "
                                                    f"{slot[0]} at {slot[1]}: tensor {k}")
                    else:
                        assert torch.equal(a.cpu(), e.cpu()), f"{name} on {backend} ({label}), {vname}: tensor {k}"
                n += 1
    return n


@pytest.mark.parametrize("name,backend", _params("cpu"))
def test_nonfinite_inputs_propagate_as_in_the_reference(name, backend):
    assert check_nonfinite(name, backend, "cpu") > 0


@pytest.mark.parametrize("name,backend", _params("cuda"))
def test_nonfinite_inputs_propagate_as_in_the_reference_on_gpu(name, backend):
    assert check_nonfinite(name, backend, "cuda") > 0


def test_every_op_is_checked():
    """The registry drives the test: a new op is in it without editing this file."""
    names = {p.values[0] for p in _params("cpu")} | {p.values[0] for p in _params("cuda")}
    assert names == set(_ops())


def test_the_check_can_fail():
    """A result that turns NaN into a finite number is caught (what the CPU adv_perturb_update did)."""
    with pytest.raises(AssertionError, match="NaN"):
        assert_same_nonfinite(torch.tensor([1.0, 2e7]), torch.tensor([1.0, math.nan]), "x")
    with pytest.raises(AssertionError, match="infinities"):
        assert_same_nonfinite(torch.tensor([1.0, math.inf]), torch.tensor([1.0, -math.inf]), "x")
