"""swiglu / geglu, pure-PyTorch reference (the ``torch`` backends and the test oracle).

The unfused gated MLP activation of transformers' LlamaMLP / GemmaMLP, ``act_fn(gate) * up``, with
ACT2FN's activations: "silu" (F.silu), "gelu_pytorch_tanh" (F.gelu(approximate="tanh")) and "gelu"
(F.gelu, exact erf).  Autograd by PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: geglu's ``approximate`` -> the activation name of the compiled/Triton kernels.
GELU_KERNEL_ACT = {"tanh": "gelu_tanh", "none": "gelu"}


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``F.gelu(gate, approximate=approximate) * up``."""
    return F.gelu(gate, approximate=approximate) * up
