"""``rope``: rotary position embedding of q and k in one fused pass, transformers' rotate-half layout.

Equivalent PyTorch (transformers' ``apply_rotary_pos_emb``, partial-rotary form)::

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rd = cos.shape[-1]                                   # rotary dims (<= head dim, even)
    def rotate(x):
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    return rotate(q), rotate(k)                          # rotate_half([a, b]) = [-b, a]

Shapes (unsqueeze_dim=1, transformers' default): q [B, Hq, S, D], k [B, Hk, S, D] (Hq != Hk for
grouped-query attention), cos, sin [B or 1, S, rd].  unsqueeze_dim=2: q [B, S, Hq, D], k [B, S, Hk, D].
q and k may have any strides (typically ``proj(x).view(B, S, H, D).transpose(1, 2)``); the outputs
keep their memory layout.  Output dtype: ``promote_types(q.dtype, cos.dtype)``, as ``q * cos`` has.

Drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``:
``rope(q, k, cos, sin, unsqueeze_dim)``.  The kernels round each product and the sum to the output
dtype, where the unfused composition rounds: with q, k, cos and sin of one dtype the results are the
same bits as transformers' (forward and backward).

Backward: the map is linear in q and k, y = R x with, for j < h = rd/2,
``y_j = c_j x_j - s_j x_{j+h}`` and ``y_{j+h} = c_{j+h} x_{j+h} + s_{j+h} x_j``; so dx = Rᵀ dy::

    dx_j     = c_j dy_j         + s_{j+h} dy_{j+h}
    dx_{j+h} = c_{j+h} dy_{j+h} - s_j dy_j
    dx_j     = dy_j  for j >= rd (passed through)

(the rotation by -theta for transformers' cos/sin, which repeat their rd/2 frequencies).  It is the
same kernel with ``transpose=True``; nothing is saved but cos and sin.  Gradients of cos/sin are not
computed by the fused backends: when cos or sin requires grad the ``torch`` backend runs instead.

Backends: ``torch`` (:mod:`.reference`), ``cpu`` (C++, ``csrc/rope/``: float32, float64, bfloat16, and
bfloat16 q/k with float32 cos/sin), ``triton`` (GPU: float32/float16/bfloat16; one program per token
for all heads of q and k).

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/rope/``, ``tests/ops/test_rope.py``,
``fastpeft/bench/cases/ops/rope.py`` (benchmark cases), ``benchmarks/bench_rope.py``; one line in
``fastpeft/ops/__init__.py``.
"""
from __future__ import annotations

import torch

from ...backends import define_op
from .._checks import check_same_device, check_tensor, dtype_pair_reason
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import out_like, rope_reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (q dtype, output dtype) pairs of the C++ kernel (csrc/common/torch_utils.h: dispatch_in_out_cpu).
CPU_PAIRS = ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32))
# The Triton kernel takes any q dtype of GPU_DTYPES whose promotion with cos's is one of GPU_DTYPES.
GPU_PAIRS = tuple((a, b) for a in GPU_DTYPES for b in GPU_DTYPES if torch.promote_types(a, b) == b)


def _example(device, dtype):
    """The arguments of ``OP``: q [2, 4, 3, 8] and k [2, 2, 3, 8] (grouped-query heads), cos/sin
    [1, 3, 6] (partial rotary: 6 of 8 dims), all of ``dtype``, unsqueeze_dim 1."""
    randn = random_tensors(device, dtype)
    angles = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).repeat(1, 1, 2)
    return (randn(2, 4, 3, 8), randn(2, 2, 3, 8), angles.cos().to(device, dtype), angles.sin().to(device, dtype), 1)


OP = define_op("rope", example=_example)


