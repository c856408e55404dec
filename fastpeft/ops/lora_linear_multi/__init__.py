"""``lora_linear_multi``: one base linear layer, every row of the batch with its own LoRA adapter
(multi-adapter serving), in one call.  Inference only.  Also :func:`lora_embedding_multi`, the same
for an ``nn.Embedding`` (a plain PyTorch path).

Equivalent PyTorch (:func:`reference.lora_linear_multi_loop`; ``x2`` = x as [M, K])::

    y = F.linear(x2, weight, bias)
    for m in range(M):
        a = adapter_index[m]
        if a >= 0:                                     # -1: the base layer only
            r = ranks[a]                               # the adapter's true rank (default r_max)
            y[m] += scales[a] * lora_B[a, :, :r] @ (lora_A[a, :r] @ x2[m])

Layout: the adapters are stacked, ``lora_A`` [n_adapters, r_max, K] and ``lora_B`` [n_adapters, N,
r_max] (PEFT's ``lora_A.weight`` / ``lora_B.weight`` of each adapter, smaller ranks zero-padded to
r_max).  ``ranks`` (optional, one int per adapter) tells the kernels each adapter's true rank, so the
padding is never read; without it the padded columns are computed (and must be zero).

Which rows use which adapter -- ``adapter_index`` (int32 or int64, -1 = base only) is one of
  * [M], one entry per row of x flattened to [M, K] (also accepted as x.shape[:-1]);
  * [B] when x is [B, T, ..., K] (3-D or more): one adapter per sequence, broadcast over its tokens
    (what generation needs; for [B, 1, K] decode steps both readings agree).

Backends: ``cpu`` (C++: a stable counting sort of the rows by adapter, then the grouped low-rank
product, OpenMP over (adapter, row block), x read in place, and the base GEMM by BLAS accumulated
into the same output), ``triton`` (cuBLAS base GEMM, then SGMV kernels for prefill-sized segments or
BGMV kernels for about one row per adapter, see ``triton_kernel.py``) and ``torch`` (sync-free and
compile-friendly, but n_adapters times the low-rank FLOPs; ``reference.py``).

Index check: by default every value of ``adapter_index`` is checked to lie in [-1, n_adapters) and a
bad one raises ``ValueError`` naming it and its row -- on a GPU that costs one host sync per call.
A server that validated the batch once can pass ``check_index=False`` for its layers: out-of-range
rows then get the base output only on the triton and torch backends (the cpu kernel checks anyway,
for free, while it sorts).

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/lora_linear_multi/`` (torch-free
``_cpu.cpp``, ``_binding.cpp``, ``_test.cpp``), ``tests/ops/test_lora_linear_multi.py``,
``fastpeft/bench/cases/ops/lora_linear_multi.py``, ``benchmarks/bench_lora_linear_multi.py``; ``layer.py`` runs
a LoRA layer's mixed-adapter batch on it (the adapters stacked once, the per-row index; used by
``fastpeft.PeftModel(..., adapter_names=...)`` and ``fastpeft.accelerate``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ...backends import define_op
from .._checks import check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import lora_embedding_multi_reference, lora_linear_multi_loop, lora_linear_multi_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = (None, "auto", "sgmv", "bgmv")
MAX_TRITON_RANK = 256
MAX_TRITON_ADAPTERS = 1024  # each SGMV program scans a vector of next_power_of_2(n_adapters) entries


def _example(device, dtype):
    """The arguments of ``OP`` (after the public function's checks): 7 rows over 3 adapters of
    different true ranks, two rows on the base alone."""
    randn = random_tensors(device, dtype)
    M, K, N, n, r = 7, 8, 5, 3, 4
    return (randn(M, K), randn(N, K, scale=K ** -0.5), randn(N), randn(n, r, K, scale=K ** -0.5),
            randn(n, N, r, scale=r ** -0.5), torch.tensor([0.5, 2.0, 1.25], device=device),
            torch.tensor([0, 2, -1, 1, 2, 0, -1], device=device), [4, 2, 3], None)


OP = define_op("lora_linear_multi", example=_example, differentiable=False)


# -- argument checks (shared with lora_embedding_multi) ------------------------------
def _refuse_grad(op: str, **tensors) -> None:
    """Inference only: raise when autograd would record this call (a tensor requires grad and grad
    mode is on).  Parameters that require grad are fine under ``torch.no_grad()`` / ``inference_mode``."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{op} is inference-only (no backward): {name} requires grad; call it under "
                               "torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def _check_adapters(lora_A, lora_B, scales, ranks, *, K: int, N: int, dtype: torch.dtype,
                    K_name: str = "K = x.shape[-1]", N_name: str = "N = weight.shape[0]") -> Optional[list]:
    """Shapes and dtypes of the stacked adapters; returns ``ranks`` as a list of ints (or None)."""
    check_tensor("lora_A", lora_A, ndim=(3,))
    check_tensor("lora_B", lora_B, ndim=(3,))
    n, r, Ka = lora_A.shape
    if n < 1 or r < 1 or Ka != K:
        raise ValueError(f"lora_A: expected shape [n_adapters, r_max, {K}] with n_adapters, r_max >= 1 "
                         f"({K_name}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, N, r):
        raise ValueError(f"lora_B: expected shape [{n}, {N}, {r}] (n_adapters, {N_name}, r_max), "
                         f"got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (stack the adapters in the compute dtype once), "
                            f"got {t.dtype}")
    check_tensor("scales", scales, ndim=(1,))
    if not scales.dtype.is_floating_point or scales.shape[0] != n:
        raise ValueError(f"scales: expected a floating-point tensor of shape [{n}] (one per adapter), "
                         f"got {scales.dtype} of shape {tuple(scales.shape)}")
    if ranks is None:
        return None
    if isinstance(ranks, torch.Tensor) or not isinstance(ranks, Sequence) or len(ranks) != n:
        raise ValueError(f"ranks: expected a sequence of {n} ints (one per adapter) or None, got {ranks!r}")
    out = []
    for v in ranks:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= r:
            raise ValueError(f"ranks: expected ints in [0, {r}] (r_max = lora_A.shape[1]), got {list(ranks)}")
        out.append(int(v))
    return out


def _rows_index(adapter_index, lead: tuple, what: str) -> torch.Tensor:
    """``adapter_index`` as [M] over the rows (``lead`` = the leading dims of the input, M their product):
    accepted as [M], as ``lead`` itself, or as [lead[0]] (one adapter per sequence) when len(lead) >= 2."""
    check_tensor("adapter_index", adapter_index, dtypes=INDEX_DTYPES)
    M = math.prod(lead)
    shape = tuple(adapter_index.shape)
    if shape == (M,) or shape == lead:
        return adapter_index.reshape(M)
    if len(lead) >= 2 and shape == lead[:1]:
        return adapter_index.reshape(-1, 1).expand(lead[0], M // lead[0] if lead[0] else 0).reshape(M)
    seq = f", or [{lead[0]}] (one per sequence)" if len(lead) >= 2 else ""
    raise ValueError(f"adapter_index: expected shape [{M}] (one per row of {what}), {list(lead)}{seq}; "
                     f"got {list(shape)}")


@torch.library.custom_op("fastpeft::lora_multi_check_index", mutates_args=())
def _checked_index(adapter_index: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """A copy of ``adapter_index`` after checking that every value is in [-1, n_adapters) (one host sync
    on a GPU).  A custom op so that the check also runs inside ``torch.compile``d graphs."""
    if adapter_index.numel():
        lo, hi = torch.stack(torch.aminmax(adapter_index)).tolist()
        if lo < -1 or hi >= n_adapters:
            pos = [int(i) for i in ((adapter_index < -1) | (adapter_index >= n_adapters)).nonzero()[0]]
            raise ValueError(f"adapter_index: expected values in [-1, {n_adapters}) (-1 = base only, "
                             f"n_adapters = {n_adapters}), got {int(adapter_index[tuple(pos)])} at "
                             f"adapter_index{pos}")
    return adapter_index.clone()


@_checked_index.register_fake
def _(adapter_index, n_adapters):
    return torch.empty_like(adapter_index)


def _index_for_rows(adapter_index, lead, what, n_adapters, check_index) -> torch.Tensor:
    """[M] adapter index of the rows, range-checked (before any per-sequence broadcast) when asked."""
    if not isinstance(check_index, bool):
        raise TypeError(f"check_index: expected True or False, got {check_index!r}")
    if check_index:
        adapter_index = _checked_index(adapter_index, n_adapters)
    return _rows_index(adapter_index, lead, what)


# -- public functions --------------------------------------------------------------------
def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scales: torch.Tensor, adapter_index: torch.Tensor, *,
                      ranks: Optional[Sequence[int]] = None, layout: Optional[str] = None,
                      check_index: bool = True) -> torch.Tensor:
    """Multi-adapter LoRA linear layer, ``y[m] = x[m] Wᵀ + b + s_a · (x[m] A_aᵀ) B_aᵀ`` with
    ``a = adapter_index[m]`` (-1: base only).  Inference only (raises if autograd would record it).

    Args:
        x: [..., K] activations (fp32/fp16/bf16; fp64 on the torch and cpu backends), any strides.
        weight: [N, K] base weight, dtype of x, any strides (e.g. a GPT-2 ``Conv1D.weight.t()``).
        bias: [N] or None, dtype of x.
        lora_A: [n_adapters, r_max, K], dtype of x (ranks below r_max zero-padded).
        lora_B: [n_adapters, N, r_max], dtype of x.
        scales: [n_adapters] floating point (``alpha / r`` per adapter), same device.
        adapter_index: int32/int64, [M] (rows of x as [M, K]) or x.shape[:-1], or [B] for x [B, T, ..., K]
            (one adapter per sequence); -1 = base only.
        ranks: optional true rank of each adapter (n_adapters ints in [0, r_max]); columns beyond it are
            ignored (never read).
        layout: Triton only: ``"sgmv"`` (rows grouped by adapter, prefill), ``"bgmv"`` (a program per
            row, decode) or None/"auto" (a heuristic on rows per adapter, see ``triton_kernel.choose_layout``).
        check_index: check that every index is in [-1, n_adapters) (one host sync on a GPU); see the
            module doc for what ``False`` means.

    Returns:
        y: [..., N] in x's dtype.

    Equivalent PyTorch: :func:`fastpeft.ops.lora_linear_multi.reference.lora_linear_multi_loop`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., K] with K >= 1, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=(2,))
    check_tensor("bias", bias, ndim=(1,), allow_none=True)
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight: expected shape [N, {K}] (K = x.shape[-1] = {K}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias: expected shape [{N}] (N = weight.shape[0]), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    ranks = _check_adapters(lora_A, lora_B, scales, ranks, K=K, N=N, dtype=x.dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    check_tensor("adapter_index", adapter_index, dtypes=INDEX_DTYPES)
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scales=scales,
                      adapter_index=adapter_index)
    _refuse_grad("lora_linear_multi", x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scales=scales)
    idx = _index_for_rows(adapter_index, tuple(x.shape[:-1]), "x as [M, K]", lora_A.shape[0], check_index)
    return OP(x, weight, bias, lora_A, lora_B, scales, idx, ranks, layout)


def lora_embedding_multi(input_ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scales: torch.Tensor, adapter_index: torch.Tensor, *, ranks: Optional[Sequence[int]] = None,
                         check_index: bool = True) -> torch.Tensor:
    """Multi-adapter LoRA of an embedding, ``y[m] = E[id_m] + s_a · (A_a[:, id_m])ᵀ B_aᵀ`` per token
    (PEFT's ``lora.Embedding`` math with ``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [D, r] per
    adapter, stacked).  Inference only.  Plain PyTorch (:func:`reference.lora_embedding_multi_reference`):
    the A side is a gather of r numbers per token and the B side n_adapters·r·D multiply-adds per token,
    tiny next to the model's linear layers, so it has no kernel of its own.

    Args:
        input_ids: integer tensor [...] (M tokens in all).
        weight: [V, D] embedding matrix (a plain lookup: an ``nn.Embedding`` with ``max_norm`` is not covered).
        lora_A: [n_adapters, r_max, V], lora_B: [n_adapters, D, r_max], dtype of weight.
        scales, ranks, check_index: as in :func:`lora_linear_multi`.
        adapter_index: [M], input_ids.shape, or [B] when input_ids is [B, T, ...] (one per sequence).

    Returns:
        [..., D] in weight's dtype.
    """
    check_tensor("input_ids", input_ids, dtypes=(torch.int32, torch.int64))
    check_tensor("weight", weight, ndim=(2,), dtypes=FLOAT_DTYPES)
    V, D = weight.shape
    ranks = _check_adapters(lora_A, lora_B, scales, ranks, K=V, N=D, dtype=weight.dtype,
                            K_name="V = weight.shape[0]", N_name="D = weight.shape[1]")
    check_tensor("adapter_index", adapter_index, dtypes=INDEX_DTYPES)
    check_same_device("weight", weight, input_ids=input_ids, lora_A=lora_A, lora_B=lora_B, scales=scales,
                      adapter_index=adapter_index)
    _refuse_grad("lora_embedding_multi", weight=weight, lora_A=lora_A, lora_B=lora_B, scales=scales)
    idx = _index_for_rows(adapter_index, tuple(input_ids.shape), "input_ids", lora_A.shape[0], check_index)
    return lora_embedding_multi_reference(input_ids, weight, lora_A, lora_B, scales, idx, ranks)


# -- the ops' fake: y [..., N] ---------------------------------------------------------------
# Inference only: no backward is registered (the public functions refuse inputs that require grad).
def _fake(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# -- cpu: torch.ops.fastpeft.lora_linear_multi (csrc/lora_linear_multi/) -----------------------------
compiled_op("lora_linear_multi", fake=_fake)


def _lora_linear_multi_cpu(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout):
    return torch.ops.fastpeft.lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks)


# -- triton: torch.ops.fastpeft.lora_linear_multi_triton ------------------------------------------
@triton_op("lora_linear_multi_triton", fake=_fake)
def _lora_linear_multi_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              lora_A: torch.Tensor, lora_B: torch.Tensor, scales: torch.Tensor,
                              adapter_index: torch.Tensor, ranks: Optional[list[int]], layout: str) -> torch.Tensor:
    from .triton_kernel import lora_linear_multi_triton

    return lora_linear_multi_triton(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout)


def _lora_linear_multi_on_triton(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout):
    return _lora_linear_multi_triton(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout or "auto")


def _fits_triton(x, weight, bias, lora_A, *args, forced):
    n, r = lora_A.shape[:2]
    if r > MAX_TRITON_RANK:
        return f"triton backend supports ranks up to {MAX_TRITON_RANK}, got r_max = {r}"
    if n > MAX_TRITON_ADAPTERS:
        return f"triton backend supports up to {MAX_TRITON_ADAPTERS} adapters, got {n}"
    return None


# -- backends ----------------------------------------------------------------------------------
register_backend(OP, "torch")(lora_linear_multi_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["lora_linear_multi"])(_lora_linear_multi_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_fits_triton)(_lora_linear_multi_on_triton)

__all__ = ["lora_linear_multi", "lora_embedding_multi", "lora_linear_multi_loop", "OP"]
