"""The Triton (and CUDA C++) kernels on a real GPU against the float64 references: a short, compile-frugal
selection for a GPU session (``benchmarks/gpu_run.sh`` runs ``-m gpu`` with FASTPEFT_TRITON_AUTOTUNE=off).

The op test files cover every shape and dtype on CPU (Triton through the interpreter); on a GPU their
CPU-tensor cases skip the Triton backend, so this file is what runs the LoRA and adapter kernels on
the device: fp32 / fp16 / bf16 activations, fp32 LoRA parameters with bf16 activations, odd (prime)
and 3-D shapes, dropout on and off, ranks that pad to 16 and to 64, and a size with many tiles.
Every case is one new compile per kernel, so keep the list short.
"""
import pytest
import torch

import fastpeft
from fastpeft.kernels.philox import dropout_keep_mask
from fastpeft.ops import bottleneck_adapter, lora_linear, scaled_add
from fastpeft.ops.bottleneck_adapter import bottleneck_adapter_reference

from ..helpers import TOL
from .test_lora_linear import check_all, make

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731

# (lead dims, K, N, r, dropout_p, bias)
LORA_CASES = {
    "prime-3d-r5": ((3, 37), 67, 45, 5, 0.1, True),
    "tiles-r64": ((1031,), 512, 384, 64, 0.1, False),
    "no-dropout-r16": ((257,), 128, 256, 16, 0.0, True),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_lora_linear_triton_matches_float64(case, dtype):
    lead, K, N, r, p, bias = LORA_CASES[case]
    inputs = make(lead, K, N, r, dtype, DEV, bias=bias)
    check_all("triton", inputs, 1.7, p, 1234567, dtype)


def test_lora_linear_triton_fp32_params_with_bf16_activations():
    inputs = make((5, 29), 96, 80, 8, torch.bfloat16, DEV, lora_dtype=torch.float32)
    check_all("triton", inputs, 2.0, 0.1, 99, torch.bfloat16)


def test_lora_linear_triton_mask_is_the_shared_philox_mask():
    """x = 1, W = 0, A = 1, B = 1, r = 1: y[m, n] = sum_k keep[m, k] / (1 - p), the torch mask's row sums."""
    M, K, p, seed = 70, 300, 0.3, 2024
    x = torch.ones(M, K, device=DEV)
    with fastpeft.use_backend("triton", op="lora_linear"):
        y = lora_linear(x, torch.zeros(2, K, device=DEV), None, torch.ones(1, K, device=DEV),
                        torch.ones(2, 1, device=DEV), 1.0, p, seed)
    keep = dropout_keep_mask(seed, M, K, p, stream=0).double()
    torch.testing.assert_close(y[:, 0].double().cpu(), keep.sum(1) / (1 - p), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("activation,residual,p", [("gelu", True, 0.2), ("relu", False, 0.0), ("silu", True, 0.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bottleneck_adapter_triton_matches_float64(activation, residual, p, dtype):
    H, Bn, seed = 67, 19, 4242
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, H, generator=g, dtype=torch.float64)
    params = [torch.randn(Bn, H, generator=g, dtype=torch.float64) * 0.1 / H ** 0.5,
              torch.empty(Bn, dtype=torch.float64).uniform_(0.5, 1.5, generator=g) * (torch.randint(0, 2, (Bn,), generator=g) * 2 - 1),
              torch.randn(H, Bn, generator=g, dtype=torch.float64) / Bn ** 0.5,
              torch.randn(H, generator=g, dtype=torch.float64) * 0.5]
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in [x] + params]
    y64 = bottleneck_adapter_reference(*leaves64, activation, p, seed, residual)
    grads64 = torch.autograd.grad(y64, leaves64, gy)
    leaves = [t.to(DEV, dtype).requires_grad_() for t in [x] + params]
    with fastpeft.use_backend("triton", op="bottleneck_adapter"):
        y = bottleneck_adapter(*leaves, activation=activation, dropout_p=p, seed=seed, residual=residual)
    grads = torch.autograd.grad(y, leaves, gy.to(DEV, dtype))
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("y", "dx", "dW_down", "db_down", "dW_up", "db_up"), (y,) + grads, (y64,) + grads64):
        assert a.dtype == dtype, name
        e = e.detach()
        big = 2.0 * max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.detach().double().cpu(), e, atol=atol * big, rtol=rtol,
                                   msg=lambda m, name=name: f"{name} ({dtype}, {activation}): {m}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_scaled_add_on_gpu(backend, dtype):
    if backend == "cuda" and not fastpeft._ext.has_cuda_kernels():
        pytest.skip("fastpeft._C was built without CUDA kernels")
    a = torch.randn(3, 1001, device=DEV, dtype=dtype)
    b = torch.randn(3, 1001, device=DEV, dtype=dtype)
    with fastpeft.use_backend(backend, op="scaled_add"):
        out = scaled_add(a, b, 0.75)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), a.double() + 0.75 * b.double(), atol=atol, rtol=rtol)
