"""Atomic file writes: the one place fastpeft writes files that must never be half-written.

Every writer goes through a temporary name next to its destination, is flushed and fsynced, and is then
renamed onto the destination with ``os.replace`` (atomic on POSIX and Windows), so a crash or a kill leaves
either the old file or the complete new one.  Temporary names are hidden and recognisable
(``.<name>.<random>.tmp``; directories being replaced are parked as ``.<name>.<random>.old``), so
:func:`stale_temporaries` can find what a killed process left behind.

Depends on the standard library only (a leaf module: core and applications both use it).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _tmp_prefix(path: str) -> str:
    return "." + os.path.basename(os.path.normpath(path)) + "."


def _parent(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return d


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = None) -> Iterator:
    """Open a temporary file next to ``path`` (``mode`` ``"w"`` for text, ``"wb"`` for bytes); when the
    ``with`` block ends without an exception, fsync it and rename it onto ``path``.  On an exception the
    temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=_parent(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def json_default(o: Any):
    """``json.dump``'s ``default`` for the values fastpeft writes: tensors / numpy scalars and arrays
    (``.item()`` / ``.tolist()``), sets and tuples, enums; anything else as ``str``."""
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


def write_json_atomic(path: str, obj: Any, *, indent: int = 1, default: Optional[Callable] = json_default,
                      allow_nan: bool = True, sort_keys: bool = False) -> str:
    """``json.dump(obj)`` to ``path`` atomically, with a final newline; returns ``path``."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, default=default, allow_nan=allow_nan, sort_keys=sort_keys)
        f.write("\n")
    return path


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; when the ``with`` block succeeds, replace ``path``
    with it in one rename (an existing ``path`` is parked under a temporary name first and deleted after
    the new one is in place, so at every instant either the old or the new complete directory exists
    under ``path``, except between the two renames, where the old one is still on disk).  On an exception
    the temporary directory is removed and ``path`` is untouched."""
    parent = _parent(path)
    restore_parked_dir(path)   # a process killed between the two renames left only the parked one
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=parent)
    try:
        yield tmp
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=OLD_SUFFIX, dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the old one back
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parked_target(entry: str) -> Optional[str]:
    """The directory name a parked ``.<name>.<random>.old`` entry of :func:`atomic_dir` was, or None."""
    if not (entry.startswith(".") and entry.endswith(OLD_SUFFIX)):
        return None
    name, sep, _ = entry[1:-len(OLD_SUFFIX)].rpartition(".")
    return name if sep and name else None


def restore_parked_dir(path: str) -> bool:
    """Put back the directory :func:`atomic_dir` parked for ``path`` when ``path`` itself is missing:
    what a process killed between parking the old directory and renaming the new one in leaves
    (the old, complete directory under a hidden ``.old`` name).  Returns whether one was restored;
    with several parked copies the newest is restored."""
    if os.path.lexists(path):
        return False
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(parent):
        return False
    parked = [os.path.join(parent, e) for e in os.listdir(parent) if _parked_target(e) == name]
    parked = [p for p in parked if os.path.isdir(p) and not os.path.islink(p)]
    if not parked:
        return False
    os.replace(max(parked, key=os.path.getmtime), path)
    return True


def restore_parked_dirs(directory: str) -> list[str]:
    """:func:`restore_parked_dir` for every parked directory in ``directory``; returns the restored paths."""
    if not os.path.isdir(directory):
        return []
    targets = {t for t in map(_parked_target, os.listdir(directory)) if t is not None}
    return [p for p in (os.path.join(directory, t) for t in sorted(targets)) if restore_parked_dir(p)]


def stale_temporaries(directory: str, name: Optional[str] = None) -> list[str]:
    """Paths of temporary files/directories that :func:`atomic_write` / :func:`atomic_dir` left in
    ``directory`` (only those made for ``name`` when given): what a killed process leaves behind."""
    if not os.path.isdir(directory):
        return []
    prefix = "." + name + "." if name is not None else "."
    return sorted(os.path.join(directory, e) for e in os.listdir(directory)
                  if e.startswith(prefix) and (e.endswith(TMP_SUFFIX) or e.endswith(OLD_SUFFIX)))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "write_json_atomic",
           "json_default", "stale_temporaries", "restore_parked_dir",
           "restore_parked_dirs"]
