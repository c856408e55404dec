"""The causal-LM loss through :func:`fastpeft.ops.linear_cross_entropy`, without the logits.

A patched ``*ForCausalLM`` instance gets a ``forward`` that, for a call with ``labels`` while autograd
records (training), runs the class's own forward with ``labels=None`` and the LM head deferred (it
returns its input, the last hidden states; Gemma-2's final soft-capping is switched off for that call
and applied inside the fused loss instead), then computes transformers' ``ForCausalLMLoss`` on them::

    labels shifted left by one (F.pad(labels, (0, 1), value=ignore_index)[..., 1:]), or shift_labels
    loss = linear_cross_entropy(hidden, lm_head.weight, shifted, lm_head.bias, ignore_index,
                                logit_softcap=config.final_logit_softcapping,
                                reduction="sum" if num_items_in_batch is given else "mean")
    loss = loss / num_items_in_batch   (when given)

and returns the model's output class with that ``loss`` and ``logits=None``: the [batch, seq, vocab]
logits are never built.  Without labels, with grad mode off (evaluation, ``generate()``), or with
``return_dict=False``, the class's forward runs unchanged (logits as usual).
"""
from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F

from ..ops import linear_cross_entropy

LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_loss(hidden, weight, bias, labels, softcap=None, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None):
    """transformers' ``ForCausalLMLoss(lm_head(hidden), labels, ...)`` without the logits (module doc)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)  # what lm_head (F.linear) under autocast computes in
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif hidden.dtype != weight.dtype:
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                logit_softcap=softcap, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class _HeadState:
    defer = False


def _head_forward(state: _HeadState):
    def forward(self, x, *args, **kwargs):
        if state.defer:
            return x
        return type(self).forward(self, x, *args, **kwargs)

    return forward


def install(model, head) -> None:
    """Give ``model`` (a ``*ForCausalLM``) and its LM head ``head`` (a plain ``nn.Linear``) the fused loss."""
    state = _HeadState()
    head.forward = types.MethodType(_head_forward(state), head)
    cls_forward = type(model).forward
    signature = inspect.signature(cls_forward)
    params = list(signature.parameters)

    def forward(self, *args, **kwargs):
        if "labels" in kwargs:
            labels = kwargs["labels"]
        else:
            i = params.index("labels") - 1 if "labels" in params else -1
            labels = args[i] if 0 <= i < len(args) else None
        if labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False:
            return cls_forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = {}
        for name, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                extra = arguments.pop(name)
        arguments["labels"] = None
        loss_kwargs = {k: extra[k] for k in LOSS_KWARGS if k in extra}
        config = self.config
        softcap = getattr(config, "final_logit_softcapping", None)
        state.defer = True
        try:
            if softcap is not None:
                config.final_logit_softcapping = None
            out = cls_forward(self, **arguments, **extra)
        finally:
            state.defer = False
            if softcap is not None:
                config.final_logit_softcapping = softcap
        hidden = out["logits"]
        loss = causal_lm_loss(hidden, head.weight, head.bias, labels, softcap, **loss_kwargs)
        fields = {k: v for k, v in out.items() if k not in ("logits", "loss")}
        return type(out)(loss=loss, **fields)

    model.forward = types.MethodType(forward, model)


def uninstall(model, head) -> None:
    model.__dict__.pop("forward", None)
    head.__dict__.pop("forward", None)
