"""``linear_cross_entropy``: the LM head and the cross-entropy fused, without the [tokens, vocab] logits.

Equivalent PyTorch (A = float32, float64 for float64 hidden; see :mod:`.reference`)::

    logits = F.linear(hidden, weight, bias).to(A)                        # [N, V], hidden's dtype, then A
    if logit_softcap is not None:                                        # Gemma-2
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)

Shapes: hidden [..., H] (N tokens = product of the leading dims, may be 0; any strides), weight [V, H]
and bias [V] of hidden's dtype, labels [...] (hidden's leading dims, integer).  The loss is float32
(float64 for float64 hidden), as transformers' ``ForCausalLMLoss`` (which upcasts the logits) gives it:
a scalar, or labels' shape for ``reduction="none"``.

The fused backends take ``chunk_size`` tokens at a time: the chunk's logits (``h_c @ W.T + b``, a GEMM
in hidden's dtype), then one pass per row in float32 that writes the row's loss and overwrites the
logits with ``dL/dlogits``, then ``dh_c = dlogits @ W`` (and ``dW += dlogits.T @ h_c``, ``db +=
Σ dlogits`` only when weight / bias require grad, in float32).  So the gradients are computed in the
forward (as Liger-Kernel's fused linear cross-entropy does): the backward only scales them by the
incoming gradient, no logits are recomputed, and at most one chunk of logits ([chunk_size, V]) exists.

Row math (z = the row's logits after softcap, y its label, ε = label_smoothing, c = 1/count of
non-ignored labels for ``mean``, else 1)::

    lse = log Σ_j exp z_j,  p_j = exp(z_j - lse)
    loss = (1 - ε) (lse - z_y) + ε (lse - mean_j z_j)
    dL/dz_j = c (p_j - (1 - ε) [j = y] - ε / V)
    softcap: z = cap tanh(x / cap), dz/dx = 1 - (z / cap)²
    ignored rows: loss 0, gradient 0

``torch.autocast`` does not change the op: it computes in its inputs' dtype (cast them first, as
``F.linear`` under autocast would: :mod:`fastpeft.patching` does).

Torch's behaviour kept: with every label ignored (or no tokens) the ``mean`` loss is NaN (0 / 0) and
the gradients are 0; ``sum`` gives 0, ``none`` zeros.  A label outside [0, V) other than
``ignore_index`` raises ``ValueError`` naming the label and its position (checked eagerly; inside
``torch.compile`` the C++ kernel still raises, the Triton kernel then gives a NaN loss).

``reduction="none"`` with a weight or bias that requires grad needs the incoming per-token gradient
inside dW, so the fused backends decline it and the ``torch`` backend (full logits) runs.

Backends: ``torch`` (:mod:`.reference`, full logits), ``cpu`` (C++ row kernel ``csrc/linear_cross_entropy/``,
chunk GEMMs by ATen: float32, float64, bfloat16), ``triton`` (GPU: float32/float16/bfloat16; row kernel
in Triton, chunk GEMMs by cuBLAS).

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/linear_cross_entropy/``,
``tests/ops/test_linear_cross_entropy.py``, ``fastpeft/bench/cases/ops/linear_cross_entropy.py``,
``benchmarks/bench_linear_cross_entropy.py``; one line in ``fastpeft/ops/__init__.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import define_op
from .._checks import check_float, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import acc_dtype, linear_cross_entropy_reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
REDUCTIONS = ("mean", "sum", "none")
# Logits per chunk the default chunk size aims at: 4M elements (16 MB float32) on CPU, 16M on GPUs.
CHUNK_ELEMENTS = {"cpu": 1 << 22}
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    """Tokens per chunk: about ``CHUNK_ELEMENTS`` logits, a multiple of 8, at least 8, at most N."""
    target = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    return max(1, min(max(N, 1), max(8, (target // max(V, 1)) // 8 * 8)))


def _example(device, dtype):
    """7 tokens of hidden 16, vocabulary 37, a bias, one ignored label, label smoothing 0.1, chunks of 3."""
    randn = random_tensors(device, dtype)
    labels = torch.tensor([3, 36, -100, 0, 17, 5, 29], device=device)
    return randn(7, 16), randn(37, 16, scale=0.5), labels, randn(37), -100, 0.1, 0.0, "mean", 3


OP = define_op("linear_cross_entropy", example=_example)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, logit_softcap: Optional[float] = None,
                         reduction: str = "mean", chunk_size: Optional[int] = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` without materialising the logits.

    Args:
        hidden: [..., H] float activations (float32/bfloat16/float16/float64), any strides, may be empty.
        weight: [V, H] of hidden's dtype (the LM head).
        labels: [...] integer class ids, hidden's leading shape; ``ignore_index`` marks tokens without a loss.
        bias: [V] of hidden's dtype, or None.
        ignore_index: label value that contributes neither loss nor gradient.
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s.
        logit_softcap: None, or > 0: the logits become ``cap * tanh(logits / cap)`` (Gemma-2).
        reduction: "mean" (over the non-ignored tokens; NaN when there are none, as in torch), "sum"
            or "none".
        chunk_size: tokens per chunk of the fused backends (None: about 4M logits per chunk on CPU,
            16M on GPUs).

    Returns:
        loss: float32 (float64 for float64 hidden); a scalar, or labels' shape for ``reduction="none"``.

    Raises ValueError / TypeError naming the argument for bad shapes, dtypes, devices or options, and
    ValueError for a label outside [0, V) other than ``ignore_index``.  See the module doc.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected a tensor [..., H] with H >= 1, got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    check_tensor("weight", weight, ndim=(2,))
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [V, {H}] (V >= 1, H = hidden.shape[-1]), got {tuple(weight.shape)}")
    V = weight.shape[0]
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype} (as F.linear does; "
                        "cast one of them)")
    check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                         f"got {tuple(labels.shape)}")
    check_tensor("bias", bias, ndim=(1,), allow_none=True)
    if bias is not None:
        if bias.shape[0] != V:
            raise ValueError(f"bias: expected shape [{V}] (V = weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected hidden's dtype {hidden.dtype}, got {bias.dtype}")
    check_same_device("hidden", hidden, weight=weight, labels=labels, bias=bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    label_smoothing = check_float("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    softcap = 0.0
    if logit_softcap is not None:
        softcap = check_float("logit_softcap", logit_softcap)
        if not softcap > 0 or softcap == float("inf"):
            raise ValueError(f"logit_softcap: expected None or a finite number > 0, got {logit_softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
    N = labels.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V, hidden.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    labels1 = labels.reshape(N).to(torch.int64).contiguous()  # the kernels index labels by row
    check_labels(labels1, V, ignore_index)
    # computed in the inputs' dtype whatever the ambient autocast: otherwise its GEMMs (ATen's, inside
    # every backend) would be cast by autocast one by one, in the forward and not in the gradient GEMMs
    with torch.autocast(hidden.device.type, enabled=False):
        loss = OP(hidden.reshape(N, H), weight, labels1, bias, ignore_index, label_smoothing, softcap, reduction,
                  int(chunk_size))
    return loss.reshape(labels.shape) if reduction == "none" else loss


def check_labels(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """ValueError for the first label outside [0, V) that is not ``ignore_index`` (eager calls only:
    the check reads the labels on the host; traced code relies on the kernels)."""
    if torch.compiler.is_compiling() or type(labels) is not torch.Tensor or not labels.numel():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: {int(labels[pos])} at position {pos} (flattened) is outside [0, {V}) "
                         f"(V = weight.shape[0]) and is not ignore_index ({ignore_index})")


# -- the fused forward op, shared by the C++ and Triton backends -------------------------------
# linear_cross_entropy_fwd(hidden [N, H], weight, labels [N], bias?, ignore_index, label_smoothing,
# softcap, reduction, chunk_size, need_dh, need_dweight, need_dbias) -> (loss, dh, dweight, dbias):
# the loss as documented and the gradients of that loss (for reduction="none": of the sum of the
# per-token losses, i.e. each row's own gradient) to hidden (hidden's dtype), weight and bias (their
# dtypes), a gradient not asked for being an empty [0] tensor.  Backward scales them:
#   dL/dhidden_i = g * dh_i    (reduction mean / sum: g the scalar incoming gradient)
#   dL/dhidden_i = g_i * dh_i  (reduction none: the loss is Σ_i g_i loss_i, and loss_i depends on row i only)
#   dL/dweight = g * dweight, dL/dbias = g * dbias  (mean / sum only; see the module doc for "none")
def _fwd_fake(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, chunk_size,
              need_dh, need_dweight, need_dbias):
    N, H = hidden.shape
    acc = acc_dtype(hidden.dtype)
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=acc)
    dh = hidden.new_empty((N, H) if need_dh else (0,))
    dw = weight.new_empty(weight.shape if need_dweight else (0,))
    db = weight.new_empty((weight.shape[0],) if need_dbias else (0,))
    return loss, dh, dw, db


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[7]
    ctx.computed = inputs[9:12]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    dh, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad
    for i, (name, computed) in enumerate(zip(("hidden", "weight", "bias"), ctx.computed)):
        if need[(0, 1, 3)[i]] and not computed:
            raise RuntimeError(f"linear_cross_entropy: the gradient to {name} was not computed in the forward "
                               "(it did not require grad then, or grad mode was off)")
    g = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
    gh = (dh * g).to(dh.dtype) if need[0] else None
    gw = (dw * grad_loss).to(dw.dtype) if need[1] else None
    gb = (db * grad_loss).to(db.dtype) if need[3] else None
    return gh, gw, None, gb, None, None, None, None, None, None, None, None


def _needs(hidden, weight, bias) -> tuple[bool, bool, bool]:
    """Which gradients the forward must compute: those autograd will ask for."""
    grad = torch.is_grad_enabled()
    return (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)


def _fused_takes(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, chunk_size,
                 forced):
    if reduction == "none" and any(_needs(hidden, weight, bias)[1:]):
        return ("the fused backends give weight / bias gradients for reduction mean or sum only "
                "(reduction='none' with a trainable weight or bias runs on the torch backend)")
    return None


# -- cpu: torch.ops.fastpeft.linear_cross_entropy_fwd (csrc/linear_cross_entropy/) ------------
compiled_op("linear_cross_entropy_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_backward)


def _lce_cpu(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, chunk_size):
    return torch.ops.fastpeft.linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing,
                                                       softcap, reduction, chunk_size,
                                                       *_needs(hidden, weight, bias))[0]


# -- triton: torch.ops.fastpeft.linear_cross_entropy_triton_fwd --------------------------------
@triton_op("linear_cross_entropy_triton_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_backward)
def _lce_triton_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                    ignore_index: int, label_smoothing: float, softcap: float, reduction: str, chunk_size: int,
                    need_dh: bool, need_dweight: bool,
                    need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernel import linear_cross_entropy_fwd_triton

    return linear_cross_entropy_fwd_triton(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap,
                                           reduction, chunk_size, need_dh, need_dweight, need_dbias)


def _lce_triton(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, chunk_size):
    return _lce_triton_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction,
                           chunk_size, *_needs(hidden, weight, bias))[0]


# -- backends ----------------------------------------------------------------------------------
register_backend(OP, "torch")(linear_cross_entropy_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, also=_fused_takes, needs=["linear_cross_entropy_fwd"])(_lce_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_fused_takes)(_lce_triton)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "default_chunk_size", "OP"]
