"""Few-shot baselines, trained on the same shots as the SetFit-style method.

* :class:`HeadOnlyClassifier` -- the frozen encoder's pooled, L2-normalised embeddings and the same
  logistic head as SetFit (no encoder training)::

      X = normalize(mean_pool(encoder(shots)))                 # [N, D], encoder frozen
      head = LogisticHead(D, C).fit(X, y)                      # fastpeft.fewshot.head
      pred = head(normalize(mean_pool(encoder(texts)))).argmax(-1)

* :class:`PrototypeClassifier` -- nearest class centroid under cosine similarity (no training)::

      P = normalize(stack([X[y == c].mean(0) for c in range(C)]))   # [C, D] prototypes
      pred = (normalize(embed(texts)) @ P.T).argmax(-1)

* :class:`PromptTuningClassifier` -- soft-prompt tuning (Lester et al. 2021): a sequence-classification
  model (``AutoModelForSequenceClassification``, pooler + new linear head) wrapped with
  ``fastpeft.get_peft_model(model, PromptTuningConfig(num_virtual_tokens=n, modules_to_save=["classifier"]))``;
  only the ``n`` prompt vectors and the head train, with AdamW on cross-entropy over the shots::

      embeds = torch.cat([prompt.expand(B, n, D), word_embeddings(input_ids)], 1)
      logits = model(inputs_embeds=embeds, attention_mask=torch.cat([ones(B, n), mask], 1)).logits
      loss = F.cross_entropy(logits, y)

The frozen-feature classifiers accept a shared :class:`FrozenEncoder`, which memoises embeddings by text,
so evaluating many seeds on one evaluation set embeds it once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from .encoder import Tokenized, embed_texts, load_encoder, resolve_encoder_path
from .head import LogisticHead
from .setfit import _check_texts_labels, _label_ids


class FrozenEncoder:
    """A frozen sentence encoder with an embedding memo: ``FrozenEncoder("minilm").embed(texts) -> [N, D]``
    (mean-pooled, L2-normalised, float32)."""

    def __init__(self, model: str | None = None, *, max_length: int = 64, batch_size: int = 64):
        self.model_name = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.model, self.tokenizer = load_encoder(model)
        self.model.requires_grad_(False)
        self._memo: dict = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [str(t) for t in texts]
        todo = sorted({t for t in texts if t not in self._memo})
        if todo:
            emb = embed_texts(self.model, self.tokenizer, todo, batch_size=self.batch_size,
                              max_length=self.max_length)
            self._memo.update(zip(todo, emb))
        if not texts:
            raise ValueError("texts: expected at least one text, got none")
        return torch.stack([self._memo[t] for t in texts])


class _FrozenFeatureClassifier:
    def __init__(self, model: str | None = None, *, encoder: FrozenEncoder | None = None, max_length: int = 64):
        if encoder is not None and not isinstance(encoder, FrozenEncoder):
            raise ValueError(f"encoder: expected a FrozenEncoder, got {type(encoder).__name__}")
        self._encoder = encoder
        self._model = model
        self._max_length = max_length
        self.classes_: list | None = None

    @property
    def encoder(self) -> FrozenEncoder:
        if self._encoder is None:
            self._encoder = FrozenEncoder(self._model, max_length=self._max_length)
        return self._encoder

    def predict(self, texts: Sequence[str]) -> list:
        if self.classes_ is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before predict()")
        return [self.classes_[i] for i in self.predict_ids(texts).tolist()]


class HeadOnlyClassifier(_FrozenFeatureClassifier):
    """Logistic head on frozen features (module docstring). Deterministic: ``seed`` is accepted for a
    uniform interface and unused (the head's fit is a pure function of the shots)."""

    name = "head_only"

    def __init__(self, model: str | None = None, *, encoder: FrozenEncoder | None = None, max_length: int = 64,
                 head_C: float = 1.0, head_max_iter: int = 200):
        super().__init__(model, encoder=encoder, max_length=max_length)
        if not head_C > 0:
            raise ValueError(f"head_C: expected > 0, got {head_C!r}")
        self.head_C, self.head_max_iter = head_C, head_max_iter
        self.head = None

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable], seed: int = 0) -> "HeadOnlyClassifier":
        texts, labels = _check_texts_labels(texts, labels)
        self.classes_, y = _label_ids(labels)
        X = self.encoder.embed(texts)
        self.head = LogisticHead(X.shape[1], len(self.classes_)).fit(X, torch.tensor(y), C=self.head_C,
                                                                      max_iter=self.head_max_iter)
        return self

    def predict_ids(self, texts: Sequence[str]) -> torch.Tensor:
        return self.head.predict(self.encoder.embed(texts))


