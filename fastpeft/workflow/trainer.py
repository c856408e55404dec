"""The training loop: :class:`Trainer` (and :func:`train`, its one-call form).

Optimisers AdamW / SGD+momentum (fused kernels where torch has them, else foreach), schedules
``linear`` (warm-up then linear decay to 0), ``cosine`` (warm-up then half-cosine to 0) and
``constant`` (warm-up then flat); weight decay only on weight matrices (not on biases and norm
parameters); gradient accumulation; mixed precision, loss scaling and clipping through ``fastpeft.amp``
(fp32 by default; FSDP runs use the scaler's ``grad_tail="torch"`` mode); validation every N optimizer steps
or each epoch; early stopping on a metric with patience / min-delta and the best trainable state restored at
the end; atomic checkpoints with everything needed to resume exactly (``resume_from``; the run's position is
a :class:`TrainState`); tqdm progress bar; JSONL metrics log; PNG curves; callbacks (data augmentation,
custom losses, adversarial training). Deterministic for a fixed seed on CPU.

Python use::

    trainer = Trainer(peft_model, task, train_ds, eval_ds, TrainerConfig(lr=1e-3, epochs=1, batch_size=32,
                      output_dir="runs/x", eval_every=100, patience=3), tokenizer=tok)
    result = trainer.train()        # {"best_metric", "best_step", "steps", "history", ...}
    trainer.evaluate()              # metrics on eval_ds

Callbacks are objects with any of ``on_train_begin(trainer)``, ``on_batch(trainer, batch) -> batch``
(data augmentation: return a modified batch), ``on_step_end(trainer, step, loss)``,
``on_evaluate(trainer, step, metrics)``, ``on_train_end(trainer, result)``. ``loss_fn(outputs, batch) ->
loss`` replaces the task's loss (custom losses). ``adversarial`` takes an object with
``step(model, batch, forward_fn) -> detached loss`` (``fastpeft.adversarial`` methods) which does its own
forward/backward passes; ``forward_fn(model, batch) -> (loss, logits)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import amp
from .._optional import import_extra
from . import checkpointing as ckpt
from . import distributed as D
from .data import EncodedDataset, make_loader
from .tasks import Task


# --------------------------------------------------------------------------- configuration

MAX_LR = 10.0                              # trainer.lr above this is refused at config time
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$")
#: exit status of ``fastpeft finetune`` for a run stopped (or finished) with non-finite losses
EXIT_DIVERGED = 3


@dataclass
class TrainerConfig:
    """Trainer options (the ``trainer:`` section of a YAML config)."""
    output_dir: str | None = None          # adapter, checkpoints, metrics.jsonl, curves.png go here
    optimizer: str = "adamw"               # adamw | sgd (SGD with momentum)
    lr: float = 1e-3
    weight_decay: float = 0.0              # applied to weight matrices only (not biases / norms)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9                  # SGD
    nesterov: bool = False                 # SGD
    fused: bool | None = None              # None: fused optimizer kernel when torch has one for the device
    scheduler: str = "linear"              # linear | cosine | constant (all after warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0              # used when warmup_steps == 0
    epochs: int = 1
    max_steps: int | None = None           # optimizer steps; overrides epochs
    batch_size: int = 32                   # per process and micro-batch
    eval_batch_size: int = 64
    grad_accum: int = 1                    # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0      # None or 0: no clipping
    precision: str = "fp32"                # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    eval_every: int | None = None          # optimizer steps; None: at the end of each epoch
    metric: str | None = None              # early-stopping / best-model metric (task default)
    mode: str | None = None                # max | min (task default)
    patience: int | None = None            # evaluations without improvement before stopping; None: never
    min_delta: float = 0.0                 # improvement must exceed this
    restore_best: bool = True              # load the best trainable state at the end
    save_every: int | None = None          # checkpoint every N optimizer steps (also at each evaluation)
    keep_checkpoints: int = 2
    resume_from: str | None = None         # checkpoint dir, or "latest" (newest in output_dir)
    seed: int = 0
    bucket_size: int = 0                   # >1: length-bucketed batches (chunks of bucket_size batches)
    drop_last: bool = False
    num_workers: int = 0
    progress: bool = True                  # tqdm bar
    log_every: int = 1                     # train records in metrics.jsonl every N steps
    plot: bool = True                      # curves.png at the end
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    distributed: str = "auto"              # auto (DDP when WORLD_SIZE>1) | none | ddp | fsdp
    deterministic: bool = False            # torch.use_deterministic_algorithms(True)
    on_nonfinite: str = "stop"             # a non-finite loss / gradient: stop the run | skip the step and go on
    overwrite: bool = False                # start in an output_dir that holds another run (deleting that run)
    fuse_base: bool = True                 # tasks with a fused base (causal_lm): fastpeft.patch_model the model

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainerConfig":
        def bad(name, expected):
            raise ValueError(f"trainer.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.optimizer not in ("adamw", "sgd"):
            bad("optimizer", "'adamw' or 'sgd'")
        if self.scheduler not in ("linear", "cosine", "constant"):
            bad("scheduler", "'linear', 'cosine' or 'constant'")
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad("precision", "'fp32', 'bf16' or 'fp16'")
        if self.mode not in (None, "max", "min"):
            bad("mode", "'max' or 'min'")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            bad("distributed", "'auto', 'none', 'ddp' or 'fsdp'")
        if self.on_nonfinite not in ("stop", "skip"):
            bad("on_nonfinite", "'stop' or 'skip'")
        for name in ("lr", "weight_decay", "eps", "momentum", "warmup_ratio", "min_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "a finite number")
        if not 0 < self.lr <= MAX_LR:
            bad("lr", f"a number in (0, {MAX_LR:g}] (a larger rate diverges at once)")
        if not self.eps > 0:
            bad("eps", "a positive number")
        if not 0 <= self.momentum < 1:
            bad("momentum", "a number in [0, 1)")
        if self.min_delta < 0:
            bad("min_delta", ">= 0")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            bad("max_grad_norm", "None or a finite number >= 0")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            bad("betas", "two numbers in [0, 1)")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            bad("keep_checkpoints", "an integer >= 1")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "epochs", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                bad(name, "an integer >= 1")
        for name in ("max_steps", "eval_every", "save_every", "patience"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                bad(name, "None or an integer >= 1")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "a number in [0, 1)")
        if self.warmup_steps < 0:
            bad("warmup_steps", "an integer >= 0")
        if self.weight_decay < 0:
            bad("weight_decay", ">= 0")
        if not isinstance(self.fuse_base, bool):
            bad("fuse_base", "true or false")
        self.betas = tuple(self.betas)
        return self


# --------------------------------------------------------------------------- building blocks

def _finite(v) -> bool:
    """A metric value that can rank runs: a finite number (None / NaN / inf cannot)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    lname = name.lower()
    return p.ndim <= 1 or lname.endswith(".bias") or "norm" in lname or "layernorm" in lname


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into (decay, no-decay) groups; biases, norms and 1-D params get no decay."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(n, p) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (did you apply an adapter / unfreeze a head?)")
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    else:
        cls, kw = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    fused = cfg.fused
    if fused is None or fused:
        try:
            return cls(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError) as e:
            if fused:
                raise ValueError(f"trainer.fused: torch has no fused {cfg.optimizer} here ({e})") from None
    return cls(groups, foreach=True, **kw) if fused is None else cls(groups, **kw)


