"""Continual-learning strategies: what happens before, during and after training each task.

Every strategy runs the ordinary :class:`fastpeft.workflow.Trainer` on each task; it changes only the
data the trainer sees (``train_dataset``), its loss (``loss_fn(outputs, batch)``: the task's
cross-entropy ``outputs.loss`` plus a penalty), the model's adapters (``before_task``) and which adapter
evaluates which task (``route``). ``theta`` below are the *trainable* parameters (LoRA A/B and the task
head), ``t`` is the task index (0-based), ``CE`` the task loss.

* ``naive`` -- sequential fine-tuning: ``loss = CE``. The baseline that forgets.
* ``ewc`` -- Elastic Weight Consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher accumulated
  over tasks (one penalty, "online" form)::

      # after task t, on its training data (fisher_samples examples, one at a time, model.eval()):
      F_t[k] = mean_x ( d log p(y|x) / d theta_k )**2        # empirical: y = the gold label
                                                            # expected: sum_c p(c|x) * (d log p(c|x)/d theta_k)**2
      F = ewc_gamma * F + F_t ;  theta_star = theta.detach().clone()
      # while training task t+1:
      loss = CE + ewc_lambda / 2 * sum_k F[k] * (theta[k] - theta_star[k])**2

* ``l2sp`` -- L2-SP (Li et al. 2018): a plain L2 pull towards an anchor, ``loss = CE + l2_lambda / 2 *
  sum_k (theta[k] - theta0[k])**2``; ``l2_anchor="previous"``: ``theta0`` = the parameters at the start of
  the task (the end of the previous one; no penalty on the first task); ``"initial"``: the parameters
  at the start of the stream (the pre-trained model with fresh adapters), on every task.
* ``replay`` -- experience replay: a bounded buffer of ``replay_size`` training examples kept by
  reservoir sampling (Vitter's algorithm R, seeded) over every example of the tasks seen so far; task
  ``t`` trains on ``concat(train_t, buffer)``, then its examples are offered to the buffer::

      n_seen += 1
      if len(buf) < size: buf.append(x)
      else:
          j = rng.randrange(n_seen)          # uniform in [0, n_seen)
          if j < size: buf[j] = x            # every example seen is in buf with probability size / n_seen

* ``per_task_adapters`` -- one adapter (LoRA + its own head copy through ``modules_to_save``) per task:
  task 0 trains the model's adapter, task ``t > 0`` gets ``model.add_adapter(f"task{t}_{name}", config)`` and
  ``model.set_adapter`` to it, which leaves every earlier adapter and head with ``requires_grad=False``
  (the optimizer never sees them). At evaluation, task ``j`` is routed to its adapter by task id
  (``set_adapter(adapters[j])``; a task not trained yet uses the newest adapter). Earlier tasks' parameters
  never change, so their predictions are bit-identical: zero forgetting by construction.
* ``lwf`` -- Learning without Forgetting (Li & Hoiem 2016): a frozen copy of the model at the start of
  task ``t > 0`` gives soft targets on the new task's inputs::

      with torch.no_grad():
          old = prev_model(**inputs).logits
      kd = T**2 * F.kl_div(F.log_softmax(new / T, -1), F.log_softmax(old / T, -1),
                           log_target=True, reduction="batchmean")     # KL(p_old^T || p_new^T)
      loss = CE + lwf_alpha * kd                                       # T = lwf_temperature

Build one with :func:`make_strategy` (``make_strategy("ewc", ewc_lambda=1000)``); the keyword names are
the ``continual:`` config keys.
"""
from __future__ import annotations

import copy
import random
from typing import Callable

import torch
import torch.nn.functional as F

