"""lora_linear_4bit, pure-PyTorch reference: the ``torch`` backend and the test oracle.

bitsandbytes' 4-bit format (``bitsandbytes.functional.quantize_4bit``, the weight of ``Linear4bit``):
the [N, K] weight, flattened row-major, is cut into blocks of ``blocksize`` elements; element ``e``
is stored as a 4-bit index into a 16-entry code table (``code``: NF4 or FP4), two per byte, element
``2i`` in the high nibble of byte ``i`` and ``2i + 1`` in the low one, and its value is
``code[index] * absmax[e // blocksize]`` (fp32 product, then rounded to the output dtype).

* :func:`dequantize_4bit_torch` -- that formula in plain PyTorch (bit-identical to
  ``bitsandbytes.functional.dequantize_4bit``; ``tests/ops/test_lora_linear_4bit.py`` checks it on every
  quant type and blocksize).  Plain PyTorch rather than a call into bitsandbytes, so the torch backend
  runs under ``torch.compile`` / fake tensors and without bitsandbytes installed;
* :func:`quantize_4bit_torch` -- the inverse (nearest code), for example inputs and tests without
  bitsandbytes;
* :func:`lora_linear_4bit_reference` -- the torch backend: the dequantised weight (the reference may
  materialise it; the fused kernels never do) through :func:`fastpeft.ops.lora_linear`'s reference
  autograd (same Philox dropout mask, same hand-derived backward).
"""
from __future__ import annotations

import torch

from ..lora_linear.reference import lora_linear_reference

#: bitsandbytes' 4-bit code tables (``bitsandbytes.functional.get_4bit_type``), fp32
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """fp32 [16] code table of ``quant_type`` ('nf4' or 'fp4')."""
    if quant_type not in CODES:
        raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


def dequantize_4bit_torch(qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, N: int, K: int,
                          blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight in ``dtype`` from packed bytes ``qweight`` (uint8, >= ceil(N*K/2) elements),
    fp32 ``absmax`` [ceil(N*K / blocksize)] and fp32 ``code`` [16] (module doc)."""
    n = N * K
    q = qweight.reshape(-1)[: (n + 1) // 2]
    idx = torch.stack(((q >> 4) & 15, q & 15), dim=1).reshape(-1)[:n].long()
    blk = torch.arange(n, device=q.device) // blocksize
    return (code.float()[idx] * absmax.float()[blk]).to(dtype).reshape(N, K)


def quantize_4bit_torch(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """``(qweight uint8 [ceil(N*K/2), 1], absmax fp32 [blocks], code fp32 [16])`` of the [N, K] ``weight``:
    per block the absolute maximum, each element the index of the nearest code to ``w / absmax``
    (bitsandbytes' layout; its rounding of ties may differ, which only matters for making inputs)."""
    code = code_table(quant_type, weight.device)
    w = weight.detach().float().reshape(-1)
    n = w.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize, device=w.device)
    padded[:n] = w
    absmax = padded.view(nb, blocksize).abs().amax(1)
    scaled = padded.view(nb, blocksize) / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    idx = (scaled.reshape(-1, 1) - code[None, :]).abs().argmin(1)[:n].to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.reshape(-1, 1), absmax, code


def lora_linear_4bit_reference(x, qweight, absmax, code, out_features: int, blocksize: int, bias, lora_A, lora_B,
                               scale: float, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The ``torch`` backend of :func:`fastpeft.ops.lora_linear_4bit` (arguments already checked):
    ``lora_linear(x, dequant(W).to(x.dtype), bias, lora_A, lora_B, scale, dropout_p, seed)``."""
    w = dequantize_4bit_torch(qweight, absmax, code, out_features, x.shape[-1], blocksize, x.dtype)
    return lora_linear_reference(x, w, bias, lora_A, lora_B, scale, dropout_p, seed)
