"""``adv_perturb_update`` cases: one fused projected ascent step on the perturbation (in place,
with padding) against the eager FreeLB sequence (``reference.freelb_eager_update``, the baseline)
and the floor, kernels moving the same bytes: one ``torch.add(delta, grad, out=)`` (read 2N,
write N) for ``linf`` / ``l2_token``, plus two norm reductions (5N) for ``l2_example``.

Shapes: B x L x H = 16 x 128 x 768 fp32 on the CPU, 32 x 512 x 4096 bf16 on the GPU, every norm
(quick: ``l2_example`` and ``linf``); smoke: 2 x 8 x 16.  Targets: 3x faster than eager, and on
the GPU within 1.3x of the floor.  The cost of a whole FreeLB training step is an end-to-end case
(``e2e/minilm_freelb_*``).
"""
from __future__ import annotations

import torch

from .. import Built, Case, Target
from . import dtype_name, require

VARIANTS = ("fastpeft", "eager", "floor")


def adv_perturb_build(B: int, L: int, H: int, norm: str, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        fn = require("fastpeft.ops", "adv_perturb_update")
        eager = require("fastpeft.ops.adv_perturb_update.reference", "freelb_eager_update")
        g = torch.Generator(device="cpu").manual_seed(0)
        delta = (torch.randn(B, L, H, generator=g) * 1e-3).to(device, dtype)
        grad = torch.randn(B, L, H, generator=g).to(device, dtype)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[B // 2:, (L * 3) // 4:] = 0        # padding at the end of half the examples
        mask = mask.to(device)
        d_fused, d_eager = delta.clone(), delta.clone()
        scratch = torch.empty_like(delta)
        step, eps = 1e-2, 0.1

        def fused():
            fn(d_fused, grad, norm=norm, step_size=step, epsilon=eps, mask=mask)

        def reference():
            eager(d_eager, grad, mask, norm, step, eps)

        if norm == "l2_example":
            def floor():
                torch.linalg.vector_norm(grad.view(B, -1), dim=1)
                torch.linalg.vector_norm(delta.view(B, -1), dim=1)
                torch.add(delta, grad, out=scratch)
            passes, fl_note = 5, "two norm reductions + one add: 5N bytes"
        else:
            def floor():
                torch.add(delta, grad, out=scratch)
            passes, fl_note = 3, "one add (read 2N, write N): 3N bytes"
        esize = torch.finfo(dtype).bits // 8
        return Built({"fastpeft": fused, "eager": reference, "floor": floor}, floor="floor", baseline="eager",
                     bytes=float(passes * B * L * H * esize),
                     notes={"fastpeft": "fastpeft.ops.adv_perturb_update (in place)",
                            "eager": "eager FreeLB sequence (reference.freelb_eager_update)", "floor": fl_note})

    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        shape, dtype, norms = (2, 8, 16), torch.float32, ("l2_example",)
    elif device.type == "cuda":
        shape, dtype = (32, 512, 4096), torch.bfloat16
        norms = ("l2_example", "linf") if suite == "quick" else ("linf", "l2_token", "l2_example")
    else:
        shape, dtype = (16, 128, 768), torch.float32
        norms = ("l2_example", "linf") if suite == "quick" else ("linf", "l2_token", "l2_example")
    B, L, H = shape
    out = []
    for norm in norms:
        targets = [Target("≥3× faster than eager", "fastpeft", "eager", 1 / 3)]
        if device.type == "cuda":
            targets.append(Target("≤1.3×floor", "fastpeft", "floor", 1.3))
        if suite == "smoke":
            targets = []
        out.append(Case(f"adv_perturb_update/{norm}_B{B}_L{L}_H{H}_{dtype_name(dtype)}", "adv_perturb_update",
                        adv_perturb_build(B, L, H, norm, dtype),
                        {"B": B, "L": L, "H": H, "norm": norm, "dtype": dtype_name(dtype)}, targets))
    return out