from ..workflow.tasks import model_inputs
from .stream import ContinualTask, concat_datasets


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in _trainable(model)}


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Strategy:
    """Base class: naive sequential fine-tuning (every hook does nothing)."""
    name = "naive"

    def setup(self, runner) -> None:
        """Once, before the first task (``runner.model``, ``runner.task``, ``runner.collator``)."""

    def before_task(self, runner, t: int, task: ContinualTask) -> None:
        """Before training task ``t``."""

    def train_dataset(self, runner, t: int, task: ContinualTask):
        return task.train

    def loss_fn(self, runner, t: int, task: ContinualTask) -> Callable | None:
        """``loss_fn(outputs, batch) -> loss`` for the Trainer, or None for the task's own loss."""
        return None

    def after_task(self, runner, t: int, task: ContinualTask) -> None:
        """After training task ``t``, before evaluating."""

    def route(self, runner, j: int, trained: int) -> None:
        """Prepare the model to evaluate task ``j`` after training tasks ``0..trained``."""

    def end_eval(self, runner, trained: int) -> None:
        """After the evaluations that follow training task ``trained``."""

    def report(self) -> dict:
        """Strategy settings and state for the result JSON."""
        return {"strategy": self.name}


class Naive(Strategy):
    name = "naive"


# --------------------------------------------------------------------------- EWC

def _log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(label)`` over the labelled positions of ONE example: logits ``(1, C)`` with labels
    ``(1,)``, or ``(1, L, C)`` with labels ``(1, L)`` (``-100`` ignored)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if logp.dim() == 2:
        return logp.gather(-1, labels.view(-1, 1)).sum()
    mask = labels != -100
    return logp[mask].gather(-1, labels[mask].view(-1, 1)).sum()


