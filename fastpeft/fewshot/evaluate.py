"""Multi-seed few-shot evaluation: for each seed, draw the k-shot set, fit a method on it, score it on
a fixed evaluation set; report per-seed metrics and mean +- std.

Equivalent plain Python of :func:`evaluate_seeds`::

    for seed in seeds:
        idx = sample_k_shot(train_labels, k, seed)                    # fastpeft.fewshot.sampling
        clf = make_classifier(method, **params).fit([train_texts[i] for i in idx],
                                                    [train_labels[i] for i in idx], seed=seed)
        acc[seed] = mean(p == t for p, t in zip(clf.predict(eval_texts), eval_labels))
    mean, std = statistics.mean(acc.values()), statistics.stdev(acc.values())   # std: n - 1 (0 for one seed)

Every method sees exactly the same shots for a given seed, so methods compare seed by seed.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Hashable, Sequence

from ..workflow.metrics import accuracy
from .sampling import sample_k_shot

METHODS = ("setfit", "head_only", "prototype", "prompt_tuning")


def make_classifier(method: str, **params):
    """A fresh classifier for ``method`` (one of :data:`METHODS`); ``params`` go to its constructor."""
    if method == "setfit":
        from .setfit import SetFitClassifier
        return SetFitClassifier(**params)
    if method == "head_only":
        from .baselines import HeadOnlyClassifier
        return HeadOnlyClassifier(**params)
    if method == "prototype":
        from .baselines import PrototypeClassifier
        return PrototypeClassifier(**params)
    if method == "prompt_tuning":
        from .baselines import PromptTuningClassifier
        return PromptTuningClassifier(**params)
    raise ValueError(f"method: unknown few-shot method {method!r}; expected one of {list(METHODS)}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: expected at least one value")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"seeds: expected ints, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: duplicates in {seeds}")
    return seeds


def summarize_seeds(per_seed: list[dict], metric: str = "accuracy") -> dict:
    """``{"per_seed": per_seed, "mean": m, "std": s}`` over ``per_seed[i][metric]``."""
    m, s = mean_std([r[metric] for r in per_seed])
    return {"metric": metric, "per_seed": per_seed, "mean": m, "std": s}


def evaluate_seeds(method: str | Callable[[], object], train_texts: Sequence[str],
                   train_labels: Sequence[Hashable], eval_texts: Sequence[str], eval_labels: Sequence[Hashable],
                   *, k: int, seeds: Sequence[int] = (0, 1, 2, 3, 4), exclude=None, params: dict | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run ``method`` (a name from :data:`METHODS`, or a zero-argument factory of an object with
    ``fit(texts, labels, seed)`` / ``predict(texts)``) on the k-shot set of every seed.

    Returns ``{"method", "k", "metric": "accuracy", "per_seed": [{"seed", "accuracy", "fit_s",
    "predict_s", "shots"}], "mean", "std"}`` (``shots``: indices into the training texts)."""
    seeds = _check_seeds(seeds)
    train_texts, train_labels = list(train_texts), list(train_labels)
    eval_texts, eval_labels = list(eval_texts), list(eval_labels)
    if len(train_texts) != len(train_labels):
        raise ValueError(f"train_labels: expected {len(train_texts)} labels, got {len(train_labels)}")
    if len(eval_texts) != len(eval_labels):
        raise ValueError(f"eval_labels: expected {len(eval_texts)} labels, got {len(eval_labels)}")
    if not eval_texts:
        raise ValueError("eval_texts: the evaluation set is empty")
    unknown = sorted(set(map(str, eval_labels)) - set(map(str, train_labels)))
    if unknown:
        raise ValueError(f"eval_labels: label(s) {unknown} never occur in the training data")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method: unknown few-shot method {method!r}; expected one of {list(METHODS)}")
        factory = lambda: make_classifier(method, **(params or {}))  # noqa: E731
        name = method
    elif callable(method):
        factory, name = method, getattr(method, "__name__", "custom")
    else:
        raise ValueError(f"method: expected a method name {list(METHODS)} or a factory, got {method!r}")
    per_seed = []
    for seed in seeds:
        idx = sample_k_shot(train_labels, k, seed, exclude=exclude)
        t0 = time.perf_counter()
        clf = factory().fit([train_texts[i] for i in idx], [train_labels[i] for i in idx], seed=seed)
        t1 = time.perf_counter()
        pred = clf.predict(eval_texts)
        t2 = time.perf_counter()
        rec = {"seed": seed, "accuracy": accuracy(pred, eval_labels), "fit_s": round(t1 - t0, 2),
               "predict_s": round(t2 - t1, 2), "shots": idx}
        per_seed.append(rec)
        if log:
            log(f"[fewshot] {name} seed={seed} k={k} accuracy={rec['accuracy']:.4f} "
                f"(fit {rec['fit_s']}s, predict {rec['predict_s']}s)")
    out = {"method": name, "k": k}
    out.update(summarize_seeds(per_seed))
    return out
