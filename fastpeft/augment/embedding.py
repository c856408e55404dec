"""Augmentation in embedding space: NEFTune noise and embedding mixup, through a forward hook on the
output of ``model.get_input_embeddings()`` (works with frozen embeddings, PEFT / LoRA, fastpeft- or
HF-PEFT-patched models; the same hook point as :mod:`fastpeft.adversarial`).

**NEFTune** (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
training only, the embedding output ``e`` [B, L, d] becomes ``e + noise`` with

* ``distribution="uniform"`` (the paper's): ``noise ~ U(-1, 1) * alpha / sqrt(L * d)``;
* ``distribution="gaussian"``: ``noise ~ N(0, 1) * alpha / sqrt(L * d)``;

``L`` is the padded sequence length of the batch and ``d`` the hidden size (as in the paper and in
``transformers``). ``alpha`` is typically 5-15. Plain PyTorch::

    def hook(module, inputs, e):
        if module.training:
            m = alpha / math.sqrt(e.shape[-2] * e.shape[-1])
            return e + torch.empty_like(e).uniform_(-m, m)
    handle = model.get_input_embeddings().register_forward_hook(hook)   # handle.remove() to undo

The hook checks ``module.training``: ``model.eval()`` (the trainer's evaluation) turns the noise off.

**Embedding mixup** (Guo et al. 2019, "Augmenting Data with Mixup for Sentence Classification"), for
sequence classification: each batch draws ``lam ~ Beta(alpha, alpha)`` and a partner ``perm[i]`` for
every example (with probability ``p``; otherwise ``perm[i] = i``, i.e. the example is left alone); the
embedding output becomes ``lam * e + (1 - lam) * e[perm]``, the attention mask the union
``max(mask, mask[perm])``, and the loss the soft-label cross-entropy

    ``loss = lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``
    ``     = mean_i( -sum_c t_ic log softmax(logits_i)_c )``, ``t = lam * onehot(y) + (1 - lam) * onehot(y[perm])``.

Use it with the trainer as a callback *and* its loss::

    mix = EmbeddingMixup(alpha=0.4, seed=0)
    Trainer(model, task, tr, dev, cfg, callbacks=[mix], loss_fn=mix.loss_fn).train()

Randomness: both own their generators, re-seeded per batch from ``(seed, batch counter)``
(``on_train_begin`` restarts the counter at ``step * grad_accum``, so resumed runs match).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..adversarial.hooks import input_embedding

__all__ = ["NEFTune", "EmbeddingMixup", "soft_cross_entropy", "EMBEDDING_OPS"]


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed: expected an integer, got {value!r}")
    return value


class _EmbeddingHook:
    """Shared plumbing: attach / remove a forward hook on the input embedding, per-batch seeding."""

    name = "embedding_hook"

    def __init__(self, seed: int):
        self.seed = _seed(seed)
        self._handle = None
        self._module = None
        self._calls = 0
        self._batch_seed = self.seed * 1_000_003

    # ---- hook management -----------------------------------------------------------------
    def attach(self, model) -> "_EmbeddingHook":
        """Register the hook on ``model.get_input_embeddings()`` (idempotent for the same module)."""
        emb = input_embedding(model)
        if self._handle is not None:
            if emb is self._module:
                return self
            self.remove()
        self._module = emb
        self._handle = emb.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        """Remove the hook (the model behaves exactly as before ``attach``)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._module = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self):
        if self._handle is None:
            raise RuntimeError(f"{type(self).__name__}: call attach(model) before using it as a context manager")
        return self

    def __exit__(self, *exc):
        self.remove()

    # ---- trainer callbacks ---------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self.attach(trainer.module if hasattr(trainer, "module") else trainer.model)
        step = getattr(getattr(trainer, "state", None), "step", 0)
        accum = getattr(getattr(trainer, "config", None), "grad_accum", 1) or 1
        self._calls = int(step) * int(accum)

    def on_train_end(self, trainer, result) -> None:
        self.remove()

    def _next_seed(self) -> int:
        s = (self.seed * 1_000_003 + self._calls) % (2 ** 63)
        self._calls += 1
        return s

    def _hook(self, module, inputs, output):
        raise NotImplementedError