def diagonal_fisher(model, dataset, collator, *, samples: int | None = None, mode: str = "empirical",
                    seed: int = 0, logits_fn: Callable | None = None) -> dict:
    """Diagonal Fisher information of the trainable parameters of ``model`` on ``dataset``.

    ``F[name] = mean_x g(x)**2`` with ``g = d log p(y|x) / d theta`` for one example at a time
    (``mode="empirical"``: ``y`` the gold label; ``"expected"``: ``sum_c p(c|x) * g_c**2``, sequence
    classification only). ``samples`` examples drawn without replacement with ``seed`` (all when None).
    ``logits_fn(model, batch) -> logits`` defaults to ``model(**inputs).logits``. The model runs in eval
    mode (no dropout) and its ``.grad`` fields are not touched. Returns ``{name: tensor}`` shaped like each
    parameter (float32)."""
    if mode not in ("empirical", "expected"):
        raise ValueError(f"fisher_mode: expected 'empirical' or 'expected', got {mode!r}")
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise ValueError(f"fisher_samples: expected None or an integer >= 1, got {samples!r}")
    params = _trainable(model)
    if not params:
        raise ValueError("model: no trainable parameters to compute a Fisher for")
    n = len(dataset)
    idx = list(range(n))
    if samples is not None and samples < n:
        g = torch.Generator()
        g.manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=g)[:samples].tolist())
    logits_fn = logits_fn or (lambda m, b: m(**model_inputs(b)).logits)
    device = _device_of(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
    tensors = [p for _, p in params]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for i in idx:
                batch = collator([dataset[i]])
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                labels = batch.get("labels")
                logits = logits_fn(model, batch)
                if mode == "empirical":
                    if labels is None:
                        raise ValueError("dataset: the empirical Fisher needs labelled examples")
                    grads = torch.autograd.grad(_log_likelihoods(logits, labels), tensors, allow_unused=True)
                    for (name, _), gr in zip(params, grads):
                        if gr is not None:
                            fisher[name] += gr.float() ** 2
                else:
                    if logits.dim() != 2:
                        raise ValueError("fisher_mode: 'expected' supports sequence classification (2-D logits) "
                                         "only; use 'empirical'")
                    logp = F.log_softmax(logits.float(), dim=-1)[0]
                    probs = logp.detach().exp()
                    for c in range(logp.shape[0]):
                        grads = torch.autograd.grad(logp[c], tensors, retain_graph=c < logp.shape[0] - 1,
                                                    allow_unused=True)
                        for (name, _), gr in zip(params, grads):
                            if gr is not None:
                                fisher[name] += probs[c] * gr.float() ** 2
    finally:
        model.train(was)
    for name in fisher:
        fisher[name] /= len(idx)
    return fisher


class EWC(Strategy):
    """Elastic Weight Consolidation with an accumulated diagonal Fisher (see module docstring)."""
    name = "ewc"

    def __init__(self, ewc_lambda: float = 100.0, ewc_gamma: float = 1.0, fisher_samples: int | None = 200,
                 fisher_mode: str = "empirical", seed: int = 0):
        if not isinstance(ewc_lambda, (int, float)) or isinstance(ewc_lambda, bool) or ewc_lambda < 0:
            raise ValueError(f"ewc_lambda: expected a number >= 0, got {ewc_lambda!r}")
        if not isinstance(ewc_gamma, (int, float)) or not 0 <= ewc_gamma <= 1:
            raise ValueError(f"ewc_gamma: expected a number in [0, 1], got {ewc_gamma!r}")
        if fisher_samples is not None and (not isinstance(fisher_samples, int) or isinstance(fisher_samples, bool)
                                           or fisher_samples < 1):
            raise ValueError(f"fisher_samples: expected None or an integer >= 1, got {fisher_samples!r}")
        if fisher_mode not in ("empirical", "expected"):
            raise ValueError(f"fisher_mode: expected 'empirical' or 'expected', got {fisher_mode!r}")
        self.ewc_lambda, self.ewc_gamma = float(ewc_lambda), float(ewc_gamma)
        self.fisher_samples, self.fisher_mode, self.seed = fisher_samples, fisher_mode, seed
        self.fisher: dict | None = None
        self.anchor: dict | None = None

    def penalty(self, model) -> torch.Tensor:
        """``ewc_lambda / 2 * sum_k F[k] * (theta[k] - theta_star[k])**2`` (0 before the first Fisher)."""
        params = dict(model.named_parameters())
        total = None
        for name, f in (self.fisher or {}).items():
            p = params[name]
            term = (f.to(p.device) * (p.float() - self.anchor[name].to(p.device)) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=_device_of(model))
        return 0.5 * self.ewc_lambda * total

    def loss_fn(self, runner, t, task):
        if self.fisher is None or self.ewc_lambda == 0:
            return None
        model = runner.model

        def loss(outputs, batch):
            return outputs.loss + self.penalty(model)
        return loss

    def after_task(self, runner, t, task):
        f_t = diagonal_fisher(runner.model, task.train, runner.collator, samples=self.fisher_samples,
                              mode=self.fisher_mode, seed=self.seed + t)
        if self.fisher is None:
            self.fisher = f_t
        else:
            self.fisher = {n: self.ewc_gamma * self.fisher[n] + f_t[n] for n in f_t}
        self.anchor = {n: v.float() for n, v in _snapshot(runner.model).items()}

    def report(self):
        out = {"strategy": self.name, "ewc_lambda": self.ewc_lambda, "ewc_gamma": self.ewc_gamma,
               "fisher_samples": self.fisher_samples, "fisher_mode": self.fisher_mode}
        if self.fisher:
            out["fisher_mean"] = float(sum(f.sum() for f in self.fisher.values()) /
                                       sum(f.numel() for f in self.fisher.values()))
        return out


# --------------------------------------------------------------------------- L2-SP

class L2SP(Strategy):
    """L2 pull towards the task-start (or stream-start) parameters (see module docstring)."""
    name = "l2sp"

    def __init__(self, l2_lambda: float = 0.01, l2_anchor: str = "previous"):
        if not isinstance(l2_lambda, (int, float)) or isinstance(l2_lambda, bool) or l2_lambda < 0:
            raise ValueError(f"l2_lambda: expected a number >= 0, got {l2_lambda!r}")
        if l2_anchor not in ("previous", "initial"):
            raise ValueError(f"l2_anchor: expected 'previous' or 'initial', got {l2_anchor!r}")
        self.l2_lambda, self.l2_anchor = float(l2_lambda), l2_anchor
        self.anchor: dict | None = None

    def before_task(self, runner, t, task):
        if self.l2_anchor == "previous" or t == 0:
            self.anchor = {n: v.float() for n, v in _snapshot(runner.model).items()}

    def penalty(self, model) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = torch.zeros((), device=_device_of(model))
        for name, a in self.anchor.items():
            p = params[name]
            total = total + ((p.float() - a.to(p.device)) ** 2).sum()
        return 0.5 * self.l2_lambda * total

    def loss_fn(self, runner, t, task):
        if self.l2_lambda == 0 or (self.l2_anchor == "previous" and t == 0):
            return None
        model = runner.model

        def loss(outputs, batch):
            return outputs.loss + self.penalty(model)
        return loss

    def report(self):
        return {"strategy": self.name, "l2_lambda": self.l2_lambda, "l2_anchor": self.l2_anchor}


# --------------------------------------------------------------------------- replay

class ReservoirBuffer:
    """At most ``capacity`` items, a uniform sample of everything offered (algorithm R, seeded)."""

    def __init__(self, capacity: int, seed: int = 0):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"replay_size: expected a positive integer (the buffer's capacity), got {capacity!r}")
        self.capacity = capacity
        self.items: list = []
        self.n_seen = 0
        self._rng = random.Random(seed)

    def add(self, item) -> None:
        self.n_seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = self._rng.randrange(self.n_seen)
            if j < self.capacity:
                self.items[j] = item

    def extend(self, items) -> None:
        for it in items:
            self.add(it)

    def __len__(self) -> int:
        return len(self.items)