class Schedule:
    """Multiplier of the base LR at optimizer step ``s`` (a picklable callable for ``LambdaLR``)."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, int(warmup), max(int(total), 1)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        frac = min(max((s - self.warmup) / max(self.total - self.warmup, 1), 0.0), 1.0)
        if self.kind == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))


def build_scheduler(optimizer, cfg: TrainerConfig, total_steps: int):
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg.scheduler, warmup, total_steps))


def _resolve_device(name: str, info: D.DistInfo) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"trainer.device: {name!r} asked for, but {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"trainer.device: {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) "
                             f"are visible")
    return dev


def _flatten_state(sd: dict, prefix: str) -> dict:
    out = {}
    for k, v in sd.items():
        if torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def _scaler_state(meta: dict, tensors: dict) -> dict:
    """The loss scaler's state from a checkpoint, in ``fastpeft.amp.GradScaler``'s format. FSDP checkpoints
    written before the scaler had its ``grad_tail="torch"`` mode hold ``{scale, good, precision}`` (a
    scaler with the default growth / backoff factors and interval): read them as such."""
    sd = dict(meta.get("scaler", {}))
    sd.update({k[7:]: v for k, v in tensors.items() if k.startswith("scaler.")})
    if "good" in sd and "_growth_tracker" not in sd:
        sd = {"scale": sd["scale"], "_growth_tracker": sd["good"], "precision": sd["precision"],
              "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    return sd


# --------------------------------------------------------------------------- the trainer

@dataclass
class TrainState:
    """Where a run is; everything but ``best_state`` is written to a checkpoint's ``state.json`` under
    these names (``best_state``, name -> tensor, goes to ``state.safetensors`` as ``best.*``)."""
    step: int = 0                          # optimizer steps taken
    epoch: int = 0                         # epochs completed
    batch_in_epoch: int = 0                # (global) batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0                     # evaluations since the last improvement (patience)
    examples: int = 0                      # training examples seen, all ranks together
    skipped_steps: int = 0                 # optimizer steps skipped for non-finite gradients
    nonfinite_steps: int = 0               # steps with a non-finite loss (or gradients, outside fp16 scaling)
    first_nonfinite_step: int | None = None
    best_state: dict | None = None         # trainable parameters at best_step

    def to_meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_state"}

    @classmethod
    def from_checkpoint(cls, meta: dict, best_state: dict | None) -> "TrainState":
        """From a checkpoint's ``state.json`` (other keys ignored; a missing one keeps its default)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"best_state"}
        return cls(**{k: v for k, v in meta.items() if k in names}, best_state=best_state or None)


