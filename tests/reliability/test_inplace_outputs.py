"""An op's output can be modified in place (issue 21): ``nn.ReLU(inplace=True)`` after a LoRA layer, or another
adapter adding into it.  The fused ops returned a view of an internal buffer, and autograd refuses in-place
changes of a custom function's view output ("Output 0 of ...lora_linear_fwd... is a view and is being
modified inplace").  Driven by the registry: every differentiable op, every backend that runs here (CPU
kernels, Triton through the interpreter; CUDA and Triton on a GPU with ``-m gpu``)."""
import pytest
import torch

import fastpeft
from fastpeft import backends

from ..helpers import TOL
from ..ops.test_every_op import _copy, _ops, _tensors


def _differentiable(args) -> list:
    return [t for t in _tensors(args) if t.is_floating_point()]


def _leaf_count(op, backend, args) -> int:
    """How many of the leading floating inputs can require grad on this backend: all of them, except where a
    backend differentiates only some inputs (rope's fused kernels give no gradient to cos/sin)."""
    n = len(_differentiable(args))
    while n > 0:
        trial = _copy(args)
        for t in _differentiable(trial)[:n]:
            t.requires_grad_(True)
        if op.why_not(backend, *trial) is None:
            return n
        n -= 1
    return 0


def _grads_after_inplace(name, backend, args, n_leaves):
    args = _copy(args)
    leaves = _differentiable(args)[:n_leaves]
    for t in leaves:
        t.requires_grad_(True)
    with fastpeft.use_backend(backend, op=name):
        out = backends.get_op(name)(*args)
    outs = [o for o in _tensors(out) if o.requires_grad]
    if not outs:
        return None
    for o in outs:
        o.relu_()  # in place, as nn.ReLU(inplace=True)
    sum((o * (1.0 + torch.arange(o.numel(), dtype=o.dtype, device=o.device).view(o.shape) / 7)).sum()
        for o in outs).backward()
    return [t.grad for t in leaves]


def _params(device):
    out = []
    for name, op in _ops().items():
        for b in op.impls:
            if b == "torch" or (device == "cpu" and b == "cuda") or (device == "cuda" and b == "cpu"):
                continue
            out.append(pytest.param(name, b, id=f"{name}-{b}", marks=[pytest.mark.gpu] if device == "cuda" else []))
    return out


def check(name, backend, device):
    op = backends.get_op(name)
    if not op.differentiable:
        pytest.skip(f"{name}: inference-only (no backward)")
    args = op.example_inputs(device, torch.float32)
    reason = op.why_not(backend, *args)
    if reason is not None:
        pytest.skip(reason)
    with fastpeft.use_backend(backend, op=name), torch.no_grad():
        if not _tensors(op(*_copy(args))):
            pytest.skip(f"{name}: an in-place op (no output)")
    n_leaves = _leaf_count(op, backend, args)
    if n_leaves == 0:
        pytest.skip(f"{name}: {backend} differentiates none of the example's inputs")
    try:
        expected = _grads_after_inplace(name, "torch", args, n_leaves)
    except RuntimeError as e:  # e.g. grad_tail: its norm output is saved by the reference's own backward
        pytest.skip(f"{name}: the reference's output cannot be changed in place either ({e})")
    if expected is None:
        pytest.skip(f"{name}: no differentiable output")
    actual = _grads_after_inplace(name, backend, args, n_leaves)
    atol, rtol = TOL[torch.float32]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{name} on {backend}: gradient {i}"
        if a is not None:
            torch.testing.assert_close(a, e, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("name,backend", _params("cpu"))
def test_output_can_be_changed_in_place(name, backend):
    check(name, backend, "cpu")


@pytest.mark.parametrize("name,backend", _params("cuda"))
def test_output_can_be_changed_in_place_on_gpu(name, backend):
    check(name, backend, "cuda")

