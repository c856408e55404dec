"""``lora_linear_8bit`` cases: the fused LoRA layer over a bitsandbytes LLM.int8 weight (``Linear8bitLt``,
``has_fp16_weights=False``: int8 ``CB`` with one fp32 absmax ``SCB`` per row; forward + backward to x, lora_A
and lora_B) against the fused fp32 LoRA layer on the same shapes (``lora_linear_fp32``: the target's
reference, and this case's floor), the torch reference (dequantise the whole weight, then lora_linear's
reference), HF PEFT's ``lora.bnb.Linear8bitLt`` over bitsandbytes' ``Linear8bitLt`` in train mode (the
baseline) and bitsandbytes' layer alone (``bnb_base``: ``Linear8bitLt`` forward + backward to x).

On the CPU in train mode bitsandbytes runs ``MatMul8bitFp`` (dequantise the weight, then ``F.linear``): the
computation the fused op does.  On CUDA its forward is LLM.int8() (``MatMul8bitLt``: activations quantised
to int8 row by row), so there ``hf_peft`` and ``bnb_base`` compute something slightly different from the
fused op (weight-only dequantisation): a speed comparison, not an equality.

Shapes: the MiniLM layers of the e2e case (M = 32 × 64 tokens; K=N=384 and 384→1536), r=8, dropout 0.1,
fp32 compute on CPU; on a GPU bf16, M=8192, K=N in {2048, 4096} (Llama ~1B), r=16; smoke: M=64, K=N=64.
Target (issue 18): the fused 8-bit layer within 1.3× of the fused fp32 layer on the CPU quick shapes.
"""
from __future__ import annotations

import math

import torch

from .. import Built, Case, Target
from . import dtype_name, require, selected_backend, torch_backend, zero_grads

VARIANTS = ("fastpeft", "lora_linear_fp32", "torch_ref", "hf_peft", "bnb_base")
ISSUE = "issue 18"


def lora_linear_8bit_build(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype):
    alpha = 2.0 * r

    def build(device: torch.device) -> Built:
        bnb = require("bitsandbytes")
        from fastpeft.ops import lora_linear, lora_linear_8bit
        g = torch.Generator(device="cpu").manual_seed(0)
        f32 = dict(dtype=torch.float32)
        x = torch.randn(M, K, generator=g, **f32).to(device, dtype).requires_grad_()
        W = torch.randn(N, K, generator=g, **f32) / math.sqrt(K)
        b = (torch.randn(N, generator=g, **f32) * 0.1).to(device, dtype)
        A = (torch.randn(r, K, generator=g, **f32) / math.sqrt(K)).to(device).requires_grad_()
        B = (torch.randn(N, r, generator=g, **f32) * 0.01).to(device).requires_grad_()
        gy = torch.randn(M, N, generator=g, **f32).to(device, dtype)
        scale = alpha / r
        base = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False)
        base.load_state_dict({"weight": W, "bias": b.float().cpu()})
        base = base.to(device)   # bitsandbytes quantises on the move
        base.requires_grad_(False)
        base.train()             # CPU: MatMul8bitFp (dequantise + F.linear); CUDA: LLM.int8()
        CB = base.state.CB if base.state.CB is not None else base.weight.data
        SCB = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        Wd = W.to(device, dtype)

        def fused():
            lora_linear_8bit(x, CB, SCB, b, A, B, scale, p).backward(gy)
            zero_grads(x, A, B)

        def fp32_fused():
            lora_linear(x, Wd, b, A.to(dtype), B.to(dtype), scale, p).backward(gy)
            zero_grads(x, A, B)

        def reference():
            with torch_backend("lora_linear_8bit"):
                lora_linear_8bit(x, CB, SCB, b, A, B, scale, p).backward(gy)
            zero_grads(x, A, B)

        def bnb_base():
            base(x).backward(gy)
            zero_grads(x)

        variants = {"fastpeft": fused, "lora_linear_fp32": fp32_fused, "torch_ref": reference, "bnb_base": bnb_base}
        skipped = {}
        base_how = ("LLM.int8(): int8 activations" if device.type == "cuda"
                    else "train mode: MatMul8bitFp, dequantise + F.linear")
        notes = {
            "fastpeft": "fastpeft.ops.lora_linear_8bit, LLM.int8 weight (int8 CB, fp32 row absmax SCB) (backend: "
                        f"{selected_backend('lora_linear_8bit', x, CB, SCB, b, A, B, scale, p, 0)})",
            "lora_linear_fp32": "fastpeft.ops.lora_linear on the full-precision weight (the 1.3x target's reference)",
            "torch_ref": "fastpeft.ops.lora_linear_8bit under use_backend('torch') (whole weight dequantised)",
            "bnb_base": f"bitsandbytes Linear8bitLt alone ({base_how}), forward + backward to x",
        }
        try:
            from peft import LoraConfig
            from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt

            import copy
            layer = PeftLinear8bitLt(copy.deepcopy(base), "default", config=LoraConfig(r=r, lora_alpha=alpha,
                                                                                          lora_dropout=p),
                                     r=r, lora_alpha=alpha, lora_dropout=p)
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
            notes["hf_peft"] = f"peft.tuners.lora.bnb.Linear8bitLt over the same bitsandbytes layer ({base_how})"
        except ImportError as e:
            skipped["hf_peft"] = f"peft is not installed ({e})"
        flops = 4.0 * M * K * N + 6.0 * M * r * (K + N)
        return Built(variants, floor="lora_linear_fp32", baseline="hf_peft", flops=flops, skipped=skipped,
                     notes=notes)

    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        grid, dtype, r = [(64, 64, 64)], torch.float32, 4
    elif device.type == "cuda":
        dtype, r = torch.bfloat16, 16
        grid = [(8192, 2048, 2048)] if suite == "quick" else [(8192, K, K) for K in (2048, 4096)]
    else:
        dtype, r = torch.float32, 8
        grid = [(2048, 384, 384), (2048, 384, 1536)]
    out = []
    for M, K, N in grid:
        targets = []
        if device.type == "cpu" and suite != "smoke":
            targets.append(Target("≤1.30× fused fp32 layer", "fastpeft", "lora_linear_fp32", 1.3, source=ISSUE))
        params = {"M": M, "K": K, "N": N, "r": r, "dropout": 0.1, "dtype": dtype_name(dtype), "quant": "int8-rowwise"}
        out.append(Case(f"lora_linear_8bit/M{M}_K{K}_N{N}_r{r}_p0.1_{dtype_name(dtype)}", "lora_linear_8bit",
                        lora_linear_8bit_build(M, K, N, r, 0.1, dtype), params, targets))
    return out
