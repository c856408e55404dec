"""Mixed-precision gradient tail (unscale + clip + overflow check): fused vs PyTorch's sequence.

Groups (``benchmark.group``) are one parameter set each, so these compare side by side:

* ``fused``     — :func:`fastpeft.ops.grad_tail_` (one multi-tensor read pass + one light write
  pass) on the best backend here (cuda / cpu);
* ``triton``    — the same op forced to the ``triton`` backend (GPU only);
* ``reference`` — the same op forced to the ``torch`` backend (per-tensor ops);
* ``torch_amp`` — what ``GradScaler.unscale_`` + ``clip_grad_norm_`` run:
  ``torch._amp_foreach_non_finite_check_and_unscale_`` then ``torch.nn.utils.clip_grad_norm_``
  (foreach where available);
* ``floor``     — the same bytes as ONE flat tensor: ``vector_norm`` + ``mul_`` (read, read+write).
* ``scaler_fastpeft`` / ``scaler_torch`` — the whole AMP tail of a training step with an optimizer
  whose ``step`` does nothing: ``fastpeft.amp.GradScaler.step(opt, max_norm) + update()`` vs
  ``torch.amp.GradScaler``'s ``unscale_ + clip_grad_norm_ + step + update`` (host sync included in both;
  scale held at 1 so values stay stable over the rounds).

Parameter sets (issue 5):

* ``llama7b_lora`` — LoRA r=16 on all linear layers of Llama-7B (hidden 4096, intermediate 11008,
  32 layers x {q,k,v,o: 4096->4096; gate,up: 4096->11008; down: 11008->4096}; A [16, in],
  B [out, 16]): 448 tensors, 40M elements.  On the CPU the default is 4 layers (56 tensors,
  5M elements) to keep runs short; ``FASTPEFT_BENCH_LAYERS`` overrides it.
* ``small500`` — 500 small tensors (257..1256 elements), fp32 and (GPU) mixed fp32/bf16/fp16.

Every call uses ``inv_scale = 1`` and a ``max_norm`` below the gradient norm, so grads are
clipped once and then stay at that norm: every call writes (multiplier != 1) and values
neither underflow nor grow over the benchmark rounds.  ``benchmark.extra_info['launches']``
holds the number of CUDA kernels + copies (GPU) or of profiled dispatcher ops (CPU) per call.
``FASTPEFT_BENCH_TINY=1`` shrinks everything to a smoke test.

The top-level ``make_*`` / ``run_*`` / ``count_launches`` functions are the reusable case
builders (the ``fastpeft bench`` suite imports them).
"""
from __future__ import annotations

import os

import pytest
import torch

import fastpeft
from fastpeft.ops import grad_tail_

VARIANTS = ("fused", "triton", "reference", "torch_amp", "floor", "scaler_fastpeft", "scaler_torch")
LLAMA7B = dict(hidden=4096, intermediate=11008, layers=32)


def _tiny() -> bool:
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def lora_shapes(hidden: int = 4096, intermediate: int = 11008, layers: int = 32, r: int = 16) -> list:
    """Shapes of the LoRA A [r, in] and B [out, r] matrices on every linear layer of a Llama block stack."""
    linears = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]  # (in, out)
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in linears:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def small_shapes(n: int = 500) -> list:
    return [(257 + (i * 37) % 1000,) for i in range(n)]


