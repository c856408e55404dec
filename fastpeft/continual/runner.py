"""Run a strategy over a stream of tasks and measure the accuracy matrix.

::

    from fastpeft.continual import run_stream
    result = run_stream(peft_model, task, stream, "ewc", TrainerConfig(lr=1e-3, epochs=1, batch_size=32),
                        tokenizer=tok, ewc_lambda=1000, output_dir="runs/cl")
    result["matrix"][i][j]      # metric on task j after training task i
    result["forgetting"], result["bwt"], result["avg_accuracy"]

What it does, in plain code::

    strategy.setup(runner)
    for i, task_i in enumerate(stream):
        strategy.before_task(runner, i, task_i)
        Trainer(model, task, strategy.train_dataset(runner, i, task_i), None,
                replace(config, seed=config.seed + i, output_dir=None),
                loss_fn=strategy.loss_fn(runner, i, task_i)).train()     # a fresh optimizer per task
        strategy.after_task(runner, i, task_i)
        for j, task_j in enumerate(stream):
            strategy.route(runner, j, i)                                # per-task adapters: set_adapter
            R[i][j] = task.evaluate(model, loader(task_j.eval))[metric]
        strategy.end_eval(runner, i)

The per-task trainers get no evaluation data (the matrix's evaluation sets are not used for model
selection) and write nothing; with ``output_dir`` the runner writes ``result.json`` (atomic),
``matrix.png`` and ``adapter/`` (every adapter of the final model, PEFT format).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from ..fileio import atomic_dir, write_json_atomic
from ..workflow.data import PaddingCollator, make_loader
from ..workflow.trainer import Trainer, TrainerConfig
from . import metrics as CM
from .methods import Strategy, make_strategy
from .stream import ContinualTask, check_stream


@torch.no_grad()
def evaluate_task(model, task, dataset, collator, batch_size: int = 64) -> dict:
    """``task.evaluate`` on ``dataset`` in eval mode (the model's train/eval mode is restored)."""
    was = model.training
    model.eval()
    try:
        return task.evaluate(model, make_loader(dataset, collator, batch_size, shuffle=False), dataset)
    finally:
        model.train(was)


class ContinualRunner:
    """Holds the model, task, stream and strategy; :meth:`run` trains and measures (see module docstring)."""

    def __init__(self, model, task, stream, strategy: Strategy | str = "naive",
                 config: TrainerConfig | dict | None = None, *, tokenizer=None, collator=None,
                 callbacks=None, output_dir: str | None = None, metric: str | None = None,
                 verbose: bool = False, log=None, extra: dict | None = None, **strategy_params):
        self.stream = check_stream(stream)
        if isinstance(strategy, Strategy):
            if any(v is not None for v in strategy_params.values()):
                raise ValueError(f"strategy: parameters {sorted(strategy_params)} given with a Strategy instance; "
                                 "set them on the instance")
            self.strategy = strategy
        elif isinstance(strategy, str):
            self.strategy = make_strategy(strategy, **strategy_params)
        else:
            raise ValueError(f"strategy: expected a strategy name or a Strategy, got {type(strategy).__name__}")
        if isinstance(config, dict):
            config = TrainerConfig(**config)
        self.config = (config or TrainerConfig()).validate()
        if getattr(task, "default_mode", "max") != "max":
            raise ValueError(f"task: continual metrics need a higher-is-better task metric; {task.name!r} "
                             f"scores {task.default_metric!r} (lower is better)")
        self.model, self.task, self.tokenizer = model, task, tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.collator = collator or PaddingCollator(pad if pad is not None else 0)
        self.callbacks = callbacks
        self.output_dir = output_dir
        self.metric = metric or task.default_metric
        self.verbose = verbose
        self.log_fn = log  # log(message) for progress lines; None: print them when verbose
        self.extra = dict(extra or {})

    def _log(self, msg: str) -> None:
        msg = f"[continual/{self.strategy.name}] {msg}"
        if self.log_fn is not None:
            self.log_fn(msg)
        elif self.verbose:
            print(msg, flush=True)

    def evaluate(self, dataset) -> dict:
        return evaluate_task(self.model, self.task, dataset, self.collator, self.config.eval_batch_size)

    def run(self) -> dict:
        T = len(self.stream)
        R = [[math.nan] * T for _ in range(T)]
        per_task = []
        t0 = time.perf_counter()
        self.strategy.setup(self)
        base = dataclasses.replace(self.config, output_dir=None, resume_from=None, plot=False)
        for i, ct in enumerate(self.stream):
            self.strategy.before_task(self, i, ct)
            data = self.strategy.train_dataset(self, i, ct)
            trainer = Trainer(self.model, self.task, data, None, dataclasses.replace(base, seed=base.seed + i),
                              tokenizer=self.tokenizer, collator=self.collator, callbacks=self.callbacks,
                              loss_fn=self.strategy.loss_fn(self, i, ct))
            res = trainer.train()
            t1 = time.perf_counter()
            self.strategy.after_task(self, i, ct)
            t_after = time.perf_counter() - t1
            for j, cj in enumerate(self.stream):
                self.strategy.route(self, j, i)
                value = self.evaluate(cj.eval).get(self.metric)
                if value is None:
                    raise ValueError(f"metric: the task gives no {self.metric!r}")
                R[i][j] = float(value)
            self.strategy.end_eval(self, i)
            losses = res.get("losses") or []
            per_task.append({"task": ct.name, "train_examples": len(data), "steps": res["steps"],
                             "train_seconds": res["train_seconds"], "strategy_seconds": t_after,
                             "first_loss": losses[0] if losses else None,
                             "last_loss": losses[-1] if losses else None})
            self._log(f"task {i} {ct.name}: " + " ".join(f"{v:.3f}" for v in R[i]))
        result = {"strategy": self.strategy.name, "tasks": [t.name for t in self.stream],
                  "task_labels": {t.name: list(t.labels) for t in self.stream},
                  "metric": self.metric, "matrix": R, **CM.summarize(R),
                  "strategy_report": self.strategy.report(), "per_task": per_task,
                  "wall_seconds": time.perf_counter() - t0, **self.extra}
        if self.output_dir:
            result["files"] = self.write_outputs(result)
        return result

    def write_outputs(self, result: dict) -> dict:
        os.makedirs(self.output_dir, exist_ok=True)
        files = {"result": os.path.join(self.output_dir, "result.json")}
        png = CM.plot_matrix(result["matrix"], result["tasks"], os.path.join(self.output_dir, "matrix.png"),
                             title=f"{result['strategy']}: avg {result['avg_accuracy']:.3f}", metric=self.metric)
        if png:
            files["matrix_png"] = png
        if hasattr(self.model, "save_pretrained") and hasattr(self.model, "peft_config"):
            path = os.path.join(self.output_dir, "adapter")
            with atomic_dir(path) as tmp:
                self.model.save_pretrained(tmp)
            files["adapter"] = path
        write_json_atomic(files["result"], dict(result, files=files))
        return files


def run_stream(model, task, stream, strategy: Strategy | str = "naive", config: TrainerConfig | dict | None = None,
               **kwargs) -> dict:
    """``ContinualRunner(model, task, stream, strategy, config, **kwargs).run()``; see the module docstring.
    Strategy parameters (``ewc_lambda=...``) go in ``kwargs``."""
    return ContinualRunner(model, task, stream, strategy, config, **kwargs).run()


__all__ = ["ContinualRunner", "ContinualTask", "run_stream", "evaluate_task"]
