"""scaled_add, Triton kernel: ``out = a + alpha * b`` over flat contiguous data."""
import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_add_kernel(a_ptr, b_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m).to(tl.float32)
    tl.store(out_ptr + offs, (a + alpha * b).to(out_ptr.dtype.element_ty), mask=m)


def scaled_add_triton(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        block = 1024
        _scaled_add_kernel[(triton.cdiv(n, block),)](a, b, out, float(alpha), n, BLOCK=block)
    return out


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py
    records them instead of running them and compiles each to a cubin)."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        scaled_add_triton(torch.zeros(37, dtype=dt), torch.zeros(37, dtype=dt), 0.5)
