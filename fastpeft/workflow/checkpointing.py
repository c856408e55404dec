"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``checkpoint-<step>/`` holding

* ``adapter/`` -- the adapter in PEFT format (``save_pretrained``), for people;
* ``state.safetensors`` -- every tensor needed to resume exactly: trainable parameters (``model.*``),
  the best-so-far trainable parameters (``best.*``), optimiser state (``optim.<idx>.<key>``), the
  torch / CUDA / numpy RNG states (``rng.*``) and the loss scaler's tensors (``scaler.*``);
* ``state.json`` -- everything else: the run's position (the fields of the trainer's ``TrainState``: step,
  epoch, position in the epoch's batch order, best metric, patience counter, ...), scheduler, optimiser
  hyper-parameters and loss scaler, Python RNG state, log history.

The directory is written under a temporary name next to its destination and renamed into place
(``os.replace``), so a run killed mid-write leaves either the previous checkpoint or the complete new
one, never a torn one. Single files are written the same way (:func:`atomic_write`).
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch

from ..fileio import atomic_dir, atomic_write  # noqa: F401  (re-exported: ckpt.atomic_write)

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


# --------------------------------------------------------------------------- state (de)serialisation

def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    return obj


def _json_restore(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    return obj


def optimizer_to_flat(opt_state: dict) -> tuple[dict, dict]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, JSON-able rest)."""
    tensors, meta = {}, {"param_groups": _json_safe(opt_state["param_groups"]), "state": {}}
    for idx, st in opt_state["state"].items():
        m = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
                m[k] = "__tensor__"
            else:
                m[k] = _json_safe(v)
        meta["state"][str(idx)] = m
    return tensors, meta


def optimizer_from_flat(tensors: dict, meta: dict) -> dict:
    state = {}
    for idx, m in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"optim.{idx}.{k}"] if v == "__tensor__" else v) for k, v in m.items()}
    return {"state": state, "param_groups": _json_restore(meta["param_groups"])}


def rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"python": _json_safe(random.getstate())}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy as np
        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


def save_checkpoint(path: str, *, tensors: dict, meta: dict, save_adapter=None) -> str:
    """Write ``tensors`` (name -> CPU tensor) and ``meta`` (JSON-able) atomically into directory ``path``;
    ``save_adapter(dir)`` (optional) writes the human-facing adapter into ``path/adapter``."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, STATE_TENSORS))
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(_json_safe(meta), f, indent=1)
        if save_adapter is not None:
            save_adapter(os.path.join(tmp, "adapter"))
    return path


def load_checkpoint(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    js, st = os.path.join(path, STATE_JSON), os.path.join(path, STATE_TENSORS)
    if not (os.path.isfile(js) and os.path.isfile(st)):
        raise FileNotFoundError(f"resume_from: {path!r} is not a checkpoint directory "
                                f"(expected {STATE_JSON} and {STATE_TENSORS})")
    with open(js) as f:
        meta = _json_restore(json.load(f))
    return load_file(st), meta


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` directory with the highest step in ``output_dir`` (or None)."""
    if not os.path.isdir(output_dir):
        return None
    best, best_step = None, -1
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[11:].isdigit():
            p = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(p, STATE_JSON)) and int(name[11:]) > best_step:
                best, best_step = p, int(name[11:])
    return best


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-<step>`` directories."""
    steps = sorted(int(n[11:]) for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[11:].isdigit())
    for s in steps[:-keep] if keep > 0 else steps:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{s}"), ignore_errors=True)
