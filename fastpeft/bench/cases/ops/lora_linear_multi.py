"""``lora_linear_multi`` cases (serving, inference): one base layer whose rows each use their own LoRA
adapter, forward only under ``torch.inference_mode``, the rows spread over the adapters at random
(interleaved, every adapter used, no base-only rows), every adapter of rank r, scale 16 / r.

Variants:

* ``fused``          -- :func:`fastpeft.ops.lora_linear_multi` on the backend it picks here (cpu / triton);
* ``fused_sgmv`` / ``fused_bgmv`` -- the same with the Triton layout forced (GPU only);
* ``torch_loop``     -- the plain per-adapter loop in PyTorch (``lora_linear_multi_loop``);
* ``hf_peft_mixed``  -- ``peft.tuners.lora.Linear`` holding the same adapters, forward with
  ``adapter_names=`` (HF PEFT's mixed-adapter batch; the baseline);
* ``one_adapter``    -- :func:`fastpeft.ops.lora_linear` on the same batch with one adapter (dropout 0):
  the cost of the batch if every row used the same adapter;
* ``floor``          -- the base ``F.linear`` alone (no variant can beat the base GEMM).

Shapes: CPU fp32 K=N=1024, 8 adapters of r=16, M in {256 (the target), 16 (decode), 2048 (prefill)}
(quick: M=256); GPU bf16 K=N=4096, r=16, M in {256, 4096} x {8, 32} adapters (quick too); smoke:
M=32, K=64, N=48, 4 adapters of r=4 (CPU), M=256, K=N=128, 8 adapters of r=16 bf16 (GPU).

Targets (issue 19): CPU fp32 M=256 over 8 adapters, K=N=1024, r=16: ``fused`` >= 0.8x the throughput
of ``one_adapter`` and >= 3x that of ``hf_peft_mixed``; GPU, each shape: ``fused`` faster than
``torch_loop``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import Built, Case, Target
from . import dtype_name, require, selected_backend

VARIANTS = ("fused", "fused_sgmv", "fused_bgmv", "torch_loop", "hf_peft_mixed", "one_adapter", "floor")
OURS = ("fused", "fused_sgmv", "fused_bgmv")
ALPHA = 16.0


def make_inputs(M: int, K: int, N: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """x [M, K], base weight [N, K] and bias, n stacked adapters (nonzero B), their scales, and the rows
    spread over the adapters at random (every adapter used once M >= n)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    idx = torch.randperm(M, generator=g) % n
    return {"x": rnd(M, K), "weight": rnd(N, K, std=K ** -0.5), "bias": rnd(N),
            "lora_A": rnd(n, r, K, std=K ** -0.5), "lora_B": rnd(n, N, r, std=r ** -0.5),
            "scales": torch.full((n,), ALPHA / r, device=device), "adapter_index": idx.to(device)}


def hf_peft_layer(inp: dict):
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


def _inference(fn):
    def run():
        with torch.inference_mode():
            return fn()

    return run


def lora_linear_multi_build(M: int, K: int, N: int, n: int, r: int, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        multi = require("fastpeft.ops", "lora_linear_multi")
        lora_linear = require("fastpeft.ops", "lora_linear")
        from ....backends import get_op
        from ....ops.lora_linear_multi import lora_linear_multi_loop

        inp = make_inputs(M, K, N, n, r, dtype, device)
        x, w, b = inp["x"], inp["weight"], inp["bias"]
        args = (x, w, b, inp["lora_A"], inp["lora_B"], inp["scales"], inp["adapter_index"])
        A0, B0, s0 = inp["lora_A"][0], inp["lora_B"][0], float(inp["scales"][0])
        variants = {"fused": lambda: multi(*args)}
        notes = {"fused": f"fastpeft.ops.lora_linear_multi (backend: "
                          f"{selected_backend('lora_linear_multi', *args, None, None)})"}
        skipped = {}
        triton_why = get_op("lora_linear_multi").why_not("triton", *args, None, None) \
            if device.type == "cuda" else "the Triton layouts are benchmarked on a GPU only"
        for layout in ("sgmv", "bgmv"):
            if triton_why is None:
                variants[f"fused_{layout}"] = lambda layout=layout: multi(*args, layout=layout)
                notes[f"fused_{layout}"] = f"fastpeft.ops.lora_linear_multi, Triton, layout={layout!r}"
            else:
                skipped[f"fused_{layout}"] = triton_why
        variants["torch_loop"] = lambda: lora_linear_multi_loop(*args)
        notes["torch_loop"] = "per-adapter loop in PyTorch: gather, two matmuls, index_add_ per adapter"
        try:
            layer, names = hf_peft_layer(inp)
            variants["hf_peft_mixed"] = lambda: layer(x, adapter_names=names)
            notes["hf_peft_mixed"] = f"peft.tuners.lora.Linear with {n} adapters, forward(adapter_names=...)"
        except ImportError as e:
            skipped["hf_peft_mixed"] = f"peft is not installed ({e})"
        variants["one_adapter"] = lambda: lora_linear(x, w, b, A0, B0, s0, 0.0)
        notes["one_adapter"] = "fastpeft.ops.lora_linear, every row on adapter 0"
        variants["floor"] = lambda: F.linear(x, w, b)
        notes["floor"] = "the base F.linear alone"
        flops = 2.0 * M * K * N + 2.0 * M * r * (K + N)
        return Built({k: _inference(fn) for k, fn in variants.items()}, floor="floor", baseline="hf_peft_mixed",
                     flops=flops, skipped=skipped, notes=notes)

    return build


def _targets(device: torch.device, M, K, N, n, r, dtype) -> list[Target]:
    if device.type == "cpu" and (M, K, N, n, r, dtype) == (256, 1024, 1024, 8, 16, torch.float32):
        return [Target("≥0.8× one-adapter throughput", "fused", "one_adapter", 1 / 0.8, source="issue 19"),
                Target("≥3× HF PEFT mixed batch", "fused", "hf_peft_mixed", 1 / 3, source="issue 19")]
    if device.type == "cuda" and (K, N, r, dtype) == (4096, 4096, 16, torch.bfloat16) \
            and M in (256, 4096) and n in (8, 32):
        return [Target("faster than the torch loop", "fused", "torch_loop", 1.0, source="issue 19")]
    return []


def cases(suite: str, device: torch.device) -> list[Case]:
    """(M, K, N, n_adapters, r) per suite and device; see the module doc."""
    if device.type == "cuda":
        dtype = torch.bfloat16
        grid = [(256, 128, 128, 8, 16)] if suite == "smoke" else \
            [(M, 4096, 4096, n, 16) for M in (256, 4096) for n in (8, 32)]
    else:
        dtype = torch.float32
        grid = {"smoke": [(32, 64, 48, 4, 4)], "quick": [(256, 1024, 1024, 8, 16)]}.get(
            suite, [(M, 1024, 1024, 8, 16) for M in (256, 16, 2048)])
    out = []
    for M, K, N, n, r in grid:
        params = {"M": M, "K": K, "N": N, "n_adapters": n, "r": r, "dtype": dtype_name(dtype)}
        out.append(Case(f"lora_linear_multi/M{M}_K{K}_N{N}_a{n}_r{r}_{dtype_name(dtype)}", "lora_linear_multi",
                        lora_linear_multi_build(M, K, N, n, r, dtype), params,
                        _targets(device, M, K, N, n, r, dtype), ours=OURS))
    return out
