"""Scale-out helpers: DDP (and FSDP) under ``torchrun``.

* :func:`init_from_env` starts the process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA) and
  returns ``DistInfo(rank, world_size, local_rank)``.
* :func:`wrap_model` wraps in ``DistributedDataParallel`` -- which registers gradient hooks only for
  parameters with ``requires_grad``, so with an adapter only the trainable parameters (adapter + head)
  are all-reduced; the frozen base is never communicated after the initial broadcast -- or shards it
  with FSDP2 (``torch.distributed.fsdp.fully_shard``, per-parameter DTensor sharding, which works on CPU
  with gloo and with frozen and trainable parameters mixed; FSDP1 refuses CPU-only machines).
* The trainer uses ``model.no_sync()`` on all but the last micro-batch of an accumulation group,
  logs / checkpoints on rank 0 only, and shards each global batch across ranks with
  :class:`fastpeft.workflow.data.BatchSampler` (``global_batch[rank::world_size]``, the split
  ``DistributedSampler`` makes), so N processes with per-rank batch B see the same global batches as
  one process with batch N*B and -- losses being means over equal-sized shards and DDP averaging
  gradients -- take the same optimizer steps (within float noise).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(backend: str | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def wrap_model(model: torch.nn.Module, kind: str, device: torch.device):
    kind = (kind or "ddp").lower()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if kind == "fsdp":
        # FSDP2 (per-parameter sharding, DTensor): runs on CPU/gloo too, and mixes frozen and trainable
        # parameters freely. Each block named in the model's _no_split_modules is its own shard unit.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        blocks = set(getattr(unwrap_base(model), "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model._fastpeft_fsdp = True
        return model
    raise ValueError(f"distributed: expected 'ddp' or 'fsdp', got {kind!r}")


def unwrap_base(model):
    """The transformers model under PEFT wrappers (for attributes like ``_no_split_modules``)."""
    for attr in ("get_base_model",):
        if hasattr(model, attr):
            try:
                return getattr(model, attr)()
            except Exception:
                pass
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP / FSDP wrapper (FSDP with use_orig_params keeps names)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP):
        return model.module
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if isinstance(model, FSDP):
            return model.module
    except ImportError:
        pass
    return model


def is_fsdp(model) -> bool:
    return bool(getattr(model, "_fastpeft_fsdp", False))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor (a collective); plain tensors unchanged."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out like ``param`` (sharded again when ``param`` is a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        return value
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value


@contextlib.contextmanager
def _fsdp2_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model, skip: bool):
    """Skip gradient reduction for this micro-batch when ``skip``: DDP ``no_sync()``, FSDP2
    ``set_requires_gradient_sync(False)``; a null context otherwise."""
    if skip and is_fsdp(model) and hasattr(model, "set_requires_gradient_sync"):
        return _fsdp2_no_sync(model)
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