def class_prototypes(X: torch.Tensor, y, num_classes: int) -> torch.Tensor:
    """L2-normalised class centroids [C, D] of the rows of ``X`` [N, D] (rows normalised first)."""
    y = torch.as_tensor(y, dtype=torch.long)
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X, y: expected [N, D] and [N], got {tuple(X.shape)} and {tuple(y.shape)}")
    missing = [c for c in range(num_classes) if not bool((y == c).any())]
    if missing:
        raise ValueError(f"y: class(es) {missing} have no examples; every class needs a prototype")
    Xn = F.normalize(X.float(), dim=-1)
    return F.normalize(torch.stack([Xn[y == c].mean(0) for c in range(num_classes)]), dim=-1)


def prototype_predict(X: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar prototype for each row of ``X`` [N, D] -> [N]."""
    return (F.normalize(X.float(), dim=-1) @ prototypes.T).argmax(-1)


class PrototypeClassifier(_FrozenFeatureClassifier):
    """Nearest class centroid (cosine) on frozen features (module docstring)."""

    name = "prototype"

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable], seed: int = 0) -> "PrototypeClassifier":
        texts, labels = _check_texts_labels(texts, labels)
        self.classes_, y = _label_ids(labels)
        self.prototypes = class_prototypes(self.encoder.embed(texts), y, len(self.classes_))
        return self

    def predict_ids(self, texts: Sequence[str]) -> torch.Tensor:
        return prototype_predict(self.encoder.embed(texts), self.prototypes)


@dataclass
class PromptTuningFewShotConfig:
    model: str | None = None
    num_virtual_tokens: int = 10
    prompt_tuning_init: str = "SAMPLE_VOCAB"     # RANDOM | SAMPLE_VOCAB (task-agnostic)
    lr: float = 1e-2
    epochs: int = 30
    batch_size: int = 8
    weight_decay: float = 0.0
    max_length: int = 64
    eval_batch_size: int = 64

    def __post_init__(self):
        for k in ("num_virtual_tokens", "epochs", "batch_size", "max_length", "eval_batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: expected an int >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {self.lr!r}")
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB"):
            raise ValueError(f"prompt_tuning_init: expected 'RANDOM' or 'SAMPLE_VOCAB', got {self.prompt_tuning_init!r}")


class PromptTuningClassifier:
    """Soft-prompt tuning + a trained linear head on a sequence-classification model (module docstring)."""

    name = "prompt_tuning"

    def __init__(self, config: PromptTuningFewShotConfig | None = None, **overrides):
        base = dataclasses.asdict(config) if config is not None else {}
        base.update(overrides)
        try:
            self.config = PromptTuningFewShotConfig(**base)
        except TypeError as e:
            raise ValueError(f"PromptTuningClassifier: {e}") from None
        self.model = self.tokenizer = None
        self.classes_: list | None = None
        self.history: list[float] = []

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable], seed: int = 0) -> "PromptTuningClassifier":
        import fastpeft
        from transformers import AutoModelForSequenceClassification

        from ..workflow.models import load_base_model, load_tokenizer
        texts, labels = _check_texts_labels(texts, labels)
        self.classes_, y = _label_ids(labels)
        c = self.config
        path = resolve_encoder_path(c.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = load_base_model(path, AutoModelForSequenceClassification, num_labels=len(self.classes_))
            self.tokenizer = load_tokenizer(path)
            pcfg = fastpeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=c.num_virtual_tokens,
                                               prompt_tuning_init=c.prompt_tuning_init,
                                               modules_to_save=["classifier"])
            self.model = fastpeft.get_peft_model(base, pcfg)
            tk = Tokenized(self.tokenizer, texts, c.max_length)
            yt = torch.tensor(y)
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
            g = torch.Generator()
            g.manual_seed(seed + 1)
            self.model.train()
            self.history = []
            for _ in range(c.epochs):
                order = torch.randperm(len(texts), generator=g).tolist()
                for s in range(0, len(order), c.batch_size):
                    idx = order[s:s + c.batch_size]
                    logits = self.model(**tk.batch(idx)).logits
                    loss = F.cross_entropy(logits, yt[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    self.history.append(float(loss.detach()))
            self.model.eval()
        return self

    @torch.no_grad()
    def predict_ids(self, texts: Sequence[str]) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("PromptTuningClassifier: call fit() before predict()")
        tk = Tokenized(self.tokenizer, texts, self.config.max_length)
        order = sorted(range(len(tk)), key=lambda i: len(tk.input_ids[i]))
        out = torch.empty(len(tk), dtype=torch.long)
        bs = self.config.eval_batch_size
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            out[idx] = self.model(**tk.batch(idx)).logits.argmax(-1)
        return out

    def predict(self, texts: Sequence[str]) -> list:
        return [self.classes_[i] for i in self.predict_ids(texts).tolist()]
