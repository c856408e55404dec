"""fastpeft's fused ops.  Each is a plain function that dispatches through the
backend registry (:mod:`fastpeft.backends`) to ``cuda``, ``triton``, ``cpu`` or
``torch`` and is differentiable."""
from .scaled_add import scaled_add

__all__ = ["scaled_add"]
