"""fastpeft's fused ops.  Each is a plain function that dispatches through the
backend registry (:mod:`fastpeft.backends`) to ``cuda``, ``triton``, ``cpu`` or
``torch`` and is differentiable."""
import torch

from .scaled_add import scaled_add
from .bottleneck_adapter import bottleneck_adapter
from .lora_linear import lora_linear
from .adv_perturb_update import adv_perturb_init, adv_perturb_update
from .grad_tail import grad_tail, grad_tail_, grad_tail_apply_
from .rms_norm import rms_norm
from .rope import rope
from .glu import geglu, swiglu

__all__ = ["scaled_add", "bottleneck_adapter", "lora_linear", "adv_perturb_update", "adv_perturb_init",
           "grad_tail", "grad_tail_", "grad_tail_apply_", "rms_norm", "rope", "swiglu", "geglu", "example_inputs"]


def example_inputs(device: str = "cpu") -> dict:
    """Small example arguments per op name (used by ``fastpeft info`` to ask each
    backend whether it would take inputs on ``device``).  Built lazily: no tensors
    are created at import."""
    d = torch.device(device)
    f32 = dict(device=d, dtype=torch.float32)
    return {
        "scaled_add": (torch.zeros(4, **f32), torch.zeros(4, **f32), 1.0),
        "bottleneck_adapter": (torch.zeros(2, 8, **f32), torch.zeros(4, 8, **f32), torch.zeros(4, **f32),
                               torch.zeros(8, 4, **f32), torch.zeros(8, **f32), "relu", 0.1, 0, True),
        "lora_linear": (torch.zeros(2, 8, **f32), torch.zeros(4, 8, **f32), torch.zeros(4, **f32),
                        torch.zeros(2, 8, **f32), torch.zeros(4, 2, **f32), 1.0, 0.1, 0),
        "adv_perturb_update": (torch.zeros(2, 3, 8, **f32), torch.zeros(2, 3, 8, **f32), torch.ones(2, 3, **f32),
                               "l2_example", 0.1, 1.0),
        "adv_perturb_init": (torch.zeros(2, 3, 8, **f32), torch.ones(2, 3, **f32), "uniform", "l2_example", 1.0, 0),
        "grad_tail": ([torch.zeros(4, **f32)], torch.ones((), **f32), 1.0, 2.0, 1e-6),
        "grad_tail_apply": ([torch.zeros(4, **f32)], torch.ones((), **f32)),
        "rms_norm": (torch.zeros(2, 8, **f32), torch.ones(8, **f32), 1e-6, 0.0, True),
        "rope": (torch.zeros(1, 4, 3, 8, **f32), torch.zeros(1, 2, 3, 8, **f32), torch.ones(1, 3, 8, **f32),
                 torch.zeros(1, 3, 8, **f32), 1),
        "swiglu": (torch.zeros(2, 8, **f32), torch.zeros(2, 8, **f32)),
        "geglu": (torch.zeros(2, 8, **f32), torch.zeros(2, 8, **f32), "tanh"),
    }
