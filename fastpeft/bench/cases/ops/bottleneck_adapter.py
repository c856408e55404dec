"""``bottleneck_adapter`` cases: the fused adapter (forward + backward to x and all four adapter
parameters, GELU, residual on) against the torch reference, the adapter as adapter libraries
write it, ``nn.Linear -> activation -> nn.Dropout -> nn.Linear`` plus the residual (the
baseline), and the floor, the residual alone (``y = x.clone()`` forward, gradient to x
backward: one M x H pass each way).  With a bottleneck much narrower than H the layer is close
to memory-bound, so the floor bounds the bytes moved, not the adapter's 12·M·H·Bn FLOPs.

Shapes: CPU fp32 M=2048, H in {768, 1024}, bottleneck 64, dropout in {0, 0.1} (quick: H=1024,
dropout 0.1); GPU bf16 M=8192, H=4096, bottleneck 64 and 256, and M=2048, H=1024 (quick:
M=8192, H=4096, bottleneck 64), dropout in {0, 0.1}; smoke: M=64, H=32, bottleneck 8.
"""
from __future__ import annotations

import math

import torch

from .. import Built, Case
from . import dtype_name, require, selected_backend, torch_backend, zero_grads

VARIANTS = ("fastpeft", "torch_ref", "unfused", "floor")


def bottleneck_adapter_build(M: int, H: int, Bn: int, act: str, p: float, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        adapter = require("fastpeft.ops", "bottleneck_adapter")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(M, H, generator=g).to(device, dtype).requires_grad_()
        Wd = (torch.randn(Bn, H, generator=g) / math.sqrt(H)).to(device, dtype).requires_grad_()
        bd = torch.zeros(Bn).to(device, dtype).requires_grad_()
        Wu = (torch.randn(H, Bn, generator=g) * 0.01).to(device, dtype).requires_grad_()
        bu = torch.zeros(H).to(device, dtype).requires_grad_()
        gy = torch.randn(M, H, generator=g).to(device, dtype)
        params = (x, Wd, bd, Wu, bu)

        def fused():
            adapter(x, Wd, bd, Wu, bu, act, p, None, True).backward(gy)
            zero_grads(*params)

        def reference():
            with torch_backend("bottleneck_adapter"):
                adapter(x, Wd, bd, Wu, bu, act, p, None, True).backward(gy)
            zero_grads(*params)

        acts = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh"),
                "silu": torch.nn.SiLU()}
        down = torch.nn.Linear(H, Bn, device=device, dtype=dtype)
        up = torch.nn.Linear(Bn, H, device=device, dtype=dtype)
        with torch.no_grad():
            down.weight.copy_(Wd)
            down.bias.copy_(bd)
            up.weight.copy_(Wu)
            up.bias.copy_(bu)
        drop, a = torch.nn.Dropout(p), acts[act]
        mods = (down, up)

        def unfused():
            (x + up(drop(a(down(x))))).backward(gy)
            zero_grads(x, *[q for m in mods for q in m.parameters()])

        def floor():
            x.clone().backward(gy)
            zero_grads(x)

        notes = {"fastpeft": "fastpeft.ops.bottleneck_adapter (backend: "
                             f"{selected_backend('bottleneck_adapter', x, Wd, bd, Wu, bu, act, p, 0, True)})",
                 "torch_ref": "fastpeft.ops.bottleneck_adapter under use_backend('torch')",
                 "unfused": "nn.Linear -> activation -> nn.Dropout -> nn.Linear + residual",
                 "floor": "the residual alone: y = x.clone(), gradient to x (one M x H pass each way)"}
        flops = 2.0 * M * H * Bn * 2 * 3  # two GEMMs, forward + two backward GEMMs each
        return Built({"fastpeft": fused, "torch_ref": reference, "unfused": unfused, "floor": floor},
                     floor="floor", baseline="unfused", flops=flops, notes=notes)

    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        grid, dtype, ps = [(64, 32, 8)], torch.float32, (0.1,)
    elif device.type == "cuda":
        dtype, ps = torch.bfloat16, (0.0, 0.1)
        grid = [(8192, 4096, 64)] if suite == "quick" else [(8192, 4096, 64), (8192, 4096, 256), (2048, 1024, 64)]
    else:
        dtype = torch.float32
        grid, ps = ([(2048, 1024, 64)], (0.1,)) if suite == "quick" else ([(2048, 768, 64), (2048, 1024, 64)], (0.0, 0.1))
    out = []
    for M, H, Bn in grid:
        for p in ps:
            params = {"M": M, "H": H, "bottleneck": Bn, "activation": "gelu", "dropout": p, "dtype": dtype_name(dtype)}
            out.append(Case(f"bottleneck_adapter/M{M}_H{H}_b{Bn}_gelu_p{p:g}_{dtype_name(dtype)}", "bottleneck_adapter",
                            bottleneck_adapter_build(M, H, Bn, "gelu", p, dtype), params))
    return out
