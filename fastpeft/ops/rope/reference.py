"""rope, pure-PyTorch reference (the ``torch`` backend and the test oracle).

transformers' ``apply_rotary_pos_emb`` in its partial-rotary form (Phi-3, GPT-NeoX, Qwen3-Next,
Nemotron: the first ``cos.shape[-1]`` dims of each head are rotated, the rest pass through; with
``cos.shape[-1] == head_dim`` it is Llama's), autograd by PyTorch.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: [x1, x2] -> [-x2, x1] on the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` on the first
    ``cos.shape[-1]`` dims of each head, the others passed through; cos/sin are unsqueezed at
    ``unsqueeze_dim`` to broadcast over the heads."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rd = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        out = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return rotate(q), rotate(k)


def out_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fused backends' output for input ``t``: t's shape and memory layout (``empty_like``), or
    contiguous when that layout's last dim would not be unit-stride.  The fake kernels use it too."""
    out = torch.empty_like(t, dtype=dtype)
    return out if out.stride(-1) == 1 else torch.empty(t.shape, dtype=dtype, device=t.device)