class Replay(Strategy):
    """Experience replay from a reservoir-sampled buffer (see module docstring)."""
    name = "replay"

    def __init__(self, replay_size: int = 200, seed: int = 0):
        self.buffer = ReservoirBuffer(replay_size, seed)
        self.replay_size = replay_size
        self.seed = seed

    def train_dataset(self, runner, t, task):
        if not len(self.buffer):
            return task.train
        return concat_datasets(task.train, [f for _, f in self.buffer.items])

    def after_task(self, runner, t, task):
        self.buffer.extend((t, f) for f in task.train.features)  # (task index, encoded example)

    def buffer_composition(self) -> dict:
        """``{task index: examples of that task in the buffer}``."""
        out: dict = {}
        for t, _ in self.buffer.items:
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))

    def report(self):
        return {"strategy": self.name, "replay_size": self.replay_size, "seed": self.seed,
                "buffer_len": len(self.buffer), "seen": self.buffer.n_seen,
                "buffer_per_task": {str(k): v for k, v in self.buffer_composition().items()}}


# --------------------------------------------------------------------------- per-task adapters

class PerTaskAdapters(Strategy):
    """One adapter and head per task, routed by task id (see module docstring)."""
    name = "per_task_adapters"

    def __init__(self, seed: int = 0):
        self.adapters: list[str] = []
        self.seed = seed
        self._config = None

    def setup(self, runner):
        m = runner.model
        for attr in ("add_adapter", "set_adapter", "peft_config"):
            if not hasattr(m, attr):
                raise ValueError(f"strategy: 'per_task_adapters' needs a PEFT model (fastpeft.get_peft_model) "
                                 f"with {attr}; got {type(m).__name__}")
        active = getattr(m, "active_adapters", None) or [m.active_adapter]
        if len(active) != 1:
            raise ValueError(f"model: 'per_task_adapters' needs exactly one active adapter, got {active}")
        self._first = active[0]
        self._config = copy.deepcopy(m.peft_config[self._first])
        self.adapters = []

    def before_task(self, runner, t, task):
        m = runner.model
        if t == 0:
            name = self._first
        else:
            name = f"task{t}_{task.name}"
            cfg = copy.deepcopy(self._config)
            cfg.inference_mode = False
            torch.manual_seed(self.seed + 1000 + t)  # the new adapter's initialisation
            m.add_adapter(name, cfg)
        self.adapters.append(name)
        self._activate(m, name)

    def _activate(self, m, name):
        m.set_adapter(name)
        frozen = [a for a in self.adapters if a != name]
        for pname, p in m.named_parameters():  # belt and braces: earlier adapters and heads stay frozen
            if any(f".{a}." in f".{pname}." for a in frozen):
                p.requires_grad_(False)

    def route(self, runner, j, trained):
        runner.model.set_adapter(self.adapters[min(j, trained)])

    def end_eval(self, runner, trained):
        self._activate(runner.model, self.adapters[trained])

    def report(self):
        return {"strategy": self.name, "adapters": list(self.adapters)}


