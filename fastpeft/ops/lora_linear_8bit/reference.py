"""lora_linear_8bit, pure-PyTorch reference: the ``torch`` backend and the test oracle.

bitsandbytes' LLM.int8 weight format (``bitsandbytes.functional.int8_vectorwise_quant``, the weight of
``Linear8bitLt``): the [N, K] weight as int8 ``CB`` [N, K] with one fp32 scale per row, ``SCB`` [N] (the
row's absolute maximum); element (n, k) stands for ``CB[n, k] · SCB[n] / 127``.  bitsandbytes computes that
value as ``CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))``: the fp32 product
``CB[n, k] · fl32(SCB[n] · fl32(1/127))`` rounded once to the compute dtype (computed in float64 for
float64, else in float32).

* :func:`dequantize_8bit_torch` -- that formula in plain PyTorch (bit-identical to bitsandbytes' own
  dequantisation, which ``tests/ops/test_lora_linear_8bit.py`` checks);
* :func:`quantize_8bit_torch` -- the inverse (``round(127 · w / absmax)`` per row), for example inputs and
  tests without bitsandbytes;
* :func:`lora_linear_8bit_reference` -- the torch backend: the dequantised weight (the reference may
  materialise it; the fused kernels never do) through :func:`fastpeft.ops.lora_linear`'s reference autograd
  (same Philox dropout mask, same hand-derived backward).
"""
from __future__ import annotations

import torch

from ..lora_linear.reference import lora_linear_reference

#: fl32(1/127): the factor bitsandbytes multiplies SCB by (``SCB.mul(1.0 / 127.0)`` on an fp32 tensor)
INV_127 = torch.tensor(1.0 / 127.0, dtype=torch.float32).item()


def dequantize_8bit_torch(weight: torch.Tensor, row_scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight in ``dtype`` from int8 ``weight`` [N, K] and fp32 ``row_scale`` [N] (module doc)."""
    s = row_scale.float().reshape(-1, 1) * INV_127
    compute = torch.float64 if dtype == torch.float64 else torch.float32  # bitsandbytes' promoted dtype
    return (weight.to(compute) * s.to(compute)).to(dtype)


def quantize_8bit_torch(weight: torch.Tensor):
    """``(weight int8 [N, K], row_scale fp32 [N])`` of the [N, K] ``weight``: per row the absolute maximum,
    each element ``round(127 · w / absmax)`` (bitsandbytes' ``int8_vectorwise_quant`` without outliers)."""
    w = weight.detach().float()
    absmax = w.abs().amax(1)
    q = torch.round(w * (127.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax)))[:, None])
    return q.clamp(-127, 127).to(torch.int8), absmax


def lora_linear_8bit_reference(x, weight, row_scale, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                               seed: int = 0) -> torch.Tensor:
    """The ``torch`` backend of :func:`fastpeft.ops.lora_linear_8bit` (arguments already checked):
    ``lora_linear(x, dequant(W).to(x.dtype), bias, lora_A, lora_B, scale, dropout_p, seed)``.  The int8
    weight and its scales are constants of the frozen weight: no gradient flows to them."""
    w = dequantize_8bit_torch(weight, row_scale.detach(), x.dtype)
    return lora_linear_reference(x, w, bias, lora_A, lora_B, scale, dropout_p, seed)