def _check_args(q, k, cos, sin, unsqueeze_dim):
    for name, t in (("q", q), ("k", k)):
        check_tensor(name, t, ndim=(4,), dtypes=FLOAT_DTYPES)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=(3,), dtypes=FLOAT_DTYPES)
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim: expected 1 (q [B, H, S, D]) or 2 (q [B, S, H, D]), got {unsqueeze_dim!r}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (the dtype of q), got {k.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin: expected dtype {cos.dtype} (the dtype of cos), got {sin.dtype}")
    check_same_device("q", q, k=k, cos=cos, sin=sin)
    sd = 3 - unsqueeze_dim  # position dim of q and k
    B, S, D = q.shape[0], q.shape[sd], q.shape[3]
    layout = "[B, H, S, D]" if unsqueeze_dim == 1 else "[B, S, H, D]"
    if (k.shape[0], k.shape[sd], k.shape[3]) != (B, S, D):
        raise ValueError(f"k: expected {layout} with B = {B}, S = {S}, D = {D} (from q {tuple(q.shape)}), "
                         f"got {tuple(k.shape)}")
    rd = cos.shape[-1]
    if cos.shape[0] not in (1, B) or cos.shape[1] != S or rd < 2 or rd % 2 or rd > D:
        raise ValueError(f"cos: expected [B or 1, S, rd] = [{B} or 1, {S}, rd] with rd even and 2 <= rd <= {D} "
                         f"(from q {tuple(q.shape)}, unsqueeze_dim={unsqueeze_dim}), got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``.

    Args:
        q: [B, Hq, S, D] (unsqueeze_dim=1) or [B, S, Hq, D] (unsqueeze_dim=2), any strides.
        k: like q with its own head count Hk (grouped-query attention); q's dtype.
        cos: [B or 1, S, rd] (transformers' rotary embedding output); rd even, <= D: the first rd
            dims of each head are rotated, the others passed through (partial rotary).
        sin: cos's shape and dtype.
        unsqueeze_dim: the head dim of q and k, where cos/sin get unsqueezed (transformers' argument).

    Returns:
        (q_embed, k_embed): the shapes and memory layouts of q and k, dtype ``promote_types(q.dtype,
        cos.dtype)``.  Differentiable in q and k (and in cos/sin through the ``torch`` backend).

    See the module doc for the equivalent PyTorch and the derivation of the backward.
    """
    _check_args(q, k, cos, sin, unsqueeze_dim)
    return OP(q, k, cos, sin, int(unsqueeze_dim))


# -- shared by the fused backends ------------------------------------------------
# One op per backend, (q, k, cos, sin, unsqueeze_dim, transpose) -> (q_out, k_out), linear in q and k;
# its backward is the same op with transpose flipped (the adjoint; see the module doc), so it is
# differentiable again (double backward).
def _fake(q, k, cos, sin, unsqueeze_dim, transpose):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return out_like(q, dtype), out_like(k, dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.transpose = unsqueeze_dim, transpose
    ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)


def _make_backward(op):
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        like = gq if gq is not None else gk
        # An output that did not reach the loss has no gradient: zeros in its place.
        gq = gq if gq is not None else like.new_zeros(ctx.q_meta[0])
        gk = gk if gk is not None else like.new_zeros(ctx.k_meta[0])
        dq, dk = op(gq, gk, cos, sin, ctx.unsqueeze_dim, not ctx.transpose)
        return (dq.to(ctx.q_meta[1]) if need_q else None, dk.to(ctx.k_meta[1]) if need_k else None,
                None, None, None, None)

    return backward


def _fused_rule(pairs, what):
    """``also`` of a fused backend: why it cannot take these inputs (its (q, output) dtype ``pairs``; no
    gradient of cos/sin), or None."""
    def check(q, k, cos, sin, unsqueeze_dim, forced):
        reason = dtype_pair_reason((q.dtype, torch.promote_types(q.dtype, cos.dtype)), pairs, what, "q/output")
        if reason is None and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            reason = f"{what} computes no gradient for cos/sin, which require grad (the torch backend does)"
        return reason

    return check


# -- cpu: torch.ops.fastpeft.rope (csrc/rope/) ---------------------------------------------
compiled_op("rope", fake=_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.rope(*a)))


def _rope_cpu(q, k, cos, sin, unsqueeze_dim):
    return torch.ops.fastpeft.rope(q, k, cos, sin, unsqueeze_dim, False)


# -- triton: torch.ops.fastpeft.rope_triton (its backward is itself, transposed) ---------------------
@triton_op("rope_triton", fake=_fake, setup_context=_setup_context,
           backward=_make_backward(lambda *a: _rope_triton_op(*a)))
def _rope_triton_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                    transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import rope_triton

    return rope_triton(q, k, cos, sin, unsqueeze_dim, transpose)


def _rope_triton(q, k, cos, sin, unsqueeze_dim):
    return _rope_triton_op(q, k, cos, sin, unsqueeze_dim, False)


# -- backends ----------------------------------------------------------------------------------
register_backend(OP, "torch")(rope_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, also=_fused_rule(CPU_PAIRS, "cpu backend"), needs=["rope"])(_rope_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_fused_rule(GPU_PAIRS, "triton backend"))(_rope_triton)

__all__ = ["rope", "rope_reference", "OP"]
