"""scaled_add against its float64 reference on every backend (template for op tests)."""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import scaled_add

from ..helpers import assert_close, runnable_backends

BACKENDS = runnable_backends("scaled_add")
SHAPES = [(0,), (1,), (7, 13), (3, 5, 11), (1031,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_forward_backward_matches_float64(backend, shape, dtype):
    if backend in ("triton", "cuda") and dtype == torch.float64:
        pytest.skip("float64 is not a GPU dtype of this op")
    a = torch.randn(shape, dtype=dtype, requires_grad=True)
    b = torch.randn(shape, dtype=dtype, requires_grad=True)
    alpha = float(torch.empty(()).uniform_(-3, 3))
    g = torch.randn(shape, dtype=dtype)
    with fastpeft.use_backend(backend):
        out = scaled_add(a, b, alpha)
    out.backward(g)
    a64, b64, g64 = a.detach().double(), b.detach().double(), g.double()
    assert out.dtype == dtype and out.shape == a.shape
    assert_close(out, a64 + alpha * b64, dtype, "out", scale=4)
    assert_close(a.grad, g64, dtype, "grad a")
    assert_close(b.grad, alpha * g64, dtype, "grad b", scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    a = torch.randn(9, 14)[:, ::2]
    b = torch.randn(7, 9).t()
    with fastpeft.use_backend(backend):
        out = scaled_add(a, b, 0.25)
    assert_close(out, a.double() + 0.25 * b.double(), torch.float32, "out")


def test_bad_input_names_the_argument():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="b: expected shape"):
        scaled_add(a, torch.randn(4, 3))
    with pytest.raises(TypeError, match="b: expected dtype"):
        scaled_add(a, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="alpha: expected a number"):
        scaled_add(a, a, "2")
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        scaled_add([1.0], a)


def test_forced_unsupported_backend_raises():
    a = torch.randn(4, dtype=torch.float64)
    with fastpeft.use_backend("cuda"), pytest.raises(BackendError, match="cuda"):
        scaled_add(a, a)


@pytest.mark.parametrize("name", ["scaled_add", "scaled_add_triton"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(5, 3, requires_grad=True)
    opcheck(op.default, (a, b, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, 5, requires_grad=True)
    torch._dynamo.reset()
    with fastpeft.use_backend(backend):
        f = torch.compile(lambda a, b: scaled_add(a, b, -1.5).square().sum(), fullgraph=True)
        loss = f(a, b)
    loss.backward()
    ref = (a.detach().double() - 1.5 * b.detach().double())
    assert_close(loss, ref.square().sum(), torch.float32, "loss", scale=10)
    assert_close(b.grad, -1.5 * 2 * ref, torch.float32, "grad b", scale=10)


def test_first_call_inside_torch_compile_probes_availability():
    """The availability probe must be traceable: an op's very first call may happen inside Dynamo."""
    from fastpeft import backends

    backends.clear_availability_cache()
    torch._dynamo.reset()
    a = torch.randn(3, 4)
    out = torch.compile(lambda a: scaled_add(a, a, 2.0), fullgraph=True)(a)
    torch.testing.assert_close(out, 3 * a)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_on_gpu(backend, dtype):
    if backend == "cuda" and not fastpeft._ext.has_cuda_kernels():
        pytest.skip("fastpeft._C was built without CUDA kernels")
    a = torch.randn(3, 1001, device="cuda", dtype=dtype)
    b = torch.randn(3, 1001, device="cuda", dtype=dtype)
    with fastpeft.use_backend(backend, op="scaled_add"):
        out = scaled_add(a, b, 0.75)
    assert_close(out, a.double() + 0.75 * b.double(), dtype, "out")
