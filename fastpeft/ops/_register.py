"""The registration every op repeats, written once: one helper per kind.

An op package ``fastpeft/ops/foo/`` registers, in its ``__init__.py``:

* its dispatching op, ``OP = define_op("foo", example=_example)`` (:mod:`fastpeft.backends`), with a
  builder of small example arguments ``_example(device, dtype)`` (``fastpeft info`` and the tests
  ask each backend about them; :func:`random_tensors` makes them);
* the C++ ops of ``csrc/foo/foo_binding.cpp``: :func:`compiled_op` registers their fake (output
  shapes, for opcheck and ``torch.compile``) and, if differentiable, their autograd, when the
  extension defines them;
* the Triton launchers: :func:`triton_op` turns an annotated wrapper into
  ``torch.library.custom_op("fastpeft::<name>")`` with its fake and autograd;
* one line per backend: :func:`register_backend`, with the common availability rule (the
  extension has the C++ ops, Triton can run) and the common ``supports`` rule (a tensor argument
  on the backend's device, of its dtypes, plus an op-specific check).

A forward/backward pair (a forward op that returns what backward needs, a backward op) is two
calls: the backward op with its fake, then the forward with ``backward=`` a function that calls
the backward op.  An inference-only op passes no ``backward``; an op without a CUDA kernel
registers no ``cuda`` backend; non-tensor arguments are plain annotated parameters
(``float``, ``int``, ``bool``, ``str``, ``Optional[...]``, ``list[...]``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import _ext, _triton
from ..backends import Op, Reason
from ._checks import device_reason, dtype_reason

Check = Callable[..., Reason]   # check(*args, forced=...) -> None or why not


def has_compiled(*names: str) -> bool:
    """Whether the loaded extension defines ``torch.ops.fastpeft.<name>`` for every name."""
    return _ext.load() is not None and all(hasattr(torch.ops.fastpeft, n) for n in names)


def _describe(op, fake: Callable, backward: Optional[Callable], setup_context: Optional[Callable]) -> None:
    torch.library.register_fake(op, fake)
    if backward is not None:
        torch.library.register_autograd(op, backward, setup_context=setup_context)


def compiled_op(name: str, *, fake: Callable, backward: Optional[Callable] = None,
                setup_context: Optional[Callable] = None) -> None:
    """Register the fake (and, with ``backward``, the autograd) of the C++ op
    ``torch.ops.fastpeft.<name>`` (schema in its ``TORCH_LIBRARY_FRAGMENT``), if the extension
    defines it; without the extension nothing is registered and the cpu/cuda backends report why."""
    if has_compiled(name):
        _describe(f"fastpeft::{name}", fake, backward, setup_context)


def triton_op(name: str, *, fake: Callable, backward: Optional[Callable] = None,
              setup_context: Optional[Callable] = None, mutates_args: Sequence[str] = ()):
    """Decorator: the wrapped function (its annotations are the schema; it imports the Triton
    launcher lazily and calls it) becomes the custom op ``torch.ops.fastpeft.<name>`` with its
    fake and, with ``backward``, its autograd.  ``custom_op`` + ``register_fake`` rather than
    ``triton_op``, which fails opcheck's fake-tensor test and ``torch.compile`` under the
    CPU interpreter.

    Returns an :class:`EagerOp`: traced code (``torch.compile``, export, fake tensors) calls the custom
    op; eager code calls the function itself (through a ``torch.autograd.Function`` built from the same
    ``setup_context`` / ``backward`` when autograd records the call), skipping the custom op's Python
    dispatch, which costs about 0.5-1 ms per call on a GPU host (measured on the H200 run of
    2026-12-04: ``benchmarks/tools/profile_overhead.py``) -- more than the kernels of a LoRA layer."""
    def deco(fn: Callable):
        op = torch.library.custom_op(f"fastpeft::{name}", fn, mutates_args=tuple(mutates_args))
        _describe(op, fake, backward, setup_context)
        return EagerOp(name, op, fn, backward, setup_context)

    return deco


def _no_setup(ctx, inputs, output) -> None:
    pass


class EagerOp:
    """A custom op and the eager path to the same function (see :func:`triton_op`).

    ``op`` is the ``torch.library`` custom op (what ``torch.ops.fastpeft.<name>`` is); calling the
    ``EagerOp`` picks: the op when the call is traced (``torch.compiler.is_compiling()``, or any tensor
    argument is a tensor subclass such as a fake or functional tensor), else ``fn`` directly -- wrapped
    in an ``autograd.Function`` with the op's ``setup_context`` / ``backward`` when the op is
    differentiable, grad mode is on and a tensor argument requires grad.  Both paths run the same
    function and the same backward, so they give identical results."""

    def __init__(self, name: str, op, fn: Callable, backward: Optional[Callable],
                 setup_context: Optional[Callable]):
        self.op = op
        self._fn = fn
        self._function = None
        if backward is not None:
            self._function = type(f"{name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(fn),
                "setup_context": staticmethod(setup_context or _no_setup),
                "backward": staticmethod(backward),
            })

    def __call__(self, *args, **kwargs):
        if kwargs:  # autograd.Function.apply takes positional arguments only
            args = _bind(self._fn, args, kwargs)
        if _traced(args):
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and _any_requires_grad(args):
            return self._function.apply(*args)
        return self._fn(*args)

    def __getattr__(self, attr):  # register_fake, register_autograd, _opoverload, ... of the custom op
        return getattr(self.op, attr)


def _bind(fn: Callable, args: tuple, kwargs: dict) -> tuple:
    import inspect
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced(args) -> bool:
    if torch.compiler.is_compiling():
        return True
    return any(type(t) not in _PLAIN for t in _tensors(args))


def _any_requires_grad(args) -> bool:
    return any(t.requires_grad for t in _tensors(args))


def compiled_available(backend: str, *names: str) -> Callable[[], Reason]:
    """``available()`` of a cpu/cuda backend calling ``torch.ops.fastpeft.<names>``."""
    probe = {"cpu": _ext.cpu_available, "cuda": _ext.cuda_available}[backend]

    def available() -> Reason:
        reason = probe()
        missing = [n for n in names if not hasattr(torch.ops.fastpeft, n)]
        if reason is None and missing:
            reason = f"fastpeft._C was built without {', '.join(missing)} (rebuild the extension)"
        return reason

    return available


def device_rule(backend: str, dtypes: Optional[Sequence[torch.dtype]] = None, *, arg: int = 0,
                also: Optional[Check] = None) -> Check:
    """``supports(*args, forced)``: ``args[arg]`` is on the backend's device (cpu, cuda; triton:
    CUDA, or CPU in the interpreter when forced) and, with ``dtypes``, of one of them; then
    ``also(*args, forced=forced)``.  The torch backend has no device or dtype rule."""
    what = f"{backend} backend"
    if backend == "torch" and dtypes is None:
        return also if also is not None else (lambda *args, forced, **kwargs: None)

    def supports(*args, forced: bool, **kwargs) -> Reason:
        t = args[arg]
        if backend == "triton":
            reason = _triton.supports_device(t.device, forced)
        elif backend in ("cpu", "cuda"):
            reason = device_reason(t, backend, what)
        else:
            reason = None
        if reason is None and dtypes is not None:
            reason = dtype_reason(t, dtypes, what)
        if reason is None and also is not None:
            reason = also(*args, forced=forced, **kwargs)
        return reason

    return supports


def register_backend(op: Op, backend: str, *, dtypes: Optional[Sequence[torch.dtype]] = None, arg: int = 0,
                     also: Optional[Check] = None, needs: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``op``'s ``backend`` implementation with the common rules:
    available when the extension defines the C++ ops ``needs`` (cpu, cuda) or Triton can run
    (triton), always (torch); supports what :func:`device_rule` accepts.  ``dtypes`` are also
    recorded on the implementation (the tests' dtype lists)."""
    if backend == "torch":
        available: Callable[[], Reason] = lambda: None  # noqa: E731
    elif backend == "triton":
        available = _triton.available
    else:
        available = compiled_available(backend, *needs)
    supports = device_rule(backend, dtypes, arg=arg, also=also)
    return op.register(backend, available=available, supports=supports, dtypes=dtypes)


def random_tensors(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Callable[..., torch.Tensor]:
    """``randn(*shape, scale=1.0)``: deterministic normal tensors of ``dtype`` on ``device``
    (drawn on the CPU, so every device gets the same values), for example inputs."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return randn