def make_grads(shapes, dtypes=(torch.float32,), device="cpu", seed: int = 0) -> list:
    """One gradient per shape, dtypes cycling through ``dtypes``, values ~ N(0, 1e-2)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(s, generator=g, device=device) * 1e-2).to(dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)]


def clip_threshold(grads) -> float:
    """Half of the current global norm: every call clips (see the module doc)."""
    return 0.5 * float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def run_fused(grads, inv_scale: torch.Tensor, max_norm: float, backend=None):
    if backend is None:
        return grad_tail_(grads, inv_scale=inv_scale, max_norm=max_norm)
    with fastpeft.use_backend(backend, op="grad_tail"), fastpeft.use_backend(backend, op="grad_tail_apply"):
        return grad_tail_(grads, inv_scale=inv_scale, max_norm=max_norm)


def run_torch_amp(params, found_inf: torch.Tensor, inv_scale: torch.Tensor, max_norm: float):
    """The ops of ``scaler.unscale_(opt)`` + ``clip_grad_norm_(params, max_norm)``."""
    found_inf.zero_()
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found_inf, inv_scale)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def run_floor(flat: torch.Tensor, max_norm: float):
    norm = torch.linalg.vector_norm(flat.float() if flat.dtype != torch.float32 else flat)
    flat.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


class NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing: isolates the AMP tail in the scaler benchmarks."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def make_scaler_case(kind: str, params, max_norm: float, device: str):
    """One AMP tail per call: ``kind`` "fastpeft" or "torch" (see the module doc)."""
    opt = NullOptimizer(params)
    if kind == "fastpeft":
        from fastpeft import amp

        scaler = amp.GradScaler("fp16", init_scale=1.0, growth_interval=10 ** 9)
        scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as a backward would

        def run():
            stepped = scaler.step(opt, max_norm=max_norm)
            scaler.update()
            return stepped
        return run
    scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=10 ** 9)
    scaler.scale(torch.ones((), device=device))

    def run_torch():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
    return run_torch


def make_case(variant: str, shapes, dtypes=(torch.float32,), device="cpu"):
    """A zero-argument callable running one variant once on a fresh gradient set."""
    grads = make_grads(shapes, dtypes, device)
    max_norm = clip_threshold(grads)
    inv_scale = torch.ones((), device=device)
    if variant == "fused":
        return lambda: run_fused(grads, inv_scale, max_norm)
    if variant == "reference":
        return lambda: run_fused(grads, inv_scale, max_norm, backend="torch")
    if variant == "triton":
        return lambda: run_fused(grads, inv_scale, max_norm, backend="triton")
    if variant in ("torch_amp", "scaler_fastpeft", "scaler_torch"):
        params = [torch.nn.Parameter(torch.empty(0, device=device, dtype=g.dtype)) for g in grads]
        for p, g in zip(params, grads):
            p.data = torch.empty_like(g)
            p.grad = g
        if variant != "torch_amp":
            return make_scaler_case(variant.split("_")[1], params, max_norm, device)
        found = torch.zeros(1, device=device)
        return lambda: run_torch_amp(params, found, inv_scale, max_norm)
    if variant == "floor":
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(dtypes[0])
        return lambda: run_floor(flat, max_norm)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def count_launches(fn, device="cpu") -> int:
    """CUDA kernels + memcpys/memsets (GPU) or profiled aten/fastpeft ops (CPU) of one call."""
    fn()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    if device == "cuda":
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    return sum(e.name.startswith(("aten::", "fastpeft::")) for e in prof.events())


def cases(device: str) -> list:
    """(name, shapes, dtypes) per parameter set."""
    if _tiny():
        return [("llama_lora_tiny", lora_shapes(64, 160, 2), (torch.float32,)),
                ("small40", small_shapes(40), (torch.float32,))]
    layers = int(os.environ.get("FASTPEFT_BENCH_LAYERS", LLAMA7B["layers"] if device == "cuda" else 4))
    out = [(f"llama7b_lora_{layers}L", lora_shapes(LLAMA7B["hidden"], LLAMA7B["intermediate"], layers),
            (torch.float32,)),
           ("small500", small_shapes(500), (torch.float32,))]
    if device == "cuda":
        out.append(("small500_mixed", small_shapes(500), (torch.float32, torch.bfloat16, torch.float16)))
        out.append((f"llama7b_lora_{layers}L_bf16", lora_shapes(LLAMA7B["hidden"], LLAMA7B["intermediate"], layers),
                    (torch.bfloat16,)))
    return out


def _run(benchmark, variant, case, device):
    name, shapes, dtypes = case
    if variant == "triton" and device != "cuda":
        pytest.skip("the triton variant is timed on the GPU only (the CPU interpreter is a testing tool)")
    if variant.startswith("scaler_") and torch.float16 in dtypes:
        pytest.skip("GradScalers (torch's and fastpeft's) refuse fp16 grads under fp16 scaling (master weights)")
    fn = make_case(variant, shapes, dtypes, device)
    benchmark.group = f"grad_tail-{device}-{name}"
    benchmark.extra_info.update(variant=variant, tensors=len(shapes),
                                elements=sum(int(torch.Size(s).numel()) for s in shapes),
                                dtypes=[str(d).replace("torch.", "") for d in dtypes],
                                launches=count_launches(fn, device))
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)


def _ids(c):
    return c[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases("cpu"), ids=_ids)
def test_grad_tail_cpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases("cuda"), ids=_ids)
def test_grad_tail_gpu(benchmark, variant, case):
    _run(benchmark, variant, case, "cuda")
