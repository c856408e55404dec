"""Adversarial training on embedding outputs: FGM, PGD, FreeLB, FGSM-RS, SMART.

Every method perturbs the **output** of the input embedding
(``model.get_input_embeddings()``) with ``delta`` [B, L, H] through a forward hook
(default) or ``inputs_embeds``, so it works with frozen embeddings (PEFT / LoRA),
any ``transformers`` model, and models patched by fastpeft or HF PEFT.  Padding
positions (``batch["attention_mask"] == 0``) are never perturbed.  The ascent
steps and random starts use the fused kernels :func:`fastpeft.ops.adv_perturb_update`
and :func:`fastpeft.ops.adv_perturb_init`.

Trainer interface (fastpeft's trainer and :mod:`fastpeft.adversarial.hf` call it so)::

    loss = method.step(model, batch, forward_fn, backward=None)
    # forward_fn(model, batch) -> (loss, logits); backward(loss) defaults to loss.backward()
    # step() runs every forward/backward pass, accumulates parameter .grad (never zeroes it),
    # and returns the detached training loss; then call optimizer.step().

Cost per training step (F = forward passes, B = backward passes, K = ``steps``):

============================  ==========  ==========  ======================================
method                        F           B           trains on
============================  ==========  ==========  ======================================
plain training                1           1           clean loss
``FGM``                       2           2           clean + adversarial (1 normalised step)
``PGD(steps=K)``              K + 1       K + 1       clean + adversarial after K steps
``FreeLB(steps=K)``           K           K           mean of the K adversarial losses
``FGSMRandomInit``            2           2           adversarial (random start + 1 step)
``SMART(steps=K)``            K + 2       K + 2       clean + alpha * symmetric KL
============================  ==========  ==========  ======================================

Backward passes that only need the gradient of delta (PGD's first K - 1, FGSM-RS's
first, SMART's K ascent passes) use ``torch.autograd.grad`` and are somewhat cheaper
than a full backward when the weights are frozen.  The delta updates themselves
are one fused kernel each (3N bytes of traffic, 5N for per-example L2).

Evaluation: :func:`pgd_attack` returns a model's logits under a PGD attack.
HF Trainer: :class:`AdversarialTrainerMixin`, :func:`make_adversarial_trainer`.
"""
from .hooks import EmbeddingPerturbation, input_embedding
from .methods import (FGM, METHODS, PGD, SMART, AdversarialMethod, FGSMRandomInit, FreeLB, build, pgd_attack,
                      symmetric_kl)
from .hf import AdversarialTrainerMixin, make_adversarial_trainer

get_method = build

__all__ = ["AdversarialMethod", "FGM", "PGD", "FreeLB", "FGSMRandomInit", "SMART", "METHODS", "build", "get_method",
           "pgd_attack", "symmetric_kl", "EmbeddingPerturbation", "input_embedding", "AdversarialTrainerMixin",
           "make_adversarial_trainer"]
