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

import contextlib
import json
import os
import random
import shutil

import torch

from ..fileio import atomic_dir, atomic_write, restore_parked_dirs, stale_temporaries  # noqa: F401  (re-exported: ckpt.atomic_write)

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
#: written next to every adapter the workflow saves: task, labels, base model, data columns
TASK_FILE = "fastpeft_task.json"
#: what makes an output directory "hold a run" (besides checkpoint-<step>/ and a non-empty metrics.jsonl)
RUN_OUTPUTS = ("adapter", "result.json")


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


REQUIRED_META = ("optimizer", "scheduler", "rng", "step")


def load_checkpoint(path: str, required: tuple = ()) -> tuple[dict, dict]:
    """(tensors, meta) of checkpoint directory ``path``; a missing, truncated or corrupt file, or a meta without
    the ``required`` keys (the trainer's: :data:`REQUIRED_META`), is a ``ValueError``
    (``FileNotFoundError`` for a directory that is no checkpoint) naming the file."""
    from ..checkpoint import load_safetensors

    js, st = os.path.join(path, STATE_JSON), os.path.join(path, STATE_TENSORS)
    if not (os.path.isfile(js) and os.path.isfile(st)):
        raise FileNotFoundError(f"resume_from: {path!r} is not a checkpoint directory "
                                f"(expected {STATE_JSON} and {STATE_TENSORS})")
    try:
        with open(js, encoding="utf-8") as f:
            meta = _json_restore(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{js}: corrupt or truncated checkpoint file ({e})") from None
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise ValueError(f"{js}: not a complete checkpoint state (expected the keys {list(required)})")
    return load_safetensors(st), meta


def checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` directories of ``output_dir``, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(n[11:]), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n[11:].isdigit() and os.path.isdir(os.path.join(output_dir, n))]
    return [p for _, p in sorted(found, reverse=True)]


def run_outputs(output_dir: str) -> list[str]:
    """What in ``output_dir`` belongs to a training run (so that another run must not start there): the
    adapter, result.json, checkpoints, a non-empty metrics.jsonl."""
    if not os.path.isdir(output_dir):
        return []
    out = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, n))]
    out += [os.path.basename(p) + "/" for p in checkpoints(output_dir)]
    log = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        out.append("metrics.jsonl")
    return out


def check_output_dir(output_dir: str, *, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Refuse an ``output_dir`` that is a file, or that holds another run unless the run resumes it or
    ``overwrite`` says to replace it; returns what the directory holds (:func:`run_outputs`)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir: {output_dir!r} is a file, not a directory")
    held = run_outputs(output_dir)
    if held and not resume and not overwrite:
        raise ValueError(f"output_dir: {output_dir!r} already holds a run ({', '.join(held[:4])}); continue it "
                         f"with --resume-from latest, write elsewhere (--output-dir), or replace it with "
                         f"--overwrite (trainer.overwrite: true)")
    return held


def clear_run(output_dir: str) -> None:
    """Delete a previous run's outputs from ``output_dir`` (``trainer.overwrite``)."""
    for n in ("adapter", "result.json", "curves.png", "metrics.jsonl"):
        p = os.path.join(output_dir, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    for p in checkpoints(output_dir):
        shutil.rmtree(p)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the hidden temporary files / directories a killed writer left in ``directory`` (see
    :func:`fastpeft.fileio.stale_temporaries`); returns what was removed.  A parked old directory
    whose own directory is missing (a kill between :func:`atomic_dir`'s two renames) is put back
    under its name instead of deleted."""
    restore_parked_dirs(directory)
    removed = stale_temporaries(directory)
    for p in removed:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return removed


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
