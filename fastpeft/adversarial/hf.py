"""Hugging Face ``transformers.Trainer`` integration.

``AdversarialTrainerMixin`` overrides ``Trainer.training_step`` so each training
step runs an adversarial method's forward/backward passes; everything else
(optimizer, scheduler, gradient accumulation, clipping, logging, evaluation)
stays the Trainer's.  Use either::

    class MyTrainer(AdversarialTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, adversarial_method=FreeLB(steps=3))

or ``make_adversarial_trainer(Trainer, FreeLB(steps=3))(model=model, args=args, ...)``.

The loss of every pass comes from ``Trainer.compute_loss`` (so custom
``compute_loss`` overrides and ``compute_loss_func`` apply), divided by the
gradient-accumulation steps exactly as ``Trainer.training_step`` does, and the
parameter-gradient passes go through ``accelerator.backward`` (mixed-precision
loss scaling).  Evaluation and prediction are unchanged (no perturbation).
"""
from __future__ import annotations

import inspect

from typing import Optional

import torch

from .methods import AdversarialMethod


def _logits(outputs):
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return outputs["logits"]
        raise KeyError("adversarial training: the model output has no 'logits'")
    if isinstance(outputs, (tuple, list)):
        return outputs[1] if len(outputs) > 1 else outputs[0]
    return outputs


class AdversarialTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it in the bases).

    Keyword ``adversarial_method`` (a :class:`fastpeft.adversarial.AdversarialMethod`);
    None trains normally."""

    def __init__(self, *args, adversarial_method: Optional[AdversarialMethod] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if adversarial_method is None:
            adversarial_method = getattr(type(self), "adversarial_method", None)
        if adversarial_method is not None and not callable(getattr(adversarial_method, "step", None)):
            raise TypeError("adversarial_method: expected an object with step(model, batch, forward_fn, backward), "
                            f"got {type(adversarial_method).__name__}")
        self.adversarial_method = adversarial_method

    def training_step(self, model, inputs, num_items_in_batch=None):
        method = self.adversarial_method
        if method is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

        def forward_fn(m, batch):
            with self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(m, batch, return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            if not scaled_for_ga:
                loss = loss / ga
            return loss, _logits(outputs)

        def backward(loss):
            self.accelerator.backward(loss)

        extra = {}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "loss_scale" in inspect.signature(method.step).parameters:
            extra["loss_scale"] = float(scaler.get_scale())  # fp16: SMART's inner gradients are scaled too
        loss = method.step(model, inputs, forward_fn, backward, **extra)
        return loss.detach() if torch.is_tensor(loss) else torch.tensor(float(loss), device=self.args.device)


def make_adversarial_trainer(trainer_cls, method: Optional[AdversarialMethod] = None):
    """A subclass of ``trainer_cls`` (``transformers.Trainer`` or a subclass) whose
    training steps run ``method`` (overridable per instance with ``adversarial_method=``)."""
    return type(f"Adversarial{trainer_cls.__name__}", (AdversarialTrainerMixin, trainer_cls),
                {"adversarial_method": method})
