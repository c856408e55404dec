"""Multi-adapter LoRA linear (serving, inference): the fused op vs the ways to do it without it.

Each ``benchmark.group`` is one shape, so these compare side by side (forward only, under
``torch.inference_mode``; rows assigned to the adapters at random, interleaved, no base-only rows):

* ``fused``          -- :func:`fastpeft.ops.lora_linear_multi` on the best backend here (cpu / triton);
* ``fused_sgmv`` / ``fused_bgmv`` -- the same with the Triton layout forced (GPU only);
* ``torch_loop``     -- the plain per-adapter loop in PyTorch (``reference.lora_linear_multi_loop``);
* ``hf_peft_mixed``  -- ``peft.tuners.lora.Linear`` holding the same adapters, forward with ``adapter_names=``
  (HF PEFT's mixed-adapter batch);
* ``one_adapter``    -- :func:`fastpeft.ops.lora_linear` on the same batch with one adapter (dropout 0): the
  cost of the batch if every row used the same adapter;
* ``floor``          -- the base ``F.linear`` alone.

Targets (issue 19; ratios within one run, on a quiet machine): CPU fp32, M=256 over 8 adapters,
K=N=1024, r=16: ``fused`` >= 0.8x the throughput of ``one_adapter`` and >= 3x ``hf_peft_mixed``
(``floor`` shows the ceiling: no variant can beat the base GEMM alone); GPU bf16 K=N=4096: ``fused``
against ``torch_loop`` at M in {256, 4096} and 8 / 32 adapters.  ``FASTPEFT_BENCH_TINY=1`` shrinks
everything to a smoke test.

The top-level ``make_*`` functions are reusable case builders.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import run_benchmark, tiny

from fastpeft.ops import lora_linear, lora_linear_multi
from fastpeft.ops.lora_linear_multi import lora_linear_multi_loop

ALPHA = 16.0

CPU_VARIANTS = ("fused", "torch_loop", "hf_peft_mixed", "one_adapter", "floor")
GPU_VARIANTS = ("fused", "fused_sgmv", "fused_bgmv", "torch_loop", "hf_peft_mixed", "one_adapter", "floor")


def cpu_cases():
    """(M, K, N, n_adapters, r, dtype): the issue's target shape, plus a decode batch and a prefill batch."""
    if tiny():
        return [(32, 64, 48, 4, 4, torch.float32)]
    return [(256, 1024, 1024, 8, 16, torch.float32), (16, 1024, 1024, 8, 16, torch.float32),
            (2048, 1024, 1024, 8, 16, torch.float32)]


def gpu_cases():
    if tiny():
        return [(256, 128, 128, 8, 16, torch.bfloat16)]
    return [(m, 4096, 4096, n, 16, torch.bfloat16) for m, n in itertools.product((256, 4096), (8, 32))]


def make_inputs(M, K, N, n, r, dtype=torch.float32, device="cpu", seed=0) -> dict:
    """One case: x [M, K], base weight [N, K] and bias, n stacked adapters (nonzero B), scales, rows spread
    over the adapters at random (every adapter used once M >= n)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    idx = torch.randperm(M, generator=g) % n
    return {"x": rnd(M, K), "weight": rnd(N, K, std=K ** -0.5), "bias": rnd(N),
            "lora_A": rnd(n, r, K, std=K ** -0.5), "lora_B": rnd(n, N, r, std=r ** -0.5),
            "scales": torch.full((n,), ALPHA / r, device=device), "adapter_index": idx.to(device)}


def make_hf_peft_layer(inp: dict):
    """``peft.tuners.lora.Linear`` around an ``nn.Linear`` with the same weights, one PEFT adapter per
    stacked adapter (names "a0", "a1", ...), and the ``adapter_names`` list of the batch."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    N, K = inp["weight"].shape
    n, r, _ = inp["lora_A"].shape
    x = inp["x"]
    base = torch.nn.Linear(K, N, device=x.device, dtype=x.dtype).requires_grad_(False)
    alpha = float(inp["scales"][0]) * r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = LoraLinear(base, "a0", config=cfg, r=r, lora_alpha=alpha)
    for a in range(1, n):
        layer.update_layer(f"a{a}", r, alpha, config=cfg)
    with torch.no_grad():
        base.weight.copy_(inp["weight"])
        base.bias.copy_(inp["bias"])
        for a in range(n):
            layer.lora_A[f"a{a}"].weight.copy_(inp["lora_A"][a])
            layer.lora_B[f"a{a}"].weight.copy_(inp["lora_B"][a])
    layer.to(device=x.device, dtype=x.dtype).eval()
    return layer, [f"a{a}" for a in inp["adapter_index"].tolist()]


def make_case(variant: str, M, K, N, n, r, dtype, device="cpu"):
    """A zero-argument callable running one variant's forward once (under inference_mode)."""
    inp = make_inputs(M, K, N, n, r, dtype, device)
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["scales"], inp["adapter_index"])
    if variant in ("fused", "fused_sgmv", "fused_bgmv"):
        layout = None if variant == "fused" else variant.split("_")[1]
        fn = lambda: lora_linear_multi(*args, layout=layout)  # noqa: E731
    elif variant == "torch_loop":
        fn = lambda: lora_linear_multi_loop(*args)  # noqa: E731
    elif variant == "hf_peft_mixed":
        layer, names = make_hf_peft_layer(inp)
        fn = lambda: layer(inp["x"], adapter_names=names)  # noqa: E731
    elif variant == "one_adapter":
        A, B, s = inp["lora_A"][0], inp["lora_B"][0], float(inp["scales"][0])
        fn = lambda: lora_linear(inp["x"], inp["weight"], inp["bias"], A, B, s, 0.0)  # noqa: E731
    elif variant == "floor":
        fn = lambda: F.linear(inp["x"], inp["weight"], inp["bias"])  # noqa: E731
    else:
        raise ValueError(f"variant must be one of {GPU_VARIANTS}, got {variant!r}")

    def run():
        with torch.inference_mode():
            return fn()

    return run


def _case_id(c):
    M, K, N, n, r, dtype = c
    return f"M{M}-K{K}-N{N}-a{n}-r{r}-{str(dtype).replace('torch.', '')}"


def _run(benchmark, variant, case, device):
    M, K, N, n, r, dtype = case
    fn = make_case(variant, M, K, N, n, r, dtype, device)
    benchmark.group = f"lora_linear_multi-{device}-{_case_id(case)}"
    benchmark.extra_info.update(variant=variant, M=M, K=K, N=N, n_adapters=n, r=r, dtype=str(dtype))
    run_benchmark(benchmark, fn, device)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("case", cpu_cases(), ids=_case_id)
def test_lora_linear_multi_cpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_case_id)
def test_lora_linear_multi_gpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cuda")