class NEFTune(_EmbeddingHook):
    """Noise on the input-embedding output during training (see the module docstring).

    ``alpha`` > 0: noise scale ``alpha / sqrt(L * d)``; ``distribution``: ``"uniform"`` | ``"gaussian"``;
    ``seed``: the noise generator's seed. As a trainer callback it attaches in ``on_train_begin`` and
    removes itself in ``on_train_end``; standalone: ``NEFTune(5).attach(model)`` ... ``.remove()`` (or
    ``with NEFTune(5).attach(model): ...``)."""

    name = "neftune"
    DISTRIBUTIONS = ("uniform", "gaussian")

    def __init__(self, alpha: float = 5.0, *, distribution: str = "uniform", seed: int = 0):
        super().__init__(seed)
        self.alpha = _positive("alpha", alpha)
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"distribution: expected one of {self.DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        self._gens: dict = {}

    def __repr__(self) -> str:
        return f"NEFTune(alpha={self.alpha}, distribution={self.distribution!r}, seed={self.seed})"

    def on_batch(self, trainer, batch: dict) -> dict:
        self._batch_seed = self._next_seed()
        self._gens.clear()
        return batch

    def _generator(self, device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self._batch_seed)
            self._gens[key] = g
        return g

    def noise_like(self, e: torch.Tensor) -> torch.Tensor:
        """The noise added to an embedding output ``e`` [..., L, d] (float32, then cast to ``e.dtype``)."""
        L, d = (e.shape[-2], e.shape[-1]) if e.dim() >= 2 else (1, e.shape[-1])
        scale = self.alpha / math.sqrt(max(L * d, 1))
        g = self._generator(e.device)
        if self.distribution == "uniform":
            n = torch.rand(e.shape, generator=g, device=e.device, dtype=torch.float32) * 2 - 1
        else:
            n = torch.randn(e.shape, generator=g, device=e.device, dtype=torch.float32)
        return (n * scale).to(e.dtype)

    def _hook(self, module, inputs, output):
        if not module.training or not torch.is_tensor(output) or not output.is_floating_point():
            return None
        return output + self.noise_like(output)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i(-sum_c targets[i, c] * log_softmax(logits)[i, c])``; logits / targets [B, C]."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class EmbeddingMixup(_EmbeddingHook):
    """Mixup of input-embedding outputs and labels for sequence classification (module docstring).

    ``alpha`` > 0: ``lam ~ Beta(alpha, alpha)`` per batch; ``p`` in [0, 1]: probability that an example
    gets a mixing partner; ``seed``. Give the trainer both ``callbacks=[mix]`` and ``loss_fn=mix.loss_fn``
    (:func:`fastpeft.augment.callbacks_from_config` returns them so). The batch carries ``_mixup_lam`` and
    ``_mixup_perm`` (bookkeeping keys, not passed to the model) for the loss."""

    name = "mixup"

    def __init__(self, alpha: float = 0.4, *, p: float = 1.0, seed: int = 0):
        super().__init__(seed)
        self.alpha = _positive("alpha", alpha)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p: expected a number in [0, 1], got {p!r}")
        self.p = float(p)
        self._current = None

    def __repr__(self) -> str:
        return f"EmbeddingMixup(alpha={self.alpha}, p={self.p}, seed={self.seed})"

    def on_train_begin(self, trainer) -> None:
        if getattr(trainer, "loss_fn", "absent") is None:
            raise ValueError("loss_fn: EmbeddingMixup needs the trainer to use its soft-label loss: "
                             "Trainer(..., callbacks=[mix], loss_fn=mix.loss_fn) (callbacks_from_config returns it)")
        super().on_train_begin(trainer)

    def on_batch(self, trainer, batch: dict) -> dict:
        return self.mix_batch(batch)

    def on_train_end(self, trainer, result) -> None:
        super().on_train_end(trainer, result)
        self._current = None

    def mix_batch(self, batch: dict) -> dict:
        """Draw ``lam`` and partners for ``batch``; returns a new batch with ``_mixup_lam`` /
        ``_mixup_perm`` and the union attention mask, and arms the hook for the next forwards."""
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None or not torch.is_tensor(labels):
            raise ValueError("batch['labels']: mixup needs class labels in the batch")
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"batch['labels']: mixup needs one integer class label per example (sequence "
                             f"classification), got labels of shape {list(labels.shape)} dtype {labels.dtype}")
        s = self._next_seed()
        B = labels.shape[0]
        lam = random.Random(s).betavariate(self.alpha, self.alpha)
        g = torch.Generator()
        g.manual_seed(s)
        rows = torch.rand(B, generator=g) < self.p
        perm = torch.where(rows, torch.randperm(B, generator=g), torch.arange(B)).to(labels.device)
        out = dict(batch)
        mask = batch.get("attention_mask")
        if torch.is_tensor(mask):
            out["attention_mask"] = torch.maximum(mask, mask[perm])
        out["_mixup_lam"] = torch.tensor(lam, dtype=torch.float32)
        out["_mixup_perm"] = perm
        self._current = (lam, perm)
        return out

    def _hook(self, module, inputs, output):
        if not module.training or self._current is None or not torch.is_tensor(output):
            return None
        lam, perm = self._current
        if output.shape[0] != perm.numel():
            raise RuntimeError(f"mixup: the embedding output has batch size {output.shape[0]} but the batch "
                               f"prepared by on_batch had {perm.numel()} examples")
        perm = perm.to(output.device)
        return lam * output + (1.0 - lam) * output[perm]

    def targets(self, labels: torch.Tensor, num_classes: int, lam: float, perm: torch.Tensor) -> torch.Tensor:
        """Soft targets ``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` [B, C]."""
        one = F.one_hot(labels, num_classes).float()
        return lam * one + (1.0 - lam) * one[perm.to(labels.device)]

    def loss_fn(self, outputs, batch: dict) -> torch.Tensor:
        """Soft-label cross-entropy of the mixed batch (plain cross-entropy for a batch without
        ``_mixup_lam``, e.g. an evaluation batch)."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        labels = batch["labels"].to(logits.device)
        if "_mixup_lam" not in batch:
            return F.cross_entropy(logits.float(), labels)
        lam = float(batch["_mixup_lam"])
        return soft_cross_entropy(logits, self.targets(labels, logits.shape[-1], lam, batch["_mixup_perm"]))


EMBEDDING_OPS = {NEFTune.name: NEFTune, EmbeddingMixup.name: EmbeddingMixup}