# --------------------------------------------------------------------------- LwF

def lwf_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """``T**2 * KL(softmax(old/T) || softmax(new/T))`` averaged over examples (2-D logits ``(B, C)``) or
    over labelled positions (3-D ``(B, L, C)`` with ``labels != -100``)."""
    if new_logits.shape != old_logits.shape:
        raise ValueError(f"old_logits: shape {tuple(old_logits.shape)} differs from new_logits "
                         f"{tuple(new_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"lwf_temperature: expected > 0, got {temperature!r}")
    new, old = new_logits.float(), old_logits.float().detach()
    if new.dim() == 3:
        mask = (labels != -100) if labels is not None else torch.ones(new.shape[:2], dtype=torch.bool,
                                                                      device=new.device)
        new, old = new[mask], old[mask]
    if new.shape[0] == 0:
        return new.sum() * 0.0
    T = float(temperature)
    return T * T * F.kl_div(F.log_softmax(new / T, -1), F.log_softmax(old / T, -1), log_target=True,
                            reduction="batchmean")


class LwF(Strategy):
    """Distillation from a frozen copy of the previous model (see module docstring)."""
    name = "lwf"

    def __init__(self, lwf_alpha: float = 1.0, lwf_temperature: float = 2.0):
        if not isinstance(lwf_alpha, (int, float)) or isinstance(lwf_alpha, bool) or lwf_alpha < 0:
            raise ValueError(f"lwf_alpha: expected a number >= 0, got {lwf_alpha!r}")
        if not isinstance(lwf_temperature, (int, float)) or isinstance(lwf_temperature, bool) or lwf_temperature <= 0:
            raise ValueError(f"lwf_temperature: expected a number > 0, got {lwf_temperature!r}")
        self.lwf_alpha, self.lwf_temperature = float(lwf_alpha), float(lwf_temperature)
        self.prev = None

    def before_task(self, runner, t, task):
        self.prev = None
        if t > 0 and self.lwf_alpha > 0:
            self.prev = copy.deepcopy(runner.model)
            self.prev.eval()
            self.prev.requires_grad_(False)

    def loss_fn(self, runner, t, task):
        if self.prev is None:
            return None
        prev, alpha, T = self.prev, self.lwf_alpha, self.lwf_temperature

        def loss(outputs, batch):
            with torch.no_grad():
                old = prev(**model_inputs(batch)).logits
            return outputs.loss + alpha * lwf_distillation(outputs.logits, old, T, batch.get("labels"))
        return loss

    def after_task(self, runner, t, task):
        self.prev = None  # free the copy

    def report(self):
        return {"strategy": self.name, "lwf_alpha": self.lwf_alpha, "lwf_temperature": self.lwf_temperature}


# --------------------------------------------------------------------------- factory

STRATEGIES = {"naive": Naive, "ewc": EWC, "l2sp": L2SP, "replay": Replay, "per_task_adapters": PerTaskAdapters,
              "lwf": LwF}
STRATEGY_PARAMS = {"naive": (), "ewc": ("ewc_lambda", "ewc_gamma", "fisher_samples", "fisher_mode", "seed"),
                   "l2sp": ("l2_lambda", "l2_anchor"), "replay": ("replay_size", "seed"),
                   "per_task_adapters": ("seed",), "lwf": ("lwf_alpha", "lwf_temperature")}


def make_strategy(name: str, **params) -> Strategy:
    """``make_strategy("replay", replay_size=200, seed=0)``. Parameters that the strategy does not take are
    ignored only when their value is None; others raise ValueError naming them."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    allowed = STRATEGY_PARAMS[name]
    extra = sorted(k for k, v in params.items() if k not in allowed and v is not None)
    if extra:
        raise ValueError(f"{extra[0]}: not a parameter of strategy {name!r} (it takes {list(allowed) or 'none'})")
    return STRATEGIES[name](**{k: v for k, v in params.items() if k in allowed and v is not None})
