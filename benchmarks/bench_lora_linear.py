"""LoRA linear layer, forward + backward: fused vs reference vs HF PEFT vs the floor.

Groups (``benchmark.group``) are one shape each, so these compare side by side:

* ``fused``     — :func:`fastpeft.ops.lora_linear` on the best backend here (cpu / triton);
* ``reference`` — the same op forced to the ``torch`` backend;
* ``hf_peft``   — ``peft.tuners.lora.Linear`` wrapping an ``nn.Linear`` with the same weights;
* ``floor``     — the frozen ``nn.Linear`` alone (forward + gradient to x).

Each run is forward + backward to x, lora_A and lora_B (the base weight frozen).
Sizes follow issue 3: CPU fp32 M=2048, K=N in {512, 1024}, r in {8, 16, 64}, dropout in {0, 0.1};
GPU (when CUDA is there) bf16 M in {2048, 8192}, K=N in {1024, 4096}, same r and dropout.
``FASTPEFT_BENCH_TINY=1`` shrinks everything to a smoke test.

The top-level ``make_*`` / ``run_*`` functions are the reusable case builders
(the ``fastpeft bench`` suite imports them).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from conftest import run_benchmark

import fastpeft
from fastpeft.ops import lora_linear

ALPHA = 16.0
VARIANTS = ("fused", "reference", "hf_peft", "floor")


def cpu_cases():
    """(M, K, N, r, dropout_p, dtype) for the CPU benchmark."""
    if os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0"):
        return [(64, 32, 32, 4, p, torch.float32) for p in (0.0, 0.1)]
    return [(2048, kn, kn, r, p, torch.float32)
            for kn, r, p in itertools.product((512, 1024), (8, 16, 64), (0.0, 0.1))]


def gpu_cases():
    """(M, K, N, r, dropout_p, dtype) for the GPU benchmark (bf16)."""
    if os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0"):
        return [(256, 128, 128, 16, p, torch.bfloat16) for p in (0.0, 0.1)]
    return [(m, kn, kn, r, p, torch.bfloat16)
            for m, kn, r, p in itertools.product((2048, 8192), (1024, 4096), (8, 16, 64), (0.0, 0.1))]


def make_inputs(M: int, K: int, N: int, r: int, dtype=torch.float32, device="cpu", bias: bool = True,
                seed: int = 0) -> dict:
    """Tensors of one LoRA layer case: x [M, K] (requires grad), frozen weight [N, K] and bias [N],
    trainable lora_A [r, K] and lora_B [N, r] (nonzero, unlike PEFT's init), dy [M, N]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    return {
        "x": rnd(M, K).requires_grad_(),
        "weight": rnd(N, K, std=K ** -0.5),
        "bias": rnd(N) if bias else None,
        "lora_A": rnd(r, K, std=K ** -0.5).requires_grad_(),
        "lora_B": rnd(N, r, std=r ** -0.5).requires_grad_(),
        "dy": rnd(M, N),
        "scale": ALPHA / r,
    }


def run_fused(inp: dict, dropout_p: float, seed: int = 1234, backend=None) -> torch.Tensor:
    """Forward + backward of fastpeft.ops.lora_linear (``backend`` forces one, e.g. "torch")."""
    for k in ("x", "lora_A", "lora_B"):
        inp[k].grad = None
    if backend is None:
        y = lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["scale"],
                        dropout_p, seed)
    else:
        with fastpeft.use_backend(backend, op="lora_linear"):
            y = lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["scale"],
                            dropout_p, seed)
    y.backward(inp["dy"])
    return y


def run_reference(inp: dict, dropout_p: float, seed: int = 1234) -> torch.Tensor:
    """The torch backend (pure-PyTorch reference) of the same op."""
    return run_fused(inp, dropout_p, seed, backend="torch")


def make_hf_peft_layer(inp: dict, dropout_p: float):
    """``peft.tuners.lora.Linear`` around an ``nn.Linear`` holding the same weights (base frozen)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    N, K = inp["weight"].shape
    r = inp["lora_A"].shape[0]
    base = torch.nn.Linear(K, N, bias=inp["bias"] is not None, device=inp["x"].device, dtype=inp["x"].dtype)
    with torch.no_grad():
        base.weight.copy_(inp["weight"])
        if inp["bias"] is not None:
            base.bias.copy_(inp["bias"])
    base.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=inp["scale"] * r, lora_dropout=dropout_p)
    layer = LoraLinear(base, "default", config=cfg, r=r, lora_alpha=inp["scale"] * r, lora_dropout=dropout_p)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp["lora_A"])
        layer.lora_B["default"].weight.copy_(inp["lora_B"])
    layer.to(device=inp["x"].device, dtype=inp["x"].dtype)
    layer.train()
    return layer


def run_hf_peft(layer, inp: dict) -> torch.Tensor:
    """Forward + backward of the HF PEFT layer."""
    layer.zero_grad(set_to_none=True)
    inp["x"].grad = None
    y = layer(inp["x"])
    y.backward(inp["dy"])
    return y


def make_floor_layer(inp: dict) -> torch.nn.Linear:
    """The frozen base ``nn.Linear`` alone (the floor every LoRA layer is compared with)."""
    N, K = inp["weight"].shape
    base = torch.nn.Linear(K, N, bias=inp["bias"] is not None, device=inp["x"].device, dtype=inp["x"].dtype)
    with torch.no_grad():
        base.weight.copy_(inp["weight"])
        if inp["bias"] is not None:
            base.bias.copy_(inp["bias"])
    return base.requires_grad_(False)


def run_floor(layer, inp: dict) -> torch.Tensor:
    """Forward + backward to x of the frozen base linear."""
    inp["x"].grad = None
    y = layer(inp["x"])
    y.backward(inp["dy"])
    return y


def make_case(variant: str, M, K, N, r, dropout_p, dtype, device="cpu"):
    """A zero-argument callable running one variant's forward + backward once."""
    inp = make_inputs(M, K, N, r, dtype, device)
    if variant == "fused":
        return lambda: run_fused(inp, dropout_p)
    if variant == "reference":
        return lambda: run_reference(inp, dropout_p)
    if variant == "hf_peft":
        layer = make_hf_peft_layer(inp, dropout_p)
        return lambda: run_hf_peft(layer, inp)
    if variant == "floor":
        layer = make_floor_layer(inp)
        return lambda: run_floor(layer, inp)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def peak_memory_cuda(fn) -> int:
    """Bytes of CUDA memory allocated at the peak of one ``fn()`` beyond what was allocated before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _case_id(c):
    M, K, N, r, p, dtype = c
    return f"M{M}-K{K}-N{N}-r{r}-p{p}-{str(dtype).replace('torch.', '')}"


def _run(benchmark, variant, case, device):
    M, K, N, r, p, dtype = case
    fn = make_case(variant, M, K, N, r, p, dtype, device)
    benchmark.group = f"lora_linear-{device}-{_case_id(case)}"
    benchmark.extra_info.update(variant=variant, M=M, K=K, N=N, r=r, dropout_p=p, dtype=str(dtype))
    if device == "cuda":
        fn()
        benchmark.extra_info["peak_mem_bytes"] = peak_memory_cuda(fn)
    run_benchmark(benchmark, fn, device)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cpu_cases(), ids=_case_id)
def test_lora_linear_cpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_case_id)
def test_lora_linear_gpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cuda")
