"""Perturbing the output of a model's input embedding.

Adversarial training in embedding space adds a perturbation ``delta`` [B, L, H]
to the **output** of ``model.get_input_embeddings()`` (the word/token embedding),
not to its weight: this works when the embedding matrix is frozen (PEFT, LoRA),
for any ``transformers`` model, and for models patched by fastpeft or HF PEFT
(``PeftModel.get_input_embeddings()`` reaches the base model's embedding).

Two ways to inject ``delta`` (``via``):

* ``"hook"`` (default): a forward hook on the embedding returns ``output + delta``
  for the **first** embedding call of each perturbed forward (encoder-decoder
  models that reuse the embedding for the decoder keep a clean decoder input);
* ``"inputs_embeds"``: the batch's ``input_ids`` are embedded here and passed as
  ``inputs_embeds = embedding(input_ids) + delta`` (models that accept it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

VIA = ("hook", "inputs_embeds")


def input_embedding(model) -> torch.nn.Module:
    """``model.get_input_embeddings()``, looking through DDP/FSDP-style ``.module`` wrappers."""
    m = model
    for _ in range(4):
        get = getattr(m, "get_input_embeddings", None)
        if callable(get):
            emb = get()
            if emb is not None:
                return emb
        if not hasattr(m, "module"):
            break
        m = m.module
    raise TypeError(f"model: expected a model with get_input_embeddings() (a transformers model, a PeftModel, "
                    f"or a module defining it), got {type(model).__name__}")


def batch_mask(batch: dict, shape) -> Optional[torch.Tensor]:
    """``batch["attention_mask"]`` checked against the embedding output shape [B, L, H], or None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return None
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(f"batch['attention_mask']: expected shape [B, L] = {list(shape[:2])} (the input "
                         f"embedding output is {list(shape)}), got {list(mask.shape)}")
    return mask


class EmbeddingPerturbation:
    """Context manager that adds a perturbation to the input embedding's output.

    Usage (inside a method's ``step``)::

        with EmbeddingPerturbation(model) as P:
            loss, logits = P.forward(forward_fn, model, batch, factory=lambda out: torch.zeros_like(out))
            delta = P.delta          # [B, L, H], created by ``factory`` from the embedding output
            loss, logits = P.forward(forward_fn, model, batch, delta)  # reuse / update it

    ``factory(embedding_output) -> delta`` builds delta on the first forward (its
    shape is only known then); later forwards pass ``delta`` explicitly.
    """

    def __init__(self, model, via: str = "hook"):
        if via not in VIA:
            raise ValueError(f"via: expected one of {VIA}, got {via!r}")
        self.embedding = input_embedding(model)
        self.via = via
        self.delta: Optional[torch.Tensor] = None
        self._factory: Optional[Callable] = None
        self._armed = False
        self._handle = None

    def __enter__(self) -> "EmbeddingPerturbation":
        if self.via == "hook":
            self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._armed = False

    def _add(self, out: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            self.delta = self._factory(out)
        if self.delta.shape != out.shape:
            raise RuntimeError(f"adversarial perturbation has shape {list(self.delta.shape)} but the input "
                               f"embedding returned {list(out.shape)}")
        return out + self.delta.to(out.dtype)

    def _hook(self, module, inputs, output):
        if not self._armed or not torch.is_tensor(output):
            return None
        self._armed = False
        return self._add(output)

    def forward(self, forward_fn: Callable, model, batch: dict, delta: Optional[torch.Tensor] = None,
                factory: Optional[Callable] = None):
        """``forward_fn(model, batch)`` with ``delta`` (or ``factory(output)``) added to the embedding output."""
        if delta is None and factory is None:
            raise ValueError("forward: give delta or factory")
        self.delta, self._factory = delta, factory
        if self.via == "inputs_embeds":
            if "input_ids" not in batch:
                raise ValueError("batch: via='inputs_embeds' needs batch['input_ids']")
            b = {k: v for k, v in batch.items() if k != "input_ids"}
            b["inputs_embeds"] = self._add(self.embedding(batch["input_ids"]))
            return forward_fn(model, b)
        if self._handle is None:
            raise RuntimeError("EmbeddingPerturbation.forward must be called inside its `with` block")
        self._armed = True
        try:
            result = forward_fn(model, batch)
        finally:
            missed, self._armed = self._armed, False
        if missed:
            raise RuntimeError("forward_fn did not call the model's input embedding "
                               f"({type(self.embedding).__name__}); nothing was perturbed")
        return result
