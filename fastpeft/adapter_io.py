"""Safety rules of adapter files, shared by ``PeftModel.save_pretrained`` / ``from_pretrained`` and the
state-dict functions.

* :func:`check_adapter_name` -- an adapter name is one path component: ``save_pretrained`` writes adapter
  ``name`` into ``save_directory/name``, so a name with a path separator, ``..`` or an absolute path would
  write outside the directory.
* :func:`replace_adapter_dir` -- ``save_pretrained`` builds the whole new directory next to the old one
  and puts it in place with one rename (:func:`fastpeft.fileio.atomic_dir`): a failure at any point leaves
  the previous adapter complete, never new weights beside an old config.  Files of the old directory that
  the save does not write (a tokenizer, ``fastpeft_task.json``, other adapters) are carried over.
* :func:`check_adapter_tensors` -- loaded tensors must be floating point (an int32 tensor would be cast to
  float silently) and finite (NaN / inf weights are an error unless ``allow_nonfinite=True``, which warns).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Iterator

import torch

from .fileio import atomic_dir


def check_adapter_name(name, what: str = "adapter_name") -> str:
    """``name`` if it is a valid adapter name, else ValueError naming ``what``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: expected a non-empty str, got {name!r}")
    if name == "__base__":
        raise ValueError(f"{what}: '__base__' is reserved (it names the base model alone in the adapter_names "
                         "of a mixed-adapter batch)")
    bad = [c for c in ("/", "\\", os.sep, os.altsep or "/", "\0") if c in name]
    if bad or os.path.isabs(name) or name in (".", "..") or "." in name:
        raise ValueError(f"{what}: {name!r} is not a valid adapter name: it must be one path component without "
                         "dots or path separators (save_pretrained writes adapter <name> to save_directory/<name>)")
    return name


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the old file stays intact: new files replace the link, never write through it
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def replace_adapter_dir(save_directory: str) -> Iterator[str]:
    """Yield a temporary directory holding a copy (hard links) of ``save_directory``'s current content; when
    the block succeeds, it replaces ``save_directory`` in one rename.  Files written into the temporary
    directory must be new files (``fastpeft.fileio`` writers replace, never modify in place)."""
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.isfile(target):
        raise ValueError(f"save_directory: {save_directory!r} is a file, expected a directory")
    cwd = os.path.realpath(os.getcwd())
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise ValueError(f"save_directory: {save_directory!r} is (or contains) the current working directory; "
                         "fastpeft replaces the adapter directory as a whole in one rename, which cannot be done to "
                         "the directory a process is in: save into a subdirectory")
    with atomic_dir(target) as tmp:
        if os.path.isdir(target):
            shutil.copytree(target, tmp, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)
        yield tmp


def check_adapter_tensors(state: dict, where: str, allow_nonfinite: bool = False) -> None:
    """Refuse non-floating tensors; refuse (or, with ``allow_nonfinite``, warn about) NaN / inf values."""
    bad_dtype = [f"{k} ({v.dtype})" for k, v in state.items()
                 if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad_dtype:
        raise ValueError(f"{where}: adapter tensors must be floating point; {bad_dtype[:10]} are not (a corrupt or "
                         "foreign file: loading would cast them to float)")
    nonfinite = [k for k, v in state.items() if v.numel() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        msg = f"{where}: NaN or inf values in {nonfinite[:10]}{' ...' if len(nonfinite) > 10 else ''}"
        if not allow_nonfinite:
            raise ValueError(msg + " (a diverged or corrupt adapter; pass allow_nonfinite=True to load it anyway)")
        warnings.warn(msg + " (loaded because allow_nonfinite=True)", stacklevel=3)


__all__ = ["check_adapter_name", "replace_adapter_dir", "check_adapter_tensors"]
