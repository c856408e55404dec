"""``lora_linear`` cases: the fused LoRA layer (forward + backward to x, lora_A and lora_B; the
base weight frozen) against the torch reference, HF PEFT's ``peft.tuners.lora.Linear`` on the
same weights (the baseline) and the floor, the frozen ``nn.Linear`` alone (forward + backward
to x).

Shapes: CPU fp32 M=2048, K=N in {512, 1024}, r in {8, 16, 64}, dropout in {0, 0.1} (quick:
K=N=1024, r=16); GPU bf16 M in {2048, 8192}, K=N in {1024, 4096}, the same r and dropout
(quick: M=8192, K=N=4096, r=16); smoke: M=64, K=N=32, r=4.  Targets on the quick shapes: within
1.10x (no dropout) / 1.15x (dropout) of the floor and 1.4x faster than HF PEFT with dropout on
the CPU; within 1.05x / 1.08x of the floor and at most M x r extra bytes of memory on the GPU.
"""
from __future__ import annotations

import math

import torch

from .. import Built, Case, Target
from . import dtype_name, require, selected_backend, torch_backend, zero_grads

VARIANTS = ("fastpeft", "torch_ref", "hf_peft", "floor")


def lora_linear_build(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, alpha: float | None = None):
    alpha = 2.0 * r if alpha is None else alpha

    def build(device: torch.device) -> Built:
        lora_linear = require("fastpeft.ops", "lora_linear")
        g = torch.Generator(device="cpu").manual_seed(0)
        f32 = dict(dtype=torch.float32)
        x = torch.randn(M, K, generator=g, **f32).to(device, dtype).requires_grad_()
        W = (torch.randn(N, K, generator=g, **f32) / math.sqrt(K)).to(device, dtype)
        b = (torch.randn(N, generator=g, **f32) * 0.1).to(device, dtype)
        A = (torch.randn(r, K, generator=g, **f32) / math.sqrt(K)).to(device, dtype).requires_grad_()
        B = (torch.randn(N, r, generator=g, **f32) * 0.01).to(device, dtype).requires_grad_()
        gy = torch.randn(M, N, generator=g, **f32).to(device, dtype)
        scale = alpha / r

        def fused():
            lora_linear(x, W, b, A, B, scale, p).backward(gy)
            zero_grads(x, A, B)

        def reference():
            with torch_backend("lora_linear"):
                lora_linear(x, W, b, A, B, scale, p).backward(gy)
            zero_grads(x, A, B)

        base = torch.nn.Linear(K, N, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
        base.requires_grad_(False)

        def floor():
            base(x).backward(gy)
            zero_grads(x)

        variants = {"fastpeft": fused, "torch_ref": reference}
        skipped, notes = {}, {
            "fastpeft": f"fastpeft.ops.lora_linear (backend: {selected_backend('lora_linear', x, W, b, A, B, scale, p, 0)})",
            "torch_ref": "fastpeft.ops.lora_linear under use_backend('torch')",
            "floor": "frozen nn.Linear alone, forward + backward to x",
        }
        try:
            from peft import LoraConfig
            from peft.tuners.lora.layer import Linear as PeftLoraLinear

            hf_base = torch.nn.Linear(K, N, device=device, dtype=dtype)
            with torch.no_grad():
                hf_base.weight.copy_(W)
                hf_base.bias.copy_(b)
            cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
            layer = PeftLoraLinear(hf_base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=p)
            layer.to(device=device, dtype=dtype)
            layer.requires_grad_(False)
            la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                la.copy_(A)
                lb.copy_(B)
            la.requires_grad_(True)
            lb.requires_grad_(True)
            layer.train()

            def hf():
                layer(x).backward(gy)
                zero_grads(x, la, lb)

            variants["hf_peft"] = hf
            notes["hf_peft"] = "peft.tuners.lora.Linear on the same nn.Linear weights"
        except ImportError as e:
            skipped["hf_peft"] = f"peft is not installed ({e})"
        variants["floor"] = floor
        flops = 4.0 * M * K * N + 6.0 * M * r * (K + N)
        return Built(variants, floor="floor", baseline="hf_peft", flops=flops, skipped=skipped, notes=notes)

    return build


def _targets(device, M, K, N, r, p, dtype) -> list[Target]:
    t = []
    if device.type == "cpu" and (M, K, N, r, dtype) == (2048, 1024, 1024, 16, torch.float32):
        lim = 1.10 if p == 0 else 1.15
        t.append(Target(f"≤{lim:.2f}×floor", "fastpeft", "floor", lim))
        if p > 0:
            t.append(Target("≥1.4× faster than HF", "fastpeft", "hf_peft", 1 / 1.4))
    if device.type == "cuda" and (M, K, N, r, dtype) == (8192, 4096, 4096, 16, torch.bfloat16):
        lim = 1.05 if p == 0 else 1.08
        t.append(Target(f"≤{lim:.2f}×floor", "fastpeft", "floor", lim))
        t.append(Target("mem ≤ floor + M×r", "fastpeft", "floor", 1.0, metric="memory",
                        slack=M * r * torch.finfo(dtype).bits / 8))
    return t


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        grid, dtype = [(64, 32, 32, 4)], torch.float32
    elif device.type == "cuda":
        dtype = torch.bfloat16
        grid = [(8192, 4096, 4096, 16)] if suite == "quick" else \
            [(M, K, K, r) for M in (2048, 8192) for K in (1024, 4096) for r in (8, 16, 64)]
    else:
        dtype = torch.float32
        grid = [(2048, 1024, 1024, 16)] if suite == "quick" else \
            [(2048, K, K, r) for K in (512, 1024) for r in (8, 16, 64)]
    out = []
    for M, K, N, r in grid:
        for p in (0.0, 0.1):
            params = {"M": M, "K": K, "N": N, "r": r, "dropout": p, "dtype": dtype_name(dtype)}
            out.append(Case(f"lora_linear/M{M}_K{K}_N{N}_r{r}_p{p:g}_{dtype_name(dtype)}", "lora_linear",
                            lora_linear_build(M, K, N, r, p, dtype), params,
                            _targets(device, M, K, N, r, p, dtype)))
    return out
