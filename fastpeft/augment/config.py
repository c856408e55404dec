"""The ``augment:`` section of a ``fastpeft finetune`` config -> trainer callbacks (+ loss).

::

    augment:
      - {name: embedding_substitution, p: 0.5, rate: 0.15, k: 8}
      - {name: random_deletion, p: 0.2, rate: 0.1}
      - {name: neftune, alpha: 5}
      - {name: mixup, alpha: 0.4}

``callbacks_from_config(spec, model=..., tokenizer=..., task=...)`` returns ``(callbacks, loss_fn)``:
pass them as ``Trainer(..., callbacks=callbacks, loss_fn=loss_fn)``. ``loss_fn`` is ``None`` unless
``mixup`` is in the list (its soft-label cross-entropy). Names and keys (every key but ``name`` goes to
the class's constructor; ``seed`` defaults to ``seed + i``):

=========================  ===============================  =============================================
name                       class                            keys
=========================  ===============================  =============================================
random_swap                text.RandomSwap                  p, rate, seed, special_ids
random_deletion            text.RandomDeletion              p, rate, seed, special_ids
random_insertion           text.RandomInsertion             p, rate, seed, special_ids, max_length,
                                                            neighbours_k (insert embedding neighbours)
token_masking              text.TokenMasking                p, rate, seed, special_ids, mask_id
embedding_substitution     text.EmbeddingSubstitution       p, rate, seed, special_ids, k, min_similarity
neftune                    embedding.NEFTune                alpha, distribution, seed
mixup                      embedding.EmbeddingMixup         alpha, p, seed
random_crop                image.RandomCrop                 padding, size, padding_mode, fill, p, seed, key
horizontal_flip            image.HorizontalFlip             p, seed, key
gaussian_noise             image.GaussianNoise              std, clip, p, seed, key
cutout                     image.Cutout                     size, holes, fill, p, seed, key
=========================  ===============================  =============================================

Order: the callbacks run in the listed order, except that ``mixup`` always runs last (it mixes whole
examples and widens the attention mask, which the token-level ops must see unmixed). Errors are
``ValueError`` naming the entry: ``augment[2].name: unknown augmentation 'foo'; expected one of ...``,
``augment[0].p: expected a number in [0, 1], got 1.5``, ``augment[1]: random_swap cannot keep per-token
labels aligned for task token_classification``. The GAN (:mod:`fastpeft.augment.gan`) trains a head on
pooled features, outside the trainer loop, and has no entry here.
"""
from __future__ import annotations

from . import embedding as E
from . import image as I
from . import text as T

__all__ = ["callbacks_from_config", "AUGMENTATIONS"]

AUGMENTATIONS = {**T.TEXT_OPS, **E.EMBEDDING_OPS, **I.IMAGE_OPS}

_TEXT_KEYS = {"p", "rate", "seed", "special_ids"}
KEYS = {
    "random_swap": _TEXT_KEYS,
    "random_deletion": _TEXT_KEYS,
    "random_insertion": _TEXT_KEYS | {"max_length", "neighbours_k"},
    "token_masking": _TEXT_KEYS | {"mask_id"},
    "embedding_substitution": _TEXT_KEYS | {"k", "min_similarity"},
    "neftune": {"alpha", "distribution", "seed"},
    "mixup": {"alpha", "p", "seed"},
    "random_crop": {"padding", "size", "padding_mode", "fill", "p", "seed", "key"},
    "horizontal_flip": {"p", "seed", "key"},
    "gaussian_noise": {"std", "clip", "p", "seed", "key"},
    "cutout": {"size", "holes", "fill", "p", "seed", "key"},
}
# ops that move tokens: impossible with per-token labels
_MOVES_TOKENS = {"random_swap", "random_deletion", "random_insertion"}
_TOKEN_LABEL_TASKS = {"token_classification", "ner", "token_cls", "causal_lm", "lm", "clm"}
_CLASSIFICATION_TASKS = {"sequence_classification", "seq_cls", "classification"}


def _task_name(task) -> str | None:
    if task is None:
        return None
    if isinstance(task, str):
        return task
    return getattr(task, "name", None)


def callbacks_from_config(spec, *, model=None, tokenizer=None, task=None, seed: int = 0):
    """``(callbacks: list, loss_fn or None)`` for the ``augment:`` section ``spec`` (a list of mappings,
    each with ``name``; ``None`` or ``[]``: no augmentation). ``model`` is needed by
    ``embedding_substitution`` (its input-embedding matrix) and ``random_insertion`` with
    ``neighbours_k``; ``tokenizer`` gives special tokens / mask / pad ids to the text ops (else they take
    the trainer's at ``on_train_begin``); ``task`` (a Task or its name) lets bad combinations fail here
    instead of at the first batch. ``seed``: default seed of entry ``i`` is ``seed + i``."""
    if spec is None:
        return [], None
    if isinstance(spec, dict):
        raise ValueError("augment: expected a list of mappings like [{name: mixup, alpha: 0.4}], got a mapping "
                         "(write each augmentation as a list item)")
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"augment: expected a list of mappings, got {type(spec).__name__}")
    tname = _task_name(task)
    callbacks, mixups = [], []
    loss_fn = None
    for i, entry in enumerate(spec):
        where = f"augment[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with a 'name' key, got {entry!r}")
        if "name" not in entry:
            raise ValueError(f"{where}.name: missing; expected one of {sorted(AUGMENTATIONS)}")
        name = entry["name"]
        if name not in AUGMENTATIONS:
            raise ValueError(f"{where}.name: unknown augmentation {name!r}; expected one of {sorted(AUGMENTATIONS)}")
        kw = {k: v for k, v in entry.items() if k != "name"}
        unknown = sorted(set(kw) - KEYS[name])
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key for {name}; expected some of {sorted(KEYS[name])}")
        if name in _MOVES_TOKENS and tname in _TOKEN_LABEL_TASKS:
            raise ValueError(f"{where}.name: {name} cannot keep per-token labels aligned for task {tname!r}; "
                             f"use token_masking or embedding_substitution")
        if name == "mixup" and tname is not None and tname not in _CLASSIFICATION_TASKS:
            raise ValueError(f"{where}.name: mixup needs one class label per example (sequence_classification), "
                             f"not task {tname!r}")
        kw.setdefault("seed", seed + i)
        try:
            op = _build(name, kw, model, tokenizer)
        except ValueError as e:
            msg = str(e)
            key = msg.split(":", 1)[0]
            raise ValueError(f"{where}.{msg}" if key in kw or key in ("model", "tokenizer", "k") else
                             f"{where} ({name}): {msg}") from None
        if name == "mixup":
            mixups.append(op)
            loss_fn = op.loss_fn
        else:
            callbacks.append(op)
    if len(mixups) > 1:
        raise ValueError("augment: mixup is listed more than once (one mixup per run)")
    return callbacks + mixups, loss_fn


def _build(name, kw, model, tokenizer):
    cls = AUGMENTATIONS[name]
    kw = dict(kw)
    if name == "embedding_substitution":
        return cls(model, tokenizer, **kw)
    if name == "random_insertion" and "neighbours_k" in kw:
        k = kw.pop("neighbours_k")
        if model is None:
            raise ValueError("model: random_insertion with neighbours_k needs the model's input embedding")
        kw["neighbours"] = T.EmbeddingSubstitution(model, tokenizer, k=k)
    if issubclass(cls, T.TokenAugmentation):
        kw["tokenizer"] = tokenizer
    return cls(**kw)
