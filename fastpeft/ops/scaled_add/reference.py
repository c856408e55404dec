"""scaled_add, pure-PyTorch reference (the ``torch`` backend and the test oracle)."""
import torch


def scaled_add_reference(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a + alpha * b`` with the rounding of one fused step: computed in fp32 for
    half types (like the kernels), returned in ``a.dtype``."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() + alpha * b.float()).to(a.dtype)
    return a + alpha * b
