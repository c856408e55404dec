"""``grad_tail`` cases: the fused mixed-precision gradient tail, ``grad_tail_`` (one multi-tensor
read pass + one light write pass: unscale, clip and overflow check), against what
``GradScaler.unscale_`` + ``clip_grad_norm_`` run (the baseline), the floor (one
``_foreach_norm`` read pass) and, on the GPU, the same op forced to its Triton kernels; plus the
whole AMP tail of a step with fastpeft's and torch's ``GradScaler`` (an optimizer whose step does
nothing).  Kernel launches are counted.

Parameter sets (fp32): 500 small tensors, and the LoRA parameters (r=16 on q/k/v/o/gate/up/down)
of a Llama-7B (GPU: 32 layers, hidden 4096, intermediate 11008; CPU: scaled down to 8 layers of
hidden 1024); smoke: 20 small tensors.  Every call clips (``max_norm`` is half the initial
norm), so every call reads and writes every gradient.
"""
from __future__ import annotations

import math

import torch

from .. import Built, Case
from ....backends import use_backend
from . import require, selected_backend

VARIANTS = ("fastpeft", "triton", "torch_amp", "floor", "scaler_fastpeft", "scaler_torch")


def _llama_lora_shapes(layers: int, hidden: int, inter: int, r: int) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(layers):
        for k, n in [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]:
            shapes += [(r, k), (n, r)]
    return shapes


def _small_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(int(s),) for s in torch.randint(16, 8192, (n,), generator=g)]


class _NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing: isolates the AMP tail in the scaler variants."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _scaler_variants(params, max_norm: float, device: torch.device) -> dict:
    """The whole AMP tail of a training step (host sync included) with fastpeft's and torch's
    GradScaler; the scale is held at 1 so values stay put over the rounds."""
    from ....amp import GradScaler

    opt = _NullOptimizer(params)
    ours = GradScaler("fp16", init_scale=1.0, growth_interval=10 ** 9)
    ours.scale(torch.ones((), device=device))  # creates the scale tensor, as a backward would
    theirs = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=10 ** 9)
    theirs.scale(torch.ones((), device=device))

    def scaler_fastpeft():
        ours.step(opt, max_norm=max_norm)
        ours.update()

    def scaler_torch():
        theirs.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        theirs.step(opt)
        theirs.update()

    return {"scaler_fastpeft": scaler_fastpeft, "scaler_torch": scaler_torch}


def grad_tail_build(shapes: list[tuple[int, ...]], dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        fn = require("fastpeft.ops", "grad_tail_")
        g = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=dtype)) for s in shapes]
        for q in params:
            q.grad = (torch.randn(q.shape, generator=g) * 1e-3).to(device, dtype)
        grads = [q.grad for q in params]
        found_inf = torch.zeros(1, device=device)
        inv = torch.ones(1, device=device)
        # Clipping is active (max_norm = half the initial norm): the first call clips to
        # max_norm, later ones multiply by max_norm / (norm + 1e-6), just under 1, so every
        # call reads and writes every gradient and the values stay put over thousands of calls.
        max_norm = 0.5 * float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

        def fused():
            fn(grads, inv_scale=1.0, max_norm=max_norm)

        def torch_amp():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
            torch.nn.utils.clip_grad_norm_(params, max_norm)

        def floor():
            torch._foreach_norm(grads)

        variants = {"fastpeft": fused, "torch_amp": torch_amp, "floor": floor}
        skipped = {}
        if device.type == "cuda":
            def triton():
                with use_backend("triton", op="grad_tail"), use_backend("triton", op="grad_tail_apply"):
                    fn(grads, inv_scale=1.0, max_norm=max_norm)

            variants["triton"] = triton
        else:
            skipped["triton"] = "timed on the GPU only (on the CPU Triton runs in its interpreter, a testing tool)"
        variants.update(_scaler_variants(params, max_norm, device))
        numel = sum(math.prod(s) for s in shapes)
        esize = torch.finfo(dtype).bits // 8
        return Built(variants, floor="floor", baseline="torch_amp", bytes=float(numel * esize), launches=True,
                     skipped=skipped,
                     notes={"fastpeft": "fastpeft.ops.grad_tail_ (norm + overflow check, then in-place unscale+clip) "
                                        f"(backend: {selected_backend('grad_tail', grads, inv.reshape(()), max_norm, 2.0, 1e-6)})",
                            "triton": "fastpeft.ops.grad_tail_ forced to the triton backend",
                            "torch_amp": "GradScaler.unscale_ (_amp_foreach_non_finite_check_and_unscale_) "
                                         "+ clip_grad_norm_",
                            "floor": "torch._foreach_norm: one read pass (GB/s counts one read of every gradient)",
                            "scaler_fastpeft": "fastpeft.amp.GradScaler.step(opt, max_norm) + update(), "
                                               "optimizer step a no-op",
                            "scaler_torch": "torch.amp.GradScaler: unscale_ + clip_grad_norm_ + step + update, "
                                            "optimizer step a no-op"},
                     extra={"tensors": len(shapes), "numel": numel})

    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        sets = {"small20": _small_shapes(20)}
    else:
        llama = _llama_lora_shapes(32, 4096, 11008, 16) if device.type == "cuda" else _llama_lora_shapes(8, 1024, 2752, 16)
        sets = {"small500": _small_shapes(500),
                ("llama7b_lora_r16" if device.type == "cuda" else "llama_lora_r16_scaled"): llama}
    out = []
    for name, shapes in sets.items():
        out.append(Case(f"grad_tail/{name}_fp32", "grad_tail", grad_tail_build(shapes, torch.float32),
                        {"set": name, "tensors": len(shapes), "numel": sum(math.prod(s) for s in shapes),
                         "dtype": "float32"}))
    return out
