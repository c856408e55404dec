"""Bottleneck adapter, forward + backward: fused vs reference vs an unfused nn.Module vs the floor.

Groups (``benchmark.group``) are one shape each, so these compare side by side:

* ``fused``     — :func:`fastpeft.ops.bottleneck_adapter` on the best backend here (cpu / triton);
* ``reference`` — the same op forced to the ``torch`` backend (pure PyTorch, Philox mask);
* ``unfused``   — ``nn.Linear -> activation -> nn.Dropout -> nn.Linear`` plus the residual, as
  adapter libraries write it (the baseline);
* ``floor``     — the residual alone: ``y = x.clone()`` forward, gradient to x backward (one M×H
  pass each way).  The adapter's own GEMMs are 4·M·H·Bn FLOPs forward, 8·M·H·Bn backward, on
  top of that; with Bn ≪ H the whole layer is close to memory-bound, so the floor is the
  honest lower bound for the bytes moved, not for the arithmetic.

Each run is forward + backward to x and all four adapter parameters (trainable).
Sizes (issue 3): CPU fp32 M=2048, H in {768, 1024}, Bn in {64, 256}, dropout in {0, 0.1};
GPU (when CUDA is there) bf16 M=8192, H=4096, Bn in {64, 256}.  ``FASTPEFT_BENCH_TINY=1``
shrinks everything to a smoke test.

The top-level ``make_*`` / ``run_*`` functions are the reusable case builders.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from conftest import run_benchmark

import fastpeft
from fastpeft.ops import bottleneck_adapter

ACTIVATION = "gelu"
VARIANTS = ("fused", "reference", "unfused", "floor")
_MODULE_ACTS = {"relu": lambda: torch.nn.ReLU(), "gelu": lambda: torch.nn.GELU(),
                "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"), "silu": lambda: torch.nn.SiLU()}


def _tiny() -> bool:
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def cpu_cases():
    """(M, H, Bn, dropout_p, dtype) for the CPU benchmark."""
    if _tiny():
        return [(64, 32, 8, p, torch.float32) for p in (0.0, 0.1)]
    return [(2048, h, bn, p, torch.float32) for h, bn, p in itertools.product((768, 1024), (64, 256), (0.0, 0.1))]


def gpu_cases():
    """(M, H, Bn, dropout_p, dtype) for the GPU benchmark (bf16)."""
    if _tiny():
        return [(256, 128, 16, p, torch.bfloat16) for p in (0.0, 0.1)]
    return [(8192, 4096, bn, p, torch.bfloat16) for bn, p in itertools.product((64, 256), (0.0, 0.1))]


def make_inputs(M: int, H: int, Bn: int, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Tensors of one adapter case: x [M, H] (requires grad), trainable W_down [Bn, H], b_down [Bn],
    W_up [H, Bn], b_up [H] (W_up nonzero, unlike the usual zero init), dy [M, H]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    return {
        "x": rnd(M, H).requires_grad_(),
        "W_down": rnd(Bn, H, std=H ** -0.5).requires_grad_(),
        "b_down": rnd(Bn, std=0.1).requires_grad_(),
        "W_up": rnd(H, Bn, std=Bn ** -0.5).requires_grad_(),
        "b_up": rnd(H, std=0.1).requires_grad_(),
        "dy": rnd(M, H),
    }


_LEAVES = ("x", "W_down", "b_down", "W_up", "b_up")


def run_fused(inp: dict, dropout_p: float, activation: str = ACTIVATION, seed: int = 1234,
              backend=None) -> torch.Tensor:
    """Forward + backward of fastpeft.ops.bottleneck_adapter (``backend`` forces one, e.g. "torch")."""
    for k in _LEAVES:
        inp[k].grad = None
    args = (inp["x"], inp["W_down"], inp["b_down"], inp["W_up"], inp["b_up"], activation, dropout_p, seed, True)
    if backend is None:
        y = bottleneck_adapter(*args)
    else:
        with fastpeft.use_backend(backend, op="bottleneck_adapter"):
            y = bottleneck_adapter(*args)
    y.backward(inp["dy"])
    return y


def run_reference(inp: dict, dropout_p: float, activation: str = ACTIVATION, seed: int = 1234) -> torch.Tensor:
    """The torch backend (pure-PyTorch reference) of the same op."""
    return run_fused(inp, dropout_p, activation, seed, backend="torch")


class UnfusedAdapter(torch.nn.Module):
    """The adapter as usually written: ``x + up(dropout(act(down(x))))``."""

    def __init__(self, H: int, Bn: int, activation: str, dropout_p: float, device=None, dtype=None):
        super().__init__()
        self.down = torch.nn.Linear(H, Bn, device=device, dtype=dtype)
        self.act = _MODULE_ACTS[activation]()
        self.dropout = torch.nn.Dropout(dropout_p)
        self.up = torch.nn.Linear(Bn, H, device=device, dtype=dtype)

    def forward(self, x):
        return x + self.up(self.dropout(self.act(self.down(x))))


def make_unfused_module(inp: dict, dropout_p: float, activation: str = ACTIVATION) -> UnfusedAdapter:
    """An :class:`UnfusedAdapter` holding the case's weights, in train mode."""
    Bn, H = inp["W_down"].shape
    mod = UnfusedAdapter(H, Bn, activation, dropout_p, device=inp["x"].device, dtype=inp["x"].dtype)
    with torch.no_grad():
        mod.down.weight.copy_(inp["W_down"])
        mod.down.bias.copy_(inp["b_down"])
        mod.up.weight.copy_(inp["W_up"])
        mod.up.bias.copy_(inp["b_up"])
    return mod.train()


def run_unfused(mod: UnfusedAdapter, inp: dict) -> torch.Tensor:
    """Forward + backward of the unfused module."""
    mod.zero_grad(set_to_none=True)
    inp["x"].grad = None
    y = mod(inp["x"])
    y.backward(inp["dy"])
    return y


def run_floor(inp: dict) -> torch.Tensor:
    """The residual alone: y = x (one copy), gradient dy to x."""
    inp["x"].grad = None
    y = inp["x"].clone()
    y.backward(inp["dy"])
    return y


def make_case(variant: str, M, H, Bn, dropout_p, dtype, device="cpu", activation: str = ACTIVATION):
    """A zero-argument callable running one variant's forward + backward once."""
    inp = make_inputs(M, H, Bn, dtype, device)
    if variant == "fused":
        return lambda: run_fused(inp, dropout_p, activation)
    if variant == "reference":
        return lambda: run_reference(inp, dropout_p, activation)
    if variant == "unfused":
        mod = make_unfused_module(inp, dropout_p, activation)
        return lambda: run_unfused(mod, inp)
    if variant == "floor":
        return lambda: run_floor(inp)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _case_id(c):
    M, H, Bn, p, dtype = c
    return f"M{M}-H{H}-Bn{Bn}-p{p}-{str(dtype).replace('torch.', '')}"


def _run(benchmark, variant, case, device):
    M, H, Bn, p, dtype = case
    fn = make_case(variant, M, H, Bn, p, dtype, device)
    benchmark.group = f"bottleneck_adapter-{device}-{_case_id(case)}"
    benchmark.extra_info.update(variant=variant, M=M, H=H, Bn=Bn, dropout_p=p, dtype=str(dtype),
                                activation=ACTIVATION)
    run_benchmark(benchmark, fn, device)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cpu_cases(), ids=_case_id)
def test_bottleneck_adapter_cpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_case_id)
def test_bottleneck_adapter_gpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cuda")
