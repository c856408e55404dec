"""Adversarial training methods on embedding outputs (see the package docstring).

Every method implements ``step(model, batch, forward_fn, backward=None) -> loss``:
it runs all forward/backward passes of one training step, leaves the parameter
gradients accumulated in ``.grad`` (ready for ``optimizer.step()``; it never zeroes
them) and returns the detached training loss.  ``forward_fn(model, batch) ->
(loss, logits)``; ``backward(loss)`` (default ``loss.backward()``) is used for the
passes whose parameter gradients count, so a trainer can route them through a
loss scaler / accelerator.  Inner ascent passes use ``torch.autograd.grad`` w.r.t.
delta only and leave parameter gradients untouched.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops.adv_perturb_update import adv_perturb_init, adv_perturb_update
from .hooks import VIA, EmbeddingPerturbation, batch_mask

ForwardFn = Callable[[torch.nn.Module, dict], tuple]
NORMS = ("linf", "l2_token", "l2_example")


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ValueError(f"{name}: expected a number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"steps: expected an int >= 1, got {value!r}")
    return value


class AdversarialMethod:
    """Base class: holds ``norm`` and ``via`` and the helpers shared by the methods."""

    name = "base"
    #: (forward passes, backward passes) of one step, for the docs and the benchmarks
    cost: tuple = (1, 1)

    def __init__(self, *, norm: str = "l2_example", via: str = "hook"):
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        if via not in VIA:
            raise ValueError(f"via: expected one of {VIA}, got {via!r}")
        self.norm, self.via = norm, via

    def step(self, model, batch: dict, forward_fn: ForwardFn,
             backward: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        raise NotImplementedError

    # helpers -----------------------------------------------------------------
    @staticmethod
    def _zeros(requires_grad: bool):
        def make(out):
            return torch.zeros_like(out, memory_format=torch.contiguous_format).requires_grad_(requires_grad)
        return make

    def _random(self, batch, kind: str, scale: float, norm: str, requires_grad: bool):
        def make(out):
            d = adv_perturb_init(out.detach(), kind=kind, scale=scale, norm=norm, mask=batch_mask(batch, out.shape))
            return d.requires_grad_(requires_grad)
        return make

    def _update(self, delta, grad, batch, step_size, epsilon, norm=None):
        adv_perturb_update(delta, grad.to(delta.dtype), norm=norm or self.norm, step_size=step_size,
                           epsilon=epsilon, mask=batch_mask(batch, delta.shape))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class FGM(AdversarialMethod):
    """Fast Gradient Method (Miyato et al. 2017): clean pass, one normalised step of size
    ``epsilon`` along the gradient of the embedding output, adversarial pass; the parameter
    gradients of both passes are summed.  Cost: 2 forward + 2 backward.  Returns the clean loss."""

    name = "fgm"
    cost = (2, 2)

    def __init__(self, epsilon: float = 1.0, *, norm: str = "l2_example", via: str = "hook"):
        super().__init__(norm=norm, via=via)
        self.epsilon = _positive("epsilon", epsilon)

    def step(self, model, batch, forward_fn, backward=None):
        backward = backward or _default_backward
        with EmbeddingPerturbation(model, self.via) as P:
            loss, _ = P.forward(forward_fn, model, batch, factory=self._zeros(True))
            backward(loss)
            delta = P.delta
            grad = delta.grad
            adv = torch.zeros_like(delta, requires_grad=False)
            self._update(adv, grad, batch, self.epsilon, self.epsilon)
            adv_loss, _ = P.forward(forward_fn, model, batch, adv)
            backward(adv_loss)
        return loss.detach()


class PGD(AdversarialMethod):
    """Projected Gradient Descent adversarial training (Madry et al. 2018), in the form common
    for NLP fine-tuning: clean pass (parameter gradients kept), ``steps`` projected ascent steps
    on delta (optionally from a random start), the last adversarial pass adds its parameter
    gradients.  Cost: (K + 1) forward + (K + 1) backward (K = steps; the first K - 1 adversarial
    backward passes compute only the gradient of delta).  Returns the clean loss."""

    name = "pgd"

    def __init__(self, epsilon: float = 1.0, step_size: Optional[float] = None, steps: int = 3, *,
                 norm: str = "l2_example", random_init: bool = False, via: str = "hook"):
        super().__init__(norm=norm, via=via)
        self.epsilon = _positive("epsilon", epsilon)
        self.steps = _steps(steps)
        self.step_size = _positive("step_size", step_size if step_size is not None else 2.5 * epsilon / steps)
        self.random_init = bool(random_init)
        self.cost = (self.steps + 1, self.steps + 1)

    def step(self, model, batch, forward_fn, backward=None):
        backward = backward or _default_backward
        with EmbeddingPerturbation(model, self.via) as P:
            loss, _ = P.forward(forward_fn, model, batch, factory=self._zeros(True))
            backward(loss)
            grad = P.delta.grad
            if self.random_init:
                delta = self._random(batch, "uniform", self.epsilon, self.norm, False)(P.delta)
            else:
                delta = torch.zeros_like(P.delta)
            for t in range(self.steps):
                self._update(delta, grad, batch, self.step_size, self.epsilon)
                delta.requires_grad_(True)
                adv_loss, _ = P.forward(forward_fn, model, batch, delta)
                if t < self.steps - 1:
                    grad, = torch.autograd.grad(adv_loss, delta)
                else:
                    backward(adv_loss)
                delta = delta.detach()
        return loss.detach()


class FreeLB(AdversarialMethod):
    """FreeLB (Zhu et al. 2020): ``steps`` (K) ascent steps from a random start
    (``init_mag``: uniform(-1, 1) x mask x init_mag / sqrt(L_i H) for L2, x init_mag for
    linf); every step's pass adds the parameter gradients of ``loss / K`` ("free" large-batch
    training), then delta takes a normalised step of ``step_size`` and is projected onto
    ``epsilon`` (0: no projection, FreeLB's default).  Cost: K forward + K backward; the
    returned loss is the mean of the K adversarial losses."""

    name = "freelb"

    def __init__(self, step_size: float = 1e-1, epsilon: float = 0.0, steps: int = 3, init_mag: float = 1e-1, *,
                 norm: str = "l2_example", via: str = "hook"):
        super().__init__(norm=norm, via=via)
        self.step_size = _positive("step_size", step_size)
        self.epsilon = _positive("epsilon", epsilon, allow_zero=True)
        self.steps = _steps(steps)
        self.init_mag = _positive("init_mag", init_mag, allow_zero=True)
        self.cost = (self.steps, self.steps)

    def step(self, model, batch, forward_fn, backward=None):
        backward = backward or _default_backward
        init_norm = "l2_example" if self.norm != "linf" else "linf"
        factory = (self._random(batch, "uniform", self.init_mag, init_norm, True) if self.init_mag > 0
                   else self._zeros(True))
        total = None
        with EmbeddingPerturbation(model, self.via) as P:
            delta = None
            for t in range(self.steps):
                loss, _ = P.forward(forward_fn, model, batch, delta, factory=factory)
                delta = P.delta
                loss = loss / self.steps
                total = loss.detach() if total is None else total + loss.detach()
                backward(loss)
                if t == self.steps - 1:
                    break
                self._update(delta, delta.grad, batch, self.step_size, self.epsilon)
                delta.grad = None
        return total


class FGSMRandomInit(AdversarialMethod):
    """FGSM with random initialisation ("Fast is better than free", Wong et al. 2020):
    delta ~ uniform(-eps, eps) (linf; for L2 norms scaled per token / example), one FGSM step
    of ``alpha`` (default 1.25 eps) projected onto the eps-ball, then train on the adversarial
    loss only.  Cost: 2 forward + 2 backward (the first backward computes only the gradient
    of delta).  Returns the adversarial loss."""

    name = "fgsm_rs"
    cost = (2, 2)

    def __init__(self, epsilon: float = 1e-2, alpha: Optional[float] = None, *, norm: str = "linf",
                 via: str = "hook"):
        super().__init__(norm=norm, via=via)
        self.epsilon = _positive("epsilon", epsilon)
        self.alpha = _positive("alpha", alpha if alpha is not None else 1.25 * self.epsilon)

    def step(self, model, batch, forward_fn, backward=None):
        backward = backward or _default_backward
        with EmbeddingPerturbation(model, self.via) as P:
            loss, _ = P.forward(forward_fn, model, batch,
                                factory=self._random(batch, "uniform", self.epsilon, self.norm, True))
            delta = P.delta
            grad, = torch.autograd.grad(loss, delta)
            delta = delta.detach()
            self._update(delta, grad, batch, self.alpha, self.epsilon)
            adv_loss, _ = P.forward(forward_fn, model, batch, delta)
            backward(adv_loss)
        return adv_loss.detach()


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SMART's symmetric KL between two outputs, each direction against a detached target:
    KL(softmax(q).detach() || p) + KL(softmax(p).detach() || q), averaged over the rows of the
    flattened [N, C] logits; for one output column (regression) the squared error."""
    if p_logits.shape[-1] == 1:
        return F.mse_loss(p_logits.float(), q_logits.float())
    p = p_logits.float().reshape(-1, p_logits.shape[-1])
    q = q_logits.float().reshape(-1, q_logits.shape[-1])
    fwd = F.kl_div(F.log_softmax(p, -1), F.softmax(q.detach(), -1), reduction="batchmean")
    bwd = F.kl_div(F.log_softmax(q, -1), F.softmax(p.detach(), -1), reduction="batchmean")
    return fwd + bwd


def _one_sided_kl(adv_logits, logits):
    if adv_logits.shape[-1] == 1:
        return F.mse_loss(adv_logits.float(), logits.float().detach())
    p = adv_logits.float().reshape(-1, adv_logits.shape[-1])
    q = logits.float().reshape(-1, logits.shape[-1]).detach()
    return F.kl_div(F.log_softmax(p, -1), F.softmax(q, -1), reduction="batchmean")


class SMART(AdversarialMethod):
    """SMART's smoothness-inducing adversarial regulariser (Jiang et al. 2020):
    ``loss = task_loss(x) + alpha * symKL(f(x), f(x + delta))`` where delta starts as
    N(0, noise_var^2) noise and takes ``steps`` power-iteration-like ascent steps on
    KL(f(x) || f(x + delta)) (per-token L2-normalised steps of ``step_size``, projected onto
    the per-token ``epsilon`` ball).  The Bregman proximal point (momentum teacher) part of
    SMART is not included.  Cost: (K + 2) forward + (K + 2) backward (K = steps; the K ascent
    backward passes compute only the gradient of delta, the last backward runs through the
    clean and the perturbed graph).  Returns task_loss + alpha * regulariser."""

    name = "smart"

    def __init__(self, alpha: float = 1.0, step_size: float = 1e-3, epsilon: float = 1e-2, steps: int = 1,
                 noise_var: float = 1e-5, *, norm: str = "l2_token", via: str = "hook"):
        super().__init__(norm=norm, via=via)
        self.alpha = _positive("alpha", alpha, allow_zero=True)
        self.step_size = _positive("step_size", step_size)
        self.epsilon = _positive("epsilon", epsilon, allow_zero=True)
        self.steps = _steps(steps)
        self.noise_var = _positive("noise_var", noise_var)
        self.cost = (self.steps + 2, self.steps + 2)

    def step(self, model, batch, forward_fn, backward=None, loss_scale: float = 1.0):
        """``loss_scale``: the current fp16 loss scale (the trainer passes it). The ascent gradients of
        the tiny inner KL are taken from ``loss_scale * KL`` so they do not underflow in fp16 activations;
        the normalised ascent step does not depend on the factor. Non-finite scaled gradients (overflow)
        fall back to the unscaled objective."""
        backward = backward or _default_backward
        loss_scale = float(loss_scale)
        if not (loss_scale > 0 and math.isfinite(loss_scale)):
            raise ValueError(f"loss_scale: expected a finite positive number, got {loss_scale!r}")
        with EmbeddingPerturbation(model, self.via) as P:
            loss, logits = P.forward(forward_fn, model, batch, factory=self._zeros(False))
            delta = self._random(batch, "normal", self.noise_var, "linf", False)(P.delta)
            for _ in range(self.steps):
                delta.requires_grad_(True)
                _, adv_logits = P.forward(forward_fn, model, batch, delta)
                kl = _one_sided_kl(adv_logits, logits)
                grad, = torch.autograd.grad(kl * loss_scale, delta, retain_graph=loss_scale != 1.0)
                if loss_scale != 1.0 and not bool(torch.isfinite(grad).all()):
                    grad, = torch.autograd.grad(kl, delta)
                delta = delta.detach()
                self._update(delta, grad, batch, self.step_size, self.epsilon)
            _, adv_logits = P.forward(forward_fn, model, batch, delta)
            total = loss + self.alpha * symmetric_kl(adv_logits, logits).to(loss.dtype)
            backward(total)
        return total.detach()


def pgd_attack(model, batch: dict, forward_fn: ForwardFn, *, epsilon: float, steps: int = 10,
               step_size: Optional[float] = None, norm: str = "l2_example", random_init: bool = True,
               via: str = "hook") -> torch.Tensor:
    """Evaluation attack: the logits of ``model`` on ``batch`` under a ``steps``-step PGD
    perturbation of the embedding output (maximising ``forward_fn``'s loss, projected onto the
    ``epsilon`` ball of ``norm``).  Parameter gradients are not touched; the caller picks
    train/eval mode.  Cost: (steps + 1) forward + steps backward."""
    epsilon = _positive("epsilon", epsilon)
    steps = _steps(steps)
    step_size = step_size if step_size is not None else 2.5 * epsilon / steps
    with torch.enable_grad(), EmbeddingPerturbation(model, via) as P:
        mk = AdversarialMethod(norm=norm, via=via)
        factory = mk._random(batch, "uniform", epsilon, norm, True) if random_init else mk._zeros(True)
        delta = None
        for _ in range(steps):
            loss, _ = P.forward(forward_fn, model, batch, delta, factory=factory)
            delta = P.delta
            grad, = torch.autograd.grad(loss, delta)
            delta = delta.detach()
            mk._update(delta, grad, batch, step_size, epsilon)
            delta.requires_grad_(True)
        with torch.no_grad():
            _, logits = P.forward(forward_fn, model, batch, delta.detach())
    return logits.detach()


METHODS = {"fgm": FGM, "pgd": PGD, "freelb": FreeLB, "fgsm_rs": FGSMRandomInit, "fgsm": FGSMRandomInit,
           "smart": SMART}


def build(name: str, **kwargs) -> AdversarialMethod:
    """A method by name (``fgm``, ``pgd``, ``freelb``, ``fgsm_rs``, ``smart``; case and
    ``-``/``_`` insensitive) with its keyword arguments (used by config files)."""
    key = str(name).lower().replace("-", "_")
    if key not in METHODS:
        key = key.replace("_", "")
        key = {"fgsmrs": "fgsm_rs", "fgsmrandominit": "fgsm_rs"}.get(key, key)
    if key not in METHODS:
        raise ValueError(f"adversarial method: expected one of {sorted(set(METHODS))}, got {name!r}")
    return METHODS[key](**kwargs)
