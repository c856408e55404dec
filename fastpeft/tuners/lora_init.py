"""LoRA weight initialisations of ``LoraConfig.init_lora_weights``, with HF PEFT's maths (same values for the
same random state, so an adapter initialised by fastpeft and by HF PEFT is the same adapter).

With ``W`` the base weight as ``[out, in]`` (transposed back for ``fan_in_fan_out``), ``s`` the scaling and
``r`` the rank:

* ``True``: A kaiming-uniform(a=sqrt 5), B = 0.  ``"gaussian"``: A ~ N(0, 1/r), B = 0.  ``False``: nn.Linear's
  random init for both (a non-zero adapter; tests).
* ``"pissa"``: ``W = V S Uᵀ`` (SVD), ``A = sqrt(S_r / s) U_rᵀ``, ``B = V_r sqrt(S_r / s)`` and the base weight
  becomes the residual ``W - s B A``; ``"pissa_niter_N"`` uses ``torch.svd_lowrank(W, r, niter=N)``.
* ``"olora"``: ``W = Q R`` (QR), ``A = R[:r]``, ``B = Q[:, :r]``, base weight ``W - s B A``.
* ``"orthogonal"``: A and B from the odd / even rows of a random orthogonal ``r x r`` matrix (r even);
  the base weight is unchanged.
* ``"loftq"``: ``loftq_config = {"loftq_bits": 4 | 8, "loftq_iter": n}``; alternately quantise the weight
  (bitsandbytes NF4 / int8) and fit ``B A`` to the quantisation residual by SVD; the base weight becomes the
  dequantised weight (needs bitsandbytes).

The initialisations that rewrite the base weight (pissa, olora, loftq) are deterministic for the same
weight, so loading such an adapter re-runs them on the fresh base model (as HF PEFT does) before the saved
A and B are loaded.  Equivalent PyTorch: ``peft.tuners.lora.layer.LoraLayer.{pissa,olora,orthogonal,
loftq}_init``.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

#: the values of ``init_lora_weights`` fastpeft implements (``pissa_niter_<N>`` is matched by pattern)
SUPPORTED = (True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
#: initialisations that rewrite the base weight: they run again when such an adapter is loaded
MUTATES_BASE = ("pissa", "olora", "loftq")


def check_init(value, loftq_config) -> None:
    """Raise ValueError naming ``init_lora_weights`` when fastpeft does not implement ``value``."""
    if value is True or value is False or value in ("gaussian", "pissa", "olora", "orthogonal", "loftq"):
        if value == "loftq":
            bits = (loftq_config or {}).get("loftq_bits")
            if bits not in (4, 8):
                raise ValueError("init_lora_weights='loftq' needs loftq_config={'loftq_bits': 4 or 8, "
                                 f"'loftq_iter': n}} (peft.LoftQConfig), got loftq_config={loftq_config!r}")
            if int((loftq_config or {}).get("loftq_iter", 1)) <= 0:
                raise ValueError(f"loftq_config['loftq_iter']: must be >= 1, got {loftq_config['loftq_iter']!r}")
        return
    if isinstance(value, str) and _PISSA_NITER.fullmatch(value):
        return
    raise ValueError(f"init_lora_weights={value!r}: fastpeft implements {list(SUPPORTED)}; use HF PEFT for "
                     "the others (eva, corda, lora_ga, mica need data-dependent preprocessing)")


def mutates_base(value) -> bool:
    return isinstance(value, str) and value.startswith(MUTATES_BASE)


def _weight_out_in(layer) -> torch.Tensor:
    w = layer.base_layer.weight
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


def _set_base_out_in(layer, w_out_in: torch.Tensor) -> None:
    w = layer.base_layer.weight
    new = w_out_in.t() if getattr(layer, "fan_in_fan_out", False) else w_out_in
    w.data = new.to(w.dtype).contiguous()


def _float_weight(layer, what: str) -> torch.Tensor:
    w = layer.base_layer.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"init_lora_weights={what!r}: the base weight must be float32, float16 or bfloat16, "
                        f"got {w.dtype}")
    return _weight_out_in(layer).detach().to(torch.float32)


def _set_ab(layer, adapter: str, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A[adapter].weight.data = A.contiguous()
    layer.lora_B[adapter].weight.data = B.contiguous()


@torch.no_grad()
def init_linear(layer, adapter: str, value, loftq_config=None) -> None:
    """Initialise ``layer.lora_A[adapter]`` / ``lora_B[adapter]`` (a Linear / Conv1D LoRA layer)."""
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    r, s = layer.r[adapter], layer.scaling[adapter]
    if value is True:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
    elif value == "gaussian":
        nn.init.normal_(A, std=1 / r)
        nn.init.zeros_(B)
    elif value is False:
        return
    elif isinstance(value, str) and value.startswith("pissa"):
        W = _float_weight(layer, value)
        niter = _PISSA_NITER.fullmatch(value)
        if niter is None:
            V, S, Uh = torch.linalg.svd(W, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
        else:
            Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=int(niter.group(1)))
            Sr, Uhr = Sr / s, Ur.t()
        a, b = torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))
        _set_ab(layer, adapter, a, b)
        _set_base_out_in(layer, W - s * b @ a)
    elif value == "olora":
        W = _float_weight(layer, value)
        Q, R = torch.linalg.qr(W)
        a, b = R[:r], Q[:, :r]
        _set_ab(layer, adapter, a, b)
        _set_base_out_in(layer, W - s * b @ a)
    elif value == "orthogonal":
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        dtype = layer.base_layer.weight.dtype
        a = (torch.randn(layer.in_features, r // 2).mm(Q[0::2, :]).T / 10.0).to(dtype)
        b = (torch.randn(r // 2, layer.out_features).T.mm(Q[1::2, :]) / 10.0).to(dtype)
        layer.lora_A[adapter].weight = nn.Parameter(a.contiguous())
        layer.lora_B[adapter].weight = nn.Parameter(b.contiguous())
    elif value == "loftq":
        w = layer.base_layer.weight
        deq, a, b = loftq(_weight_out_in(layer).detach(), int(loftq_config["loftq_bits"]), r,
                          int(loftq_config.get("loftq_iter", 1)))
        _set_ab(layer, adapter, a, b)
        _set_base_out_in(layer, deq.to(device=w.device))
    else:  # check_init ran in LoraConfig.__post_init__
        raise ValueError(f"init_lora_weights={value!r}: not implemented")


def _quantize_dequantize(w: torch.Tensor, bits: int, bnb) -> torch.Tensor:
    """``w`` (float32) quantised with bitsandbytes (NF4, blocks of 64 / int8 per row) and dequantised."""
    F = bnb.functional
    if bits == 4:
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        return F.dequantize_4bit(q, state).to(torch.float32)
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    return F.int8_vectorwise_dequant(cb, scb).to(torch.float32)


@torch.no_grad()
def loftq(weight: torch.Tensor, bits: int, r: int, num_iter: int):
    """LoftQ (HF PEFT's ``loftq_init``): ``(dequantised weight, A [r, in], B [out, r])`` for ``weight``
    [out, in]; computed on CUDA when available, else where the weight is."""
    try:
        import bitsandbytes as bnb
    except Exception as e:
        raise ImportError(f"init_lora_weights='loftq' needs bitsandbytes (pip install bitsandbytes): {e}") from None
    device = torch.device("cuda") if torch.cuda.is_available() else weight.device
    w = weight.to(device=device, dtype=torch.float32)
    res = w.clone()
    for i in range(num_iter):
        deq = _quantize_dequantize(res, bits, bnb)
        res = w - deq
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh
        if i + 1 == num_iter:
            break
        res = w - L @ R
    return deq.to(device=weight.device, dtype=weight.dtype), R.to(weight.device), L.to(weight.device)


__all__ = ["SUPPORTED", "MUTATES_BASE", "check_init", "mutates_base", "init_linear", "loftq"]
