"""lora_linear, pure-PyTorch reference: the ``torch`` backend and the test oracle.

Two functions:

* :func:`lora_linear_plain` — plain differentiable PyTorch, exactly HF PEFT's
  LoRA forward with the dropout mask taken from fastpeft's Philox RNG.  Autograd
  is PyTorch's own (it saves ``drop(x)``); tests use it, in float64, as the oracle.
* :func:`lora_linear_reference` — the ``torch`` backend: the same math wrapped in
  an autograd function whose backward is derived by hand and saves only ``x`` and
  the small ``U0 = drop(x) Aᵀ`` (the memory discipline of the fused kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.philox import dropout_keep_mask

#: Philox stream of the LoRA dropout mask (the mask covers the logical [M, K] x).
DROPOUT_STREAM = 0


@torch.library.custom_op("fastpeft::lora_linear_keep_mask", mutates_args=())
def _keep_mask_op(x2: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """Bool [M, K] Philox keep mask for the [M, K] input ``x2`` (only its shape and device are used).

    A custom op so that ``torch.compile`` treats the integer Philox arithmetic as one
    opaque call instead of tracing (and code-generating) its ten rounds."""
    return dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, stream=DROPOUT_STREAM, device=x2.device)


@_keep_mask_op.register_fake
def _(x2, seed, p):
    return torch.empty(x2.shape, dtype=torch.bool, device=x2.device)


def keep_mask(seed: int, M: int, K: int, p: float, device, x2: torch.Tensor = None) -> torch.Tensor:
    """Bool [M, K]: the dropout keep mask of lora_linear for ``seed`` (all True when p == 0)."""
    if p == 0.0:
        return torch.ones(M, K, dtype=torch.bool, device=device)
    if x2 is None:
        x2 = torch.empty(M, K, device=device, dtype=torch.bool)
    return _keep_mask_op(x2.detach(), seed, p)


def dropout_apply(x2: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``drop(x) = x * keep / (1 - p)`` in x's dtype (``x`` itself when p == 0)."""
    if p == 0.0:
        return x2
    return torch.where(keep, x2 * (1.0 / (1.0 - p)), torch.zeros((), dtype=x2.dtype, device=x2.device))


def lora_linear_plain(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                      seed: int = 0) -> torch.Tensor:
    """HF PEFT's vanilla LoRA forward, in plain PyTorch (autograd by PyTorch)::

        F.linear(x, W, b) + lora_B(lora_A(dropout(x))) * scale

    with ``dropout`` the Philox mask of ``seed`` and LoRA computed in x's dtype.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    keep = keep_mask(seed, x2.shape[0], K, dropout_p, x.device, x2)
    dx = dropout_apply(x2, keep, dropout_p).reshape(x.shape)
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return F.linear(x, weight, bias) + F.linear(F.linear(dx, A), B) * scale


class LoraLinearFunction(torch.autograd.Function):
    """The ``torch`` backend.  Forward (x2 = x as [M, K], keep the Philox mask)::

        U0 = drop(x2) @ Aᵀ                                  [M, r]   (saved)
        y  = x2 @ Wᵀ + b + scale * U0 @ Bᵀ                  [M, N]

    Backward, from y = x Wᵀ + b + s·D(x) Aᵀ Bᵀ with D(x) = x ∘ keep/(1-p) linear in x:

        dB = s · dYᵀ U0                       (∂y/∂B: y depends on B through U0 Bᵀ)
        G  = s · dY B                         [M, r] = gradient w.r.t. U0
        dA = Gᵀ D(x)                          (U0 = D(x) Aᵀ; D(x) rebuilt from the seed)
        dX = dY W + D(G A) = dY W + (G A) ∘ keep/(1-p)      (D is diagonal, self-adjoint)
        dW = dYᵀ x,  db = Σ_rows dY           (only when weight / bias require grad)

    Saved: x (which the base linear keeps anyway), U0 [M, r] and the parameters.
    Mixed precision (LoRA params fp32, activations half): the LoRA products run in
    x's dtype; dA and dB are accumulated in fp32 and returned in the params' dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        keep = keep_mask(seed, M, K, dropout_p, x.device, x2)
        u0 = dropout_apply(x2, keep, dropout_p) @ A.t()
        del keep
        # y is a 2-D view of the returned tensor: an output that is a view would make autograd refuse
        # in-place ops on it (ReLU(inplace=True) after the layer)
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        y = out.view(M, weight.shape[0])
        if bias is not None:
            torch.addmm(bias.to(x.dtype), x2, weight.t(), out=y)
        else:
            torch.mm(x2, weight.t(), out=y)
        y.addmm_(u0, B.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u0)
        ctx.scale, ctx.p, ctx.seed = scale, dropout_p, seed
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u0 = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        dy2 = dy.reshape(M, N).to(x.dtype)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        mixed = lora_A.dtype != x.dtype
        need_x, need_w, need_b, need_a, need_bb = (ctx.needs_input_grad[i] for i in range(5))
        dx = dw = db = da = dbb = None
        g = (dy2 @ B) * s if (need_x or need_a) else None
        if need_bb:
            dbb = (dy2.t().float() @ u0.float() if mixed else dy2.t() @ u0) * s
            dbb = dbb.to(lora_B.dtype)
        if need_x or need_a:
            keep = keep_mask(ctx.seed, M, K, p, x.device, x2)
            if need_a:
                xd = dropout_apply(x2, keep, p)
                da = (g.t().float() @ xd.float() if mixed else g.t() @ xd).to(lora_A.dtype)
                del xd
            if need_x:
                dx = dropout_apply(g @ A, keep, p).addmm_(dy2, weight).reshape(x.shape)
        if need_w:
            dw = (dy2.t() @ x2).to(weight.dtype)
        if need_b and ctx.has_bias:
            db = dy2.sum(0).to(weight.dtype)
        return dx, dw, db, da, dbb, None, None, None


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                          seed: int = 0) -> torch.Tensor:
    """The ``torch`` backend of :func:`fastpeft.ops.lora_linear` (arguments already checked)."""
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