@dataclass
class _Run:
    """What one ``train()`` call works through: the batches and the step budget, and the throughput clock."""
    loader: torch.utils.data.DataLoader
    batches_per_epoch: int
    total_steps: int
    t0: float
    examples_since: int = 0
    time_since: float = 0.0


class Trainer:
    """Fine-tune the trainable parameters of ``model`` on ``train_data`` (see module docstring).

    ``train()`` is :meth:`_setup`, then :meth:`_optimizer_step` (one step over ``grad_accum`` micro-batches),
    :meth:`_record_step` and :meth:`_evaluate_and_checkpoint` per step until ``max_steps`` / ``epochs`` or
    early stopping, then :meth:`_finish`; :attr:`state` (a :class:`TrainState`) is what checkpoints restore.
    """

    def __init__(self, model: torch.nn.Module, task: Task, train_data: EncodedDataset,
                 eval_data: EncodedDataset | None = None, config: TrainerConfig | None = None, *,
                 tokenizer=None, collator=None, callbacks: list | None = None,
                 loss_fn: Callable | None = None, adversarial=None, save_adapter: Callable | None = None,
                 extra_files: dict | None = None):
        self.config = (config or TrainerConfig()).validate()
        self.model = model
        self.task = task
        self.train_data = train_data
        self.eval_data = eval_data
        self.tokenizer = tokenizer
        self.collator = collator or task.collator(tokenizer)
        self.callbacks = list(callbacks or [])
        self.loss_fn = loss_fn
        self.adversarial = adversarial
        self._save_adapter = save_adapter
        self.extra_files = extra_files or {}
        self.history: list[dict] = []
        self.state = TrainState()
        self.wrapped = model
        self.info = D.DistInfo()
        self.device = torch.device("cpu")
        self.pbar = None
        self.resumed_from = None

    # ---- helpers -------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return D.unwrap(self.wrapped)

    def trainable_state(self) -> dict:
        """name -> detached CPU copy of every trainable parameter (names of the unwrapped model)."""
        return {n: D.full_tensor(p.detach()).cpu().clone() for n, p in self.module.named_parameters()
                if p.requires_grad}

    def load_trainable_state(self, sd: dict) -> None:
        params = dict(self.module.named_parameters())
        missing = [n for n in sd if n not in params]
        if missing:
            raise ValueError(f"checkpoint has parameters the model lacks: {missing[:5]}")
        shapes = [f"{n}: checkpoint {list(v.shape)}, model {list(params[n].shape)}" for n, v in sd.items()
                  if tuple(v.shape) != tuple(params[n].shape)]
        if shapes:
            raise ValueError(f"checkpoint parameters have other shapes than the model's (another rank, target or "
                             f"model?): {'; '.join(shapes[:3])}")
        with torch.no_grad():
            for n, v in sd.items():
                params[n].copy_(D.like_param(v.to(params[n].device, params[n].dtype), params[n]))

    def forward(self, model, batch):
        """(loss, logits) of the task, with ``loss_fn`` replacing the task loss when given."""
        if self.loss_fn is None:  # (a task's own forward(model, batch) need not know about loss_fn)
            return self.task.forward(model, batch)
        return self.task.forward(model, batch, loss_fn=self.loss_fn)

    def _autocast(self):
        """Autocast to ``config.precision`` on the training device (a null context for fp32)."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return amp.autocast(self.device.type, self.config.precision)

    def _callback(self, name: str, *args):
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                r = fn(self, *args)
                if name == "on_batch" and r is not None:
                    args = (r,)
        return args[0] if name == "on_batch" and args else None

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main and self.config.output_dir:
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(ckpt._json_safe(record)) + "\n")

    def _eval_loader(self, data):
        return make_loader(data, self.collator, self.config.eval_batch_size, shuffle=False)

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: EncodedDataset | None = None) -> dict:
        """Task metrics on ``data`` (default: the validation set). Every rank evaluates the whole set."""
        data = data if data is not None else self.eval_data
        if data is None:
            raise ValueError("evaluate: no evaluation data")
        model = self.wrapped if D.is_fsdp(self.wrapped) else self.module
        was = model.training
        model.eval()
        try:
            with self._autocast():
                return self.task.evaluate(model, self._eval_loader(data), data)
        finally:
            model.train(was)

    # ---- checkpoints ---------------------------------------------------------------------
    def _gathered_adapter_state(self) -> dict | None:
        """Under FSDP2: the adapter state dict (PEFT on-disk keys) gathered to full tensors. A collective:
        every rank calls it. None when not sharded (save_pretrained then reads the model directly)."""
        if not D.is_fsdp(self.wrapped):
            return None
        mod = self.module
        if hasattr(mod, "get_adapter_state_dict"):
            sd = mod.get_adapter_state_dict()
        else:
            from peft import get_peft_model_state_dict
            sd = get_peft_model_state_dict(mod)
        return {k: D.full_tensor(v.detach()).cpu().contiguous() for k, v in sd.items()}

    def _save_adapter_to(self, path: str, gathered: dict | None = None) -> None:
        mod = self.module
        if gathered is not None:  # FSDP2: write the gathered tensors in the PEFT layout ourselves
            from safetensors.torch import save_file
            os.makedirs(path, exist_ok=True)
            save_file(gathered, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
            cfg = mod.peft_config["default"]
            cfg.inference_mode = True
            try:
                cfg.save_pretrained(path)
            finally:
                cfg.inference_mode = False
        elif self._save_adapter is not None:
            self._save_adapter(mod, path)
        elif hasattr(mod, "peft_config") and hasattr(mod, "save_pretrained"):
            mod.save_pretrained(path)
        else:
            from safetensors.torch import save_file
            os.makedirs(path, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.trainable_state().items()},
                      os.path.join(path, "trainable.safetensors"))
        files = dict(self.extra_files)
        if ckpt.TASK_FILE not in files and hasattr(self.task, "state"):  # evaluate / predict load it
            files[ckpt.TASK_FILE] = json.dumps(self._task_info(), indent=1)
        for name, content in files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(content)

    def _task_info(self) -> dict:
        """``fastpeft_task.json`` for an adapter of a run started from Python (``fastpeft finetune`` writes its
        own, with the data columns): the task, its labels and the base model."""
        mod = self.module
        model = None
        pcs = getattr(mod, "peft_config", None)
        if isinstance(pcs, dict) and pcs:
            model = getattr(next(iter(pcs.values())), "base_model_name_or_path", None)
        if not model:
            model = getattr(getattr(mod, "config", None), "_name_or_path", None) or None
        return dict(self.task.state(), model=model, max_length=None, data={})

    def save_checkpoint(self, path: str | None = None) -> str | None:
        cfg = self.config
        if not cfg.output_dir and path is None:
            return None
        path = path or os.path.join(cfg.output_dir, f"checkpoint-{self.state.step}")
        trainable = self.trainable_state()  # collective under FSDP: every rank calls it
        opt_sd = self.optimizer.state_dict()
        opt_sd = {"param_groups": opt_sd["param_groups"],
                  "state": {i: {k: (D.full_tensor(v) if torch.is_tensor(v) else v) for k, v in st.items()}
                            for i, st in opt_sd["state"].items()}}
        gathered = self._gathered_adapter_state()
        if not self.info.is_main:
            return path
        tensors = _flatten_state(trainable, "model.")
        if self.state.best_state is not None:
            tensors.update(_flatten_state(self.state.best_state, "best."))
        opt_t, opt_m = ckpt.optimizer_to_flat(opt_sd)
        tensors.update(opt_t)
        rng_t, rng_m = ckpt.rng_state()
        tensors.update(rng_t)
        scaler_sd = self.scaler.state_dict()
        tensors.update({f"scaler.{k}": v for k, v in scaler_sd.items() if torch.is_tensor(v)})
        meta = self.state.to_meta()
        meta.update(signature=self.run_signature(getattr(self, "_batches_per_epoch", None)))
        meta.update(optimizer=opt_m, rng=rng_m, scheduler=self.scheduler.state_dict(),
                    scaler={k: v for k, v in scaler_sd.items() if not torch.is_tensor(v)},
                    history=self.history, config=dataclasses.asdict(cfg), world_size=self.info.world_size)
        meta["scheduler"].pop("lr_lambdas", None)
        ckpt.save_checkpoint(path, tensors=tensors, meta=meta,
                             save_adapter=lambda d: self._save_adapter_to(d, gathered))
        ckpt.prune_checkpoints(cfg.output_dir if path.startswith(str(cfg.output_dir)) else os.path.dirname(path),
                               cfg.keep_checkpoints)
        return path

    def run_signature(self, batches_per_epoch: int | None = None) -> dict:
        """What a checkpoint must share with the run that resumes it: the data's size and batching (the saved
        position in the epoch means nothing otherwise), the model and the PEFT method (the trainable
        parameters' names and shapes). Written into every checkpoint's ``state.json`` as ``signature``."""
        cfg = self.config
        sig = {"train_examples": len(self.train_data), "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
               "world_size": self.info.world_size, "drop_last": cfg.drop_last, "bucket_size": cfg.bucket_size}
        if batches_per_epoch is not None:
            sig["batches_per_epoch"] = batches_per_epoch
        mod = self.module
        mcfg = getattr(mod, "config", None)
        if mcfg is not None and not isinstance(mcfg, dict):
            sig["model"] = {k: getattr(mcfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                                "vocab_size")}
        pcs = getattr(mod, "peft_config", None)
        if isinstance(pcs, dict) and pcs:
            pc = next(iter(pcs.values()))
            tm = getattr(pc, "target_modules", None)
            sig["method"] = {"peft_type": str(getattr(getattr(pc, "peft_type", None), "value",
                                                      getattr(pc, "peft_type", None))),
                             "r": getattr(pc, "r", None),
                             "target_modules": sorted(tm) if isinstance(tm, (set, list, tuple)) else tm}
        sig["trainable"] = {n: list(p.shape) for n, p in mod.named_parameters() if p.requires_grad}
        return sig

    def _check_signature(self, path: str, meta: dict) -> None:
        """Refuse a checkpoint written by another kind of run, explaining each difference."""
        saved = meta.get("signature")
        if saved is None:  # an older checkpoint: what its config recorded
            old = meta.get("config") or {}
            saved = {k: old[k] for k in ("batch_size", "grad_accum") if k in old}
        now = self.run_signature(self._batches_per_epoch)
        diffs = []
        for key in ("model", "method", "train_examples", "batch_size", "grad_accum", "world_size", "drop_last",
                    "bucket_size", "batches_per_epoch"):
            if key not in saved or key not in now:
                continue
            a, b = saved[key], now[key]
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{key}.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
                          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                diffs.append(f"{key}: checkpoint {a!r}, this run {b!r}")
        if "trainable" in saved:
            a, b = saved["trainable"], now["trainable"]
            gone, new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            if gone or new:
                diffs.append(f"trainable parameters: {len(gone)} only in the checkpoint {gone[:2]}, {len(new)} only "
                             f"in this run {new[:2]}")
            shapes = [f"{n} {a[n]} vs {b[n]}" for n in sorted(set(a) & set(b)) if list(a[n]) != list(b[n])]
            if shapes:
                diffs.append(f"parameter shapes (checkpoint vs this run): {'; '.join(shapes[:2])}")
        if diffs:
            raise ValueError(f"resume_from: {path} was written by a different run: " + "; ".join(diffs) +
                             ". Resume with the settings it was written with, or start a new run (another "
                             "output_dir, or trainer.overwrite / --overwrite).")

    def _resume(self, path: str) -> None:
        if path == "latest":
            found = ckpt.checkpoints(self.config.output_dir or "")
            if not found:
                warnings.warn(f"resume_from='latest': no checkpoint in {self.config.output_dir!r}; starting fresh")
                if self.info.is_main and self.config.output_dir:
                    open(os.path.join(self.config.output_dir, "metrics.jsonl"), "w").close()
                return
            errors = []
            for cand in found:  # newest first; an unreadable one (torn by a crash) falls back to the previous
                try:
                    tensors, meta = ckpt.load_checkpoint(cand, ckpt.REQUIRED_META)
                except (ValueError, OSError) as e:
                    errors.append(f"{os.path.basename(cand)}: {e}")
                    continue
                if errors:
                    msg = (f"resume_from='latest': {'; '.join(errors)}; resuming from the previous good checkpoint "
                           f"{os.path.basename(cand)}")
                    warnings.warn(msg)
                    if self.info.is_main:
                        print(f"fastpeft: {msg}", file=sys.stderr)
                path = cand
                break
            else:
                raise ValueError(f"resume_from='latest': no readable checkpoint in {self.config.output_dir!r}: "
                                 + "; ".join(errors))
        else:
            tensors, meta = ckpt.load_checkpoint(path, ckpt.REQUIRED_META)
        self._check_signature(path, meta)
        self.load_trainable_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        opt_sd = ckpt.optimizer_from_flat(tensors, meta["optimizer"])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, st in opt_sd["state"].items():  # re-shard state of FSDP2 (DTensor) parameters
            for k, v in st.items():
                if torch.is_tensor(v) and i < len(params):
                    st[k] = D.like_param(v, params[i])
        self.optimizer.load_state_dict(opt_sd)
        sched = dict(meta["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        scaler_sd = _scaler_state(meta, tensors)
        if scaler_sd:
            self.scaler.load_state_dict(scaler_sd)
        ckpt.set_rng_state(tensors, meta["rng"])
        self.state = TrainState.from_checkpoint(meta, best)
        if self.state.batch_in_epoch >= self._batches_per_epoch:
            raise ValueError(f"resume_from: {path} stopped at batch {self.state.batch_in_epoch} of an epoch, but "
                             f"this run's epochs have {self._batches_per_epoch} batches (other data size or batch "
                             f"size); resume with the settings it was written with, or start a new run")
        self.history = list(meta.get("history", []))
        if self.info.is_main and self.config.output_dir:  # rewrite the log to match the checkpoint
            with ckpt.atomic_write(os.path.join(self.config.output_dir, "metrics.jsonl")) as f:
                for r in self.history:
                    f.write(json.dumps(r) + "\n")
        self.resumed_from = path

    # ---- training: setup -----------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        """Refuse an output_dir that is a file, or that holds another run (unless resuming it or
        ``overwrite``); delete what killed writers left there (hidden temporaries) and, with ``overwrite``,
        the previous run."""
        cfg, out = self.config, self.config.output_dir
        held = ckpt.check_output_dir(out, resume=bool(cfg.resume_from), overwrite=cfg.overwrite)
        if not self.info.is_main:
            return
        os.makedirs(out, exist_ok=True)
        removed = ckpt.remove_stale_temporaries(out)
        if removed:
            print(f"fastpeft: removed {len(removed)} temporary file(s) a killed run left in {out}: "
                  f"{', '.join(os.path.basename(p) for p in removed[:3])}", file=sys.stderr)
        if held and cfg.overwrite and not cfg.resume_from:
            ckpt.clear_run(out)

    def _setup(self) -> _Run:
        """Processes, device, seeds, the wrapped model, batches, scaler / optimizer / schedule, a fresh
        or resumed :attr:`state`; calls ``on_train_begin``."""
        cfg = self.config
        self.info = D.init_from_env() if cfg.distributed in ("auto", "ddp", "fsdp") else D.DistInfo()
        if cfg.distributed in ("ddp", "fsdp") and not self.info.enabled:
            warnings.warn(f"trainer.distributed={cfg.distributed!r} but WORLD_SIZE<=1: training on one process")
        self.device = _resolve_device(cfg.device, self.info)
        if cfg.precision == "fp16" and self.device.type == "cpu":
            warnings.warn("fp16 on CPU is slow and rarely useful; prefer bf16 or fp32")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if cfg.output_dir:
            self._prepare_output_dir()
        self.metric = cfg.metric or self.task.default_metric
        self.mode = cfg.mode or (self.task.default_mode if cfg.metric is None else self.task.metric_mode(self.metric))
        if cfg.fuse_base and hasattr(self.task, "fuse_base"):  # causal_lm: fastpeft.patch_model
            self.fuse_summary = self.task.fuse_base(self.model, loss=self.loss_fn is None and self.adversarial is None)
        self.model.to(self.device)
        if self.info.enabled:
            kind = "ddp" if cfg.distributed == "auto" else cfg.distributed
            self.wrapped = D.wrap_model(self.model, kind, self.device)
        else:
            self.wrapped = self.model

        loader = make_loader(self.train_data, self.collator, cfg.batch_size, shuffle=True, seed=cfg.seed,
                             bucket_size=cfg.bucket_size, drop_last=cfg.drop_last, rank=self.info.rank,
                             world_size=self.info.world_size, num_workers=cfg.num_workers)
        batches_per_epoch = len(loader.batch_sampler.global_batches(0))
        self._batches_per_epoch = batches_per_epoch
        if batches_per_epoch == 0:
            raise ValueError("training data gives no batch (fewer examples than processes, or drop_last)")
        total_steps = cfg.max_steps or cfg.epochs * math.ceil(batches_per_epoch / cfg.grad_accum)

        # FSDP2 gradients are DTensors, which the fused grad-tail op cannot take: the scaler's torch mode then
        tail = "torch" if D.is_fsdp(self.wrapped) else "fused"
        self.scaler = amp.GradScaler(precision=cfg.precision, grad_tail=tail)
        self.optimizer = build_optimizer(self.module, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.state = TrainState()
        self.history = []
        self.resumed_from = None
        if self.info.is_main and cfg.output_dir and not cfg.resume_from:
            open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w").close()
        if cfg.resume_from:
            self._resume(cfg.resume_from)
        self.optimizer.zero_grad(set_to_none=True)
        self._callback("on_train_begin")

        self.pbar = None
        if cfg.progress and self.info.is_main:
            tqdm = import_extra("tqdm.auto", "the trainer's progress bar (trainer.progress: false turns it off)").tqdm
            self.pbar = tqdm(total=total_steps, initial=self.state.step, desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        return _Run(loader, batches_per_epoch, total_steps, t0, time_since=t0)

    # ---- training: one optimizer step ----------------------------------------------------
    def _adversarial_step(self, model, batch, n: int) -> float:
        """``adversarial.step(model, batch, forward_fn, backward=...)``: the method runs its own forward /
        backward passes; ``backward`` applies loss scaling and the 1/n accumulation factor."""

        def forward_fn(m, b):
            with self._autocast():
                loss, logits = self.forward(m, b)
            return loss.float(), logits

        step = self.adversarial.step
        params = inspect.signature(step).parameters
        if "backward" in params:
            extra = {}
            if "loss_scale" in params:  # SMART: its inner ascent gradients need the fp16 scale too
                extra["loss_scale"] = float(self.scaler.scale(torch.ones((), device=self.device)))
            return float(step(model, batch, forward_fn, backward=lambda l: self.scaler.scale(l / n).backward(),
                              **extra))
        # methods without a backward hook call loss.backward() themselves: fold the factors into the loss
        unit = float(self.scaler.scale(torch.ones((), device=self.device))) / n

        def scaled_forward(m, b):
            loss, logits = forward_fn(m, b)
            return loss * unit, logits

        return float(step(model, batch, scaled_forward)) / unit

    def _optimizer_step(self, micro: list[dict]) -> float:
        """Forward / backward over the micro-batches (gradients summed, synchronised on the last), then
        unscale, clip and step (skipped when a gradient is non-finite); the mean loss of the micro-batches."""
        model = self.wrapped
        model.train()
        n = len(micro)
        total = 0.0
        for i, batch in enumerate(micro):
            batch = self._callback("on_batch", batch)
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            last = i == n - 1
            with D.no_sync(model, skip=self.info.enabled and not last):
                if self.adversarial is not None:
                    total += self._adversarial_step(model, batch, n) / n
                else:
                    with self._autocast():
                        loss, _ = self.forward(model, batch)
                    self.scaler.scale(loss.float() / n).backward()
                    total += float(loss.detach()) / n
        stepped = self.scaler.step(self.optimizer, max_norm=self.config.max_grad_norm or None)
        self.scaler.update()
        self._last_skipped = not stepped
        if stepped:
            self.scheduler.step()
        else:
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _micro_batch_groups(self, run: _Run):
        """The rest of the current epoch (from ``state.batch_in_epoch``) in groups of ``grad_accum``
        micro-batches; the last group of an epoch may be smaller."""
        run.loader.batch_sampler.set_epoch(self.state.epoch, start_batch=self.state.batch_in_epoch)
        it = iter(run.loader)
        while True:
            micro = list(itertools.islice(it, self.config.grad_accum))
            if not micro:
                return
            yield micro

    def _record_step(self, run: _Run, micro: list[dict], loss: float) -> bool:
        """Advance :attr:`state` past the step just taken, log it; True when it completed an epoch."""
        cfg, st = self.config, self.state
        n_ex = sum(self.task.num_examples(b) for b in micro) * self.info.world_size
        st.step += 1
        st.batch_in_epoch += len(micro)
        st.examples += n_ex
        run.examples_since += n_ex
        at_epoch_end = st.batch_in_epoch >= run.batches_per_epoch
        if at_epoch_end:
            st.epoch += 1
            st.batch_in_epoch = 0
        lr = self.optimizer.param_groups[0]["lr"]
        if st.step % cfg.log_every == 0 or st.step == run.total_steps:
            now = time.perf_counter()
            self._log({"type": "train", "step": st.step, "epoch": st.epoch, "loss": loss, "lr": lr,
                       "examples_per_s": run.examples_since / max(now - run.time_since, 1e-9)})
            run.examples_since, run.time_since = 0, now
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                  ex_s=f"{st.examples / max(time.perf_counter() - run.t0, 1e-9):.1f}")
        return at_epoch_end

    # ---- training: evaluation and checkpoints --------------------------------------------
    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.config.min_delta
        return value < best - self.config.min_delta

    def _do_eval(self) -> bool:
        """Evaluate, track the best state; True when early stopping says stop."""
        if self.eval_data is None:
            return False
        metrics = self.evaluate()
        st = self.state
        if self.metric not in metrics:
            raise ValueError(f"trainer.metric: {self.metric!r} is not among the task's metrics {sorted(metrics)}")
        value = metrics[self.metric]
        rec = {"type": "eval", "step": st.step, "epoch": st.epoch, **metrics}
        candidate = None
        if _finite(value) and _finite(metrics.get("loss", 0.0)) and self._improved(value):
            candidate = self.trainable_state()
            if not all(bool(torch.isfinite(v).all()) for v in candidate.values()):
                candidate = None  # never a non-finite state as the best
        if candidate is not None:
            st.best_metric, st.best_step, st.bad_evals = value, st.step, 0
            st.best_state = candidate
            rec["best"] = True
        else:
            st.bad_evals += 1
        self._log(rec)
        self._callback("on_evaluate", st.step, metrics)
        line = f"step {st.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if self.pbar is not None:
            self.pbar.write(line)
        elif self.info.is_main:  # no progress bar: the evaluations still show (on stderr, stdout is the result)
            print(line, file=sys.stderr, flush=True)
        return self.config.patience is not None and st.bad_evals >= self.config.patience

    def _evaluate_and_checkpoint(self, run: _Run, at_epoch_end: bool) -> bool:
        """Evaluate when due (every ``eval_every`` steps, else at each epoch end; and after the last step)
        and checkpoint when due (every ``save_every`` steps, and at each evaluation but the last, which
        :meth:`_finish` saves); True when early stopping says stop."""
        cfg, step = self.config, self.state.step
        last = step >= run.total_steps
        due = (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and at_epoch_end) or last
        evaluated = bool(due) and self.eval_data is not None
        stop = self._do_eval() if evaluated else False
        if (cfg.save_every and step % cfg.save_every == 0) or (evaluated and cfg.output_dir and not last):
            self.save_checkpoint()
        return stop

    # ---- training: finish ----------------------------------------------------------------
    def _finish(self, run: _Run, early_stopped: bool) -> dict:
        """Final checkpoint, best state restored, adapter / curves / result.json written; the result dict."""
        cfg, st = self.config, self.state
        elapsed = time.perf_counter() - run.t0
        if early_stopped:
            self._log({"type": "early_stop", "step": st.step, "best_step": st.best_step,
                       "best_metric": st.best_metric})
        diverged = self.divergence_message()
        final_finite = all(bool(torch.isfinite(v).all()) for v in self.trainable_state().values())
        if cfg.output_dir and final_finite:  # the final state (before restoring the best), to continue later
            self.save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{st.step}"))
        if st.best_state is not None and (cfg.restore_best or diverged):
            self.load_trainable_state(st.best_state)
        # the adapter written: the best state (finite by construction), else the final one if it is finite and
        # the run did not diverge; a diverged run without a good evaluation before it writes none
        write_adapter = st.best_state is not None if diverged else (final_finite or st.best_state is not None)
        result = {"steps": st.step, "epochs": st.epoch, "metric": self.metric, "mode": self.mode,
                  "best_metric": st.best_metric, "best_step": st.best_step, "early_stopped": early_stopped,
                  "train_seconds": elapsed, "examples": st.examples, "skipped_steps": st.skipped_steps,
                  "nonfinite_steps": st.nonfinite_steps, "diverged": diverged, "resumed_from": self.resumed_from,
                  "losses": [h["loss"] for h in self.history if h["type"] == "train"]}
        if diverged:
            result["adapter"] = (f"the best state before it (step {st.best_step})" if write_adapter else
                                 "none written (no finite evaluated state to save)")
            self._log({"type": "diverged", "step": st.step, "nonfinite_steps": st.nonfinite_steps,
                       "first_nonfinite_step": st.first_nonfinite_step})
            warnings.warn(diverged + f" Adapter: {result['adapter']}.", RuntimeWarning)
        if cfg.output_dir:
            gathered = self._gathered_adapter_state() if write_adapter else None
            if self.info.is_main and write_adapter:
                with ckpt.atomic_dir(os.path.join(cfg.output_dir, "adapter")) as tmp:
                    self._save_adapter_to(tmp, gathered)
            if self.info.is_main:
                if cfg.plot:
                    from .plotting import plot_curves
                    result["curves"] = plot_curves(self.history, os.path.join(cfg.output_dir, "curves.png"),
                                                   self.metric)
                with ckpt.atomic_write(os.path.join(cfg.output_dir, "result.json")) as f:
                    json.dump(ckpt._json_safe({k: v for k, v in result.items() if k != "losses"}), f, indent=1)
        D.barrier(self.info)
        result["history"] = self.history
        self._callback("on_train_end", result)
        return result

    def train(self) -> dict:
        """Train until ``max_steps`` (else ``epochs``) or early stopping; returns ``{"steps", "epochs",
        "metric", "mode", "best_metric", "best_step", "early_stopped", "losses", "history", ...}``."""
        run = self._setup()
        stop = False
        self._diverged = False
        try:
            while self.state.step < run.total_steps and not stop:
                progressed = False
                for micro in self._micro_batch_groups(run):
                    progressed = True
                    loss = D.all_reduce_mean(self._optimizer_step(micro), self.info)
                    bad = self._nonfinite(loss)
                    at_epoch_end = self._record_step(run, micro, loss)
                    if bad and self.config.on_nonfinite == "stop":
                        stop = self._diverged = True
                        break
                    stop = self._evaluate_and_checkpoint(run, at_epoch_end)
                    self._callback("on_step_end", self.state.step, loss)
                    if stop or at_epoch_end or self.state.step >= run.total_steps:
                        break
                if not progressed:  # nothing left in this epoch (cannot happen after _resume's checks)
                    raise RuntimeError(f"trainer: epoch {self.state.epoch} has no batch left after batch "
                                       f"{self.state.batch_in_epoch}")
        finally:
            if self.pbar is not None:
                self.pbar.close()
        return self._finish(run, stop and not self._diverged)

    def _nonfinite(self, loss: float) -> bool:
        """Count a step whose loss is non-finite, or whose gradients were (a skipped step outside fp16's
        loss scaling, where skipping an overflowing scale is routine)."""
        st = self.state
        bad = not math.isfinite(loss) or (getattr(self, "_last_skipped", False) and self.config.precision != "fp16")
        if bad:
            st.nonfinite_steps += 1
            if st.first_nonfinite_step is None:
                st.first_nonfinite_step = st.step + 1
        return bad

    def divergence_message(self) -> str | None:
        """Why the run's result cannot be trusted (non-finite losses / gradients), or None."""
        st = self.state
        if not st.nonfinite_steps:
            return None
        how = ("stopped there (trainer.on_nonfinite: stop)" if self._diverged else
               f"{st.nonfinite_steps} of {st.step} optimizer steps had a non-finite loss or gradients and were "
               f"skipped (trainer.on_nonfinite: skip)")
        return (f"training diverged: the loss or the gradients became non-finite (NaN/inf) at step "
                f"{st.first_nonfinite_step}; {how}. Usually the learning rate is too high (trainer.lr "
                f"{self.config.lr:g}) or the data holds extreme values.")


def train(model, task, train_data, eval_data=None, config: TrainerConfig | dict | None = None, **kwargs) -> dict:
    """One call: ``Trainer(model, task, train_data, eval_data, config, **kwargs).train()``."""
    if isinstance(config, dict):
        config = TrainerConfig(**config)
    return Trainer(model, task, train_data, eval_data, config, **kwargs).train()
