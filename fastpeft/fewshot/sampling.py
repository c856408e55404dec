"""Stratified k-shot sampling: ``k`` examples of every class, chosen reproducibly from a seed.

Equivalent PyTorch of :func:`sample_k_shot` (classes in sorted order, one generator per call)::

    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        picked += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    order = torch.randperm(len(picked), generator=g).tolist()   # classes interleaved
    return [picked[j] for j in order]

The same ``(labels, k, seed)`` always gives the same indices, on every machine; different seeds give
(almost always) different shots. ``exclude`` removes indices from the pool first (e.g. a held-out split).
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Iterable, Sequence

import torch


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int >= 1 (examples per class), got {k!r}")
    if k < 1:
        raise ValueError(f"k: expected >= 1 (examples per class), got {k}")
    return k


def class_counts(labels: Sequence[Hashable]) -> dict:
    """``{label: count}`` in sorted label order."""
    return dict(sorted(Counter(labels).items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(label):
    try:
        return (0, float(label), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(label))


def sample_k_shot(labels: Sequence[Hashable], k: int, seed: int = 0, *,
                  exclude: Iterable[int] | None = None) -> list[int]:
    """Indices of ``k`` examples per class of ``labels`` (see module docstring).

    Raises ValueError naming ``k`` when ``k < 1`` or some class has fewer than ``k`` examples, and
    naming ``labels`` when there are fewer than two classes."""
    k = _check_k(k)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    labels = list(labels)
    skip = set(exclude or ())
    pool = [i for i in range(len(labels)) if i not in skip]
    by_class: dict = {}
    for i in pool:
        by_class.setdefault(labels[i], []).append(i)
    if len(by_class) < 2:
        raise ValueError(f"labels: k-shot sampling needs at least 2 classes, got {len(by_class)} "
                         f"({sorted(map(str, by_class))}) among {len(pool)} examples")
    classes = sorted(by_class, key=_sort_key)
    small = {str(c): len(by_class[c]) for c in classes if len(by_class[c]) < k}
    if small:
        raise ValueError(f"k={k}: larger than the number of examples of class(es) {small}; "
                         f"choose k <= {min(len(v) for v in by_class.values())}")
    g = torch.Generator()
    g.manual_seed(seed)
    picked: list[int] = []
    for c in classes:
        idx = by_class[c]
        picked += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    order = torch.randperm(len(picked), generator=g).tolist()
    return [picked[j] for j in order]


def k_shot_records(records: Sequence[dict], k: int, seed: int = 0, *, label_key: str = "label",
                   exclude: Iterable[int] | None = None) -> list[dict]:
    """The records chosen by :func:`sample_k_shot` on ``[r[label_key] for r in records]``."""
    try:
        labels = [r[label_key] for r in records]
    except KeyError:
        raise ValueError(f"label_key: records have no {label_key!r} field") from None
    return [records[i] for i in sample_k_shot(labels, k, seed, exclude=exclude)]
