"""fastpeft's fused ops.  Each is a plain function that dispatches through the
backend registry (:mod:`fastpeft.backends`) to ``cuda``, ``triton``, ``cpu`` or
``torch`` and is differentiable, except the inference-only (serving) ``lora_linear_multi`` and
``lora_embedding_multi``.

Every op package ``fastpeft/ops/<name>/`` describes itself (its registry entries with example
inputs, its backends and dtypes, ``triton_kernel.aot_launches()``); what iterates over all
ops (``fastpeft info``, the tests, the ahead-of-time Triton compile, ``fastpeft bench``)
finds them through :func:`op_packages` and :func:`fastpeft.backends.all_ops`.  Adding an op is
its own files plus its import line below (see CONTRIBUTING.md).
"""
import pkgutil

import torch

from .scaled_add import scaled_add
from .bottleneck_adapter import bottleneck_adapter
from .lora_linear import lora_linear
from .lora_linear_multi import lora_embedding_multi, lora_linear_multi
from .lora_linear_4bit import lora_linear_4bit
from .lora_linear_8bit import lora_linear_8bit
from .adv_perturb_update import adv_perturb_init, adv_perturb_update
from .grad_tail import grad_tail, grad_tail_, grad_tail_apply_
from .rms_norm import rms_norm
from .rope import rope
from .glu import geglu, swiglu
from .linear_cross_entropy import linear_cross_entropy

# The public functions are the ones imported above from the op packages.
__all__ = sorted(n for n, v in dict(globals()).items() if getattr(v, "__module__", "").startswith(__name__ + ".")) \
    + ["example_inputs", "op_packages"]


def op_packages() -> list[str]:
    """Names of the op packages (the sub-packages of ``fastpeft/ops``), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_"))


def example_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Small example arguments per op name, on ``device`` (each op's ``example``: see
    :class:`fastpeft.backends.Op`).  Built when called: no tensors are created at import."""
    from ..backends import all_ops

    return {name: op.example_inputs(device, dtype) for name, op in all_ops().items() if op.example is not None}
