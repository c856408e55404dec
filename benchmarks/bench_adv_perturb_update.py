"""Adversarial perturbation step: fused vs the eager FreeLB sequence vs the memory floor,
and the cost of a FreeLB (K=3) training step vs a plain step.

Groups (``benchmark.group``), one shape/norm each, so the variants compare side by side:

* ``fused``  — :func:`fastpeft.ops.adv_perturb_update` (in place) on the best backend here;
* ``eager``  — the FreeLB code's eager PyTorch sequence (``reference.freelb_eager_update``);
* ``floor``  — kernels moving the same bytes: one ``torch.add(delta, grad, out=)`` (read 2N,
  write N = 3N) for ``linf`` / ``l2_token``; plus two norm reductions (5N) for ``l2_example``.

Shapes (issue 5): B x L x H = 16 x 128 x 768 fp32 on the CPU, 32 x 512 x 4096 bf16 on the GPU.
Targets (issue 5): fused >= 3x faster than eager (CPU and GPU), within 1.3x of the floor (GPU).

``freelb-step`` groups: one training step (forward, backward, AdamW step, zero grads) of a small
random-init BERT classifier with frozen word embeddings: ``plain``, ``freelb_k3``
(``fastpeft.adversarial.FreeLB(steps=3)``) and ``plain_x3`` (three plain forward+backward passes
and one optimizer step: the ideal cost of K=3).  Target: freelb_k3 <= (K + 0.2) x plain.

``FASTPEFT_BENCH_TINY=1`` uses smoke sizes.  The top-level ``make_*`` functions are the
reusable case builders (each returns ``{variant: zero-argument callable}``).

    pytest benchmarks/bench_adv_perturb_update.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import os

import pytest
import torch

NORMS = ("linf", "l2_token", "l2_example")
UPDATE_VARIANTS = ("fused", "eager", "floor")
STEP_VARIANTS = ("plain", "freelb_k3", "plain_x3")


def _tiny() -> bool:
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def update_shape(device: str) -> tuple:
    if _tiny():
        return (2, 8, 16)
    return (32, 512, 4096) if device == "cuda" else (16, 128, 768)


def update_bytes(B: int, L: int, H: int, norm: str, dtype: torch.dtype) -> int:
    """Minimal traffic of one update: 3N element-wise, 5N with the per-example stats pass."""
    return (5 if norm == "l2_example" else 3) * B * L * H * (torch.finfo(dtype).bits // 8)


def make_update_case(B: int, L: int, H: int, norm: str, dtype: torch.dtype, device: str = "cpu",
                     step_size: float = 1e-2, epsilon: float = 0.1) -> dict:
    """{fused, eager, floor}: one perturbation update each, on fixed random inputs with padding."""
    from fastpeft.ops import adv_perturb_update
    from fastpeft.ops.adv_perturb_update.reference import freelb_eager_update

    g = torch.Generator().manual_seed(0)
    delta = (1e-3 * torch.randn(B, L, H, generator=g)).to(device, dtype)
    grad = torch.randn(B, L, H, generator=g).to(device, dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[B // 2:, (3 * L) // 4:] = 0
    mask = mask.to(device)
    delta = delta * mask[..., None].to(dtype)
    d_fused, scratch = delta.clone(), torch.empty_like(delta)

    def fused():
        adv_perturb_update(d_fused, grad, norm=norm, step_size=step_size, epsilon=epsilon, mask=mask)

    def eager():
        return freelb_eager_update(delta, grad, mask, norm, step_size, epsilon)

    if norm == "l2_example":
        def floor():
            torch.linalg.vector_norm(grad.view(B, -1), dim=1)
            torch.linalg.vector_norm(delta.view(B, -1), dim=1)
            torch.add(delta, grad, out=scratch)
    else:
        def floor():
            torch.add(delta, grad, out=scratch)
    return {"fused": fused, "eager": eager, "floor": floor}


def make_freelb_step_case(device: str = "cpu", steps: int = 3) -> dict:
    """{plain, freelb_k3, plain_x3}: one training step of a small BERT classifier each."""
    import transformers

    import fastpeft.adversarial as A

    if _tiny():
        hidden, layers, B, L = 32, 1, 2, 8
    elif device == "cuda":
        hidden, layers, B, L = 768, 6, 32, 256
    else:
        hidden, layers, B, L = 256, 4, 16, 128
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=max(hidden // 64, 1), intermediate_size=4 * hidden,
                                  max_position_embeddings=max(L, 16), num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, (B, L), generator=g), "attention_mask": torch.ones(B, L, dtype=torch.long),
             "labels": torch.randint(0, 2, (B,), generator=g)}
    batch["attention_mask"][B // 2:, (3 * L) // 4:] = 0
    batch = {k: v.to(device) for k, v in batch.items()}
    method = A.FreeLB(step_size=0.1, epsilon=1.0, steps=steps, init_mag=0.1)

    def fwd(m, b):
        out = m(**b)
        return out.loss, out.logits

    def finish():
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    def plain():
        fwd(model, batch)[0].backward()
        finish()

    def plain_x3():
        for _ in range(steps):
            (fwd(model, batch)[0] / steps).backward()
        finish()

    def freelb_k3():
        method.step(model, batch, fwd)
        finish()

    return {"plain": plain, "freelb_k3": freelb_k3, "plain_x3": plain_x3}


def _run(benchmark, fn, device):
    if device == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.pedantic(fn, rounds=3 if _tiny() else 20, warmup_rounds=1 if _tiny() else 3, iterations=1)


_UPDATE_CACHE: dict = {}


def _update_case(device, norm, dtype):
    key = (device, norm, dtype)
    if key not in _UPDATE_CACHE:
        _UPDATE_CACHE.clear()  # one case's tensors alive at a time
        _UPDATE_CACHE[key] = make_update_case(*update_shape(device), norm, dtype, device)
    return _UPDATE_CACHE[key]


@pytest.mark.parametrize("variant", UPDATE_VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
def test_update_cpu(benchmark, norm, variant):
    B, L, H = update_shape("cpu")
    benchmark.group = f"adv_perturb_update-cpu-{B}x{L}x{H}-float32-{norm}"
    benchmark.extra_info.update(variant=variant, bytes=update_bytes(B, L, H, norm, torch.float32))
    _run(benchmark, _update_case("cpu", norm, torch.float32)[variant], "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", UPDATE_VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
def test_update_gpu(benchmark, norm, variant):
    B, L, H = update_shape("cuda")
    benchmark.group = f"adv_perturb_update-cuda-{B}x{L}x{H}-bfloat16-{norm}"
    benchmark.extra_info.update(variant=variant, bytes=update_bytes(B, L, H, norm, torch.bfloat16))
    _run(benchmark, _update_case("cuda", norm, torch.bfloat16)[variant], "cuda")


_STEP_CACHE: dict = {}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_freelb_step(benchmark, device, variant):
    pytest.importorskip("transformers")
    if device not in _STEP_CACHE:
        _STEP_CACHE.clear()
        _STEP_CACHE[device] = make_freelb_step_case(device)
    benchmark.group = f"freelb-step-{device}"
    benchmark.extra_info.update(variant=variant, steps=3)
    _run(benchmark, _STEP_CACHE[device][variant], device)
