"""Adapter checkpoint files: safetensors only by default, written atomically.

* :func:`atomic_write_bytes` / :func:`save_safetensors` write to a temporary file
  in the target directory, fsync it and ``os.replace`` it over the target, so a
  crash never leaves a half-written checkpoint under the real name.
* :func:`load_safetensors` turns a corrupt or truncated file into a ``ValueError``
  that names the file.
* :func:`load_adapter_weights` finds ``adapter_model.safetensors`` (HF PEFT's name)
  in a directory; a pickle ``adapter_model.bin`` is refused unless the caller passes
  ``allow_pickle=True`` (it is then read with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

import torch

from .fileio import atomic_write_bytes

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` (str -> Tensor) as safetensors at ``path``, atomically."""
    from safetensors.torch import save
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_safetensors: value of {k!r} is {type(v).__name__}, expected a Tensor")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # tied / shared storages are not allowed by safetensors: give every tensor its own
    seen = set()
    for k, v in clean.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            clean[k] = v.clone()
        seen.add(key)
    atomic_write_bytes(path, save(clean, metadata=metadata or {"format": "pt"}))


def _check_header(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, "
                             f"file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors file (bad entry for {k!r})") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                         f"the file has {size}")


def load_safetensors(path: str, device: str = "cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights: no file {path!r}")
    _check_header(path)
    from safetensors.torch import load_file
    try:
        return load_file(path, device=device)
    except Exception as e:
        raise ValueError(f"{path}: cannot read safetensors file: {e}") from None


def load_adapter_weights(path: str, allow_pickle: bool = False, device: str = "cpu") -> dict:
    """The on-disk state dict of an adapter directory (or a weights file)."""
    if os.path.isdir(path):
        st = os.path.join(path, SAFETENSORS_NAME)
        pk = os.path.join(path, PICKLE_NAME)
        if os.path.isfile(st):
            return load_safetensors(st, device)
        if os.path.isfile(pk):
            path = pk
        else:
            raise FileNotFoundError(f"adapter weights: neither {SAFETENSORS_NAME} nor {PICKLE_NAME} in {path!r}")
    if path.endswith(".safetensors"):
        return load_safetensors(path, device)
    if not allow_pickle:
        raise ValueError(f"{path}: refusing to load a pickle (non-safetensors) adapter file; pickles can run "
                         "arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you trust it.")
    try:
        sd = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read pickle adapter file: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return sd


__all__ = ["atomic_write_bytes", "save_safetensors", "load_safetensors", "load_adapter_weights",
           "SAFETENSORS_NAME", "PICKLE_NAME"]
