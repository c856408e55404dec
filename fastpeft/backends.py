"""Per-op backend registry and dispatch.

Every op has implementations from the fixed set :data:`BACKENDS`, tried in this
order: ``cuda`` (compiled CUDA kernels in ``fastpeft._C``), ``triton`` (Triton
kernels, GPU; on CPU only through ``TRITON_INTERPRET=1`` and only when forced),
``cpu`` (compiled C++ kernels in ``fastpeft._C``) and ``torch`` (the pure-PyTorch
reference, always available).  Each implementation declares

* ``available()`` -> ``None`` or the reason it cannot run in this process, and
* ``supports(*args, **kwargs)`` -> ``None`` or the reason it cannot take these inputs.

The first backend that is available and supports the inputs runs.  Each op also
carries a builder of small example arguments (``Op.example_inputs(device, dtype)``),
which ``fastpeft info`` and the tests use to ask every backend whether it runs here,
and each implementation the dtypes it computes in (``Implementation.dtypes``).
The rules most ops share (the compiled extension or Triton present, tensors on the
backend's device and of its dtypes) are built by :mod:`fastpeft.ops._register`.

A backend can
be forced for all ops or per op, by the environment::

    FASTPEFT_BACKEND=torch                      # every op
    FASTPEFT_BACKEND=lora_linear=triton,cpu     # lora_linear forced to triton, others to cpu

or in code (takes precedence over the environment)::

    with fastpeft.use_backend("torch"): ...
    with fastpeft.use_backend("cpu", op="scaled_add"): ...

A forced backend that the op lacks, that is unavailable, or that does not
support the inputs raises :class:`BackendError` saying why; it never falls back.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")

Reason = Optional[str]


class BackendError(RuntimeError):
    """A forced backend cannot run the requested op on the given inputs."""


@dataclass
class Implementation:
    backend: str
    fn: Callable
    available: Callable[[], Reason]
    supports: Callable[..., Reason]
    dtypes: Optional[tuple[torch.dtype, ...]] = None   # what it computes in; None: not one tensor's dtype


@dataclass
class Op:
    """An op with one implementation per backend; calling it dispatches.

    ``example(device, dtype)`` builds small arguments of a call (tensors of ``dtype``
    where the op computes in it), deterministic random values; see :meth:`example_inputs`.
    """

    name: str
    impls: dict[str, Implementation] = field(default_factory=dict)
    example: Optional[Callable[[torch.device, torch.dtype], tuple]] = None

    def register(self, backend: str, *, available: Callable[[], Reason] = lambda: None,
                 supports: Callable[..., Reason] = lambda *a, **k: None,
                 dtypes: Optional[tuple[torch.dtype, ...]] = None) -> Callable:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Implementation(backend, fn, available, supports,
                                                 None if dtypes is None else tuple(dtypes))
            return fn

        return deco

    def example_inputs(self, device="cpu", dtype: torch.dtype = torch.float32) -> Optional[tuple]:
        """Small arguments of a call on ``device`` (built now; None if the op has no example)."""
        return None if self.example is None else self.example(torch.device(device), dtype)

    # -- selection ---------------------------------------------------------
    def _availability(self, backend: str) -> Reason:
        impl = self.impls.get(backend)
        if impl is None:
            return f"op '{self.name}' has no '{backend}' implementation"
        return _cached_availability(self.name, backend, impl.available)

    def select(self, *args, **kwargs) -> Implementation:
        """The implementation that would run for these inputs (see module doc)."""
        forced = forced_backend(self.name)
        if forced is not None:
            reason = self._availability(forced)
            if reason is None:
                reason = self.impls[forced].supports(*args, forced=True, **kwargs)
            if reason is not None:
                raise BackendError(
                    f"fastpeft: backend '{forced}' was forced for op '{self.name}' but cannot run it: {reason}")
            return self.impls[forced]
        for backend in BACKENDS:
            if backend in self.impls and self._availability(backend) is None \
                    and self.impls[backend].supports(*args, forced=False, **kwargs) is None:
                return self.impls[backend]
        raise BackendError(f"fastpeft: no backend of op '{self.name}' supports these inputs: "
                           + "; ".join(f"{b}: {self.why_not(b, *args, **kwargs)}" for b in self.impls))

    def why_not(self, backend: str, *args, **kwargs) -> Reason:
        """None if ``backend`` would accept these inputs, else the reason."""
        reason = self._availability(backend)
        if reason is None and (args or kwargs):
            reason = self.impls[backend].supports(*args, forced=True, **kwargs)
        return reason

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).fn(*args, **kwargs)


_REGISTRY: dict[str, Op] = {}
_AVAILABILITY: dict[tuple[str, str], Reason] = {}


def _cached_availability(op: str, backend: str, probe: Callable[[], Reason]) -> Reason:
    # No lock: probes are idempotent (two threads may both probe once), and a
    # lock here would stop torch.compile(fullgraph=True) when an op's first call
    # happens while Dynamo traces.
    key = (op, backend)
    if key not in _AVAILABILITY:
        if torch.compiler.is_compiling():
            # Probes import modules and read files, which Dynamo cannot trace: run
            # this one eagerly and let the trace treat its answer as a constant.
            _AVAILABILITY[key] = _probe_as_constant(op, backend)
        else:
            _AVAILABILITY[key] = _probe(probe)
    return _AVAILABILITY[key]


def _probe(probe: Callable[[], Reason]) -> Reason:
    try:
        return probe()
    except Exception as e:  # a probe must never break dispatch
        return f"availability check failed: {type(e).__name__}: {e}"


def _probe_as_constant(op: str, backend: str) -> Reason:
    return _probe(_REGISTRY[op].impls[backend].available)


# What torch.compiler.assume_constant_result does (Dynamo then calls the function eagerly
# and uses its result as a constant), set by hand: the decorator imports torch._dynamo,
# which would add ~2 s to `import fastpeft`.  Covered by
# tests/ops/test_scaled_add.py::test_first_call_inside_torch_compile_probes_availability.
_probe_as_constant._dynamo_marked_constant = True


def clear_availability_cache() -> None:
    """Forget cached availability (tests that change the environment use this)."""
    _AVAILABILITY.clear()


def define_op(name: str, *, example: Optional[Callable[[torch.device, torch.dtype], tuple]] = None) -> Op:
    """Create (once) and return the op called ``name``; ``example(device, dtype)`` builds
    small arguments of a call (see :class:`Op`)."""
    if name in _REGISTRY:
        raise ValueError(f"op '{name}' is already defined")
    op = _REGISTRY[name] = Op(name, example=example)
    return op


def get_op(name: str) -> Op:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op '{name}'; known ops: {sorted(_REGISTRY)}") from None


def all_ops() -> dict[str, Op]:
    return dict(_REGISTRY)


# -- forcing ---------------------------------------------------------------
# _FORCED[None] is the all-ops force; _FORCED[op] a per-op force.  Set from the
# environment at import and changed by use_backend(); read by select().
_ENV_FORCED: dict[Optional[str], str] = {}
_CTX_FORCED: list[tuple[Optional[str], str]] = []


def parse_backend_spec(spec: str) -> dict[Optional[str], str]:
    """Parse ``FASTPEFT_BACKEND``: ``name`` or ``op=name`` items, comma separated."""
    out: dict[Optional[str], str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, backend = item.rpartition("=")
        backend = backend.strip()
        if backend not in BACKENDS:
            raise ValueError(f"FASTPEFT_BACKEND: unknown backend {backend!r} in {spec!r}; "
                             f"expected one of {BACKENDS}, optionally as op=backend")
        out[op.strip() or None] = backend
    return out


def reload_env() -> None:
    """Re-read ``FASTPEFT_BACKEND`` (done at import)."""
    _ENV_FORCED.clear()
    _ENV_FORCED.update(parse_backend_spec(os.environ.get("FASTPEFT_BACKEND", "")))


def forced_backend(op: str) -> Optional[str]:
    """The backend forced for ``op`` (innermost use_backend first, then env), or None."""
    for scope, backend in reversed(_CTX_FORCED):
        if scope is None or scope == op:
            return backend
    return _ENV_FORCED.get(op, _ENV_FORCED.get(None))


@contextlib.contextmanager
def use_backend(backend: str, op: Optional[str] = None) -> Iterator[None]:
    """Force ``backend`` for every op (or only ``op``) inside the ``with`` block."""
    if backend not in BACKENDS:
        raise ValueError(f"use_backend: backend must be one of {BACKENDS}, got {backend!r}")
    if op is not None and op not in _REGISTRY:
        raise ValueError(f"use_backend: unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    _CTX_FORCED.append((op, backend))
    try:
        yield
    finally:
        _CTX_FORCED.pop()


try:
    reload_env()
except ValueError as _e:  # import must never fail: report and ignore the bad value
    import warnings

    warnings.warn(f"{_e}; ignoring it", stacklevel=1)
