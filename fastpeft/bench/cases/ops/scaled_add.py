"""``scaled_add`` cases: ``scaled_add(a, b, alpha)`` forward + backward (to a and b) against the
torch reference, eager ``a + alpha * b`` (the baseline) and the floor, the same bytes in two
passes: ``torch.add(a, b, alpha=alpha, out=)`` (read 2N, write N) and ``torch.mul(g, alpha,
out=)`` (read N, write N).

Shapes: N = 2**22 fp32 on the CPU, N = 2**26 bf16 on the GPU, in the full suite only (the op is
the template of the op files, not a headline); smoke: N = 4096.
"""
from __future__ import annotations

import torch

from .. import Built, Case
from . import dtype_name, require, selected_backend, torch_backend, zero_grads

VARIANTS = ("fastpeft", "torch_ref", "eager", "floor")


def scaled_add_build(n: int, dtype: torch.dtype, alpha: float = 0.5):
    def build(device: torch.device) -> Built:
        scaled_add = require("fastpeft.ops", "scaled_add")
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
        b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
        gy = torch.randn(n, generator=g).to(device, dtype)
        out, gb = torch.empty_like(gy), torch.empty_like(gy)

        def fused():
            scaled_add(a, b, alpha).backward(gy)
            zero_grads(a, b)

        def reference():
            with torch_backend("scaled_add"):
                scaled_add(a, b, alpha).backward(gy)
            zero_grads(a, b)

        def eager():
            (a + alpha * b).backward(gy)
            zero_grads(a, b)

        def floor():
            torch.add(a.detach(), b.detach(), alpha=alpha, out=out)
            torch.mul(gy, alpha, out=gb)

        esize = torch.finfo(dtype).bits // 8
        return Built({"fastpeft": fused, "torch_ref": reference, "eager": eager, "floor": floor},
                     floor="floor", baseline="eager", bytes=float(5 * n * esize),
                     notes={"fastpeft": f"fastpeft.ops.scaled_add (backend: "
                                        f"{selected_backend('scaled_add', a, b, alpha)})",
                            "torch_ref": "fastpeft.ops.scaled_add under use_backend('torch')",
                            "eager": "a + alpha * b under autograd",
                            "floor": "torch.add(a, b, alpha=) + torch.mul(g, alpha): 5N bytes"})

    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "quick":
        return []
    if suite == "smoke":
        n, dtype = 4096, torch.float32
    else:
        n, dtype = (2 ** 26, torch.bfloat16) if device.type == "cuda" else (2 ** 22, torch.float32)
    return [Case(f"scaled_add/N{n}_{dtype_name(dtype)}", "scaled_add", scaled_add_build(n, dtype),
                 {"N": n, "dtype": dtype_name(dtype)})]
