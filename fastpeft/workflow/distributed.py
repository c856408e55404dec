"""Scale-out helpers: DDP (and FSDP) under ``torchrun``.

* :func:`init_from_env` starts the process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA) and
  returns ``DistInfo(rank, world_size, local_rank)``.
* :func:`wrap_model` wraps in ``DistributedDataParallel`` -- which registers gradient hooks only for
  parameters with ``requires_grad``, so with an adapter only the trainable parameters (adapter + head)
  are all-reduced; the frozen base is never communicated after the initial broadcast -- or in
  ``FullyShardedDataParallel(use_orig_params=True)`` (needed with frozen and trainable parameters mixed).
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
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        kw = {"device_id": device} if device.type == "cuda" else {}
        return FSDP(model, use_orig_params=True, **kw)
    raise ValueError(f"distributed: expected 'ddp' or 'fsdp', got {kind!r}")


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
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return isinstance(model, FSDP)
    except ImportError:
        return False


def no_sync(model, skip: bool):
    """``model.no_sync()`` when ``skip`` and the model has it (DDP/FSDP), else a null context."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_params(model, enabled: bool):
    """Context in which an FSDP model's full (unsharded) parameters are visible on every rank."""
    if enabled and is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP.summon_full_params(model, writeback=True)
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
