"""Continual learning with PEFT adapters: train one model on a stream of tasks and measure forgetting.

* :mod:`.stream` -- :class:`ContinualTask` (name, encoded train / eval data, labels), :func:`encode_stream`;
* :mod:`.methods` -- strategies: ``naive``, ``ewc``, ``l2sp``, ``replay``, ``per_task_adapters``, ``lwf``
  (formulas in that module's docstring), :func:`make_strategy`, :func:`diagonal_fisher`,
  :class:`ReservoirBuffer`, :func:`lwf_distillation`;
* :mod:`.metrics` -- accuracy matrix summaries (average accuracy, forgetting, backward transfer) and the
  heat-map PNG;
* :mod:`.runner` -- :func:`run_stream` / :class:`ContinualRunner` (the Trainer once per task);
* :mod:`.config` -- :func:`run_from_config` (the ``continual:`` section of a ``fastpeft finetune`` config),
  :class:`ContinualConfig` and :func:`validate_section`.

Example::

    from fastpeft.continual import encode_stream, run_stream
    stream = encode_stream(task, tok, {"a": (train_a, dev_a), "b": (train_b, dev_b)}, max_length=64)
    model = fastpeft.get_peft_model(task.build_model("minilm"), fastpeft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    result = run_stream(model, task, stream, "replay", TrainerConfig(lr=1e-3, epochs=1), tokenizer=tok,
                        replay_size=200)
    print(result["matrix"], result["forgetting"])
"""
from .methods import (EWC, L2SP, STRATEGIES, LwF, Naive, PerTaskAdapters, Replay, ReservoirBuffer, Strategy,
                      diagonal_fisher, lwf_distillation, make_strategy)
from .metrics import (average_accuracy, backward_transfer, forgetting, learning_accuracy, plot_matrices,
                      plot_matrix, summarize)
from .runner import ContinualRunner, evaluate_task, run_stream
from .stream import ContinualTask, check_stream, concat_datasets, encode_stream
from .config import ContinualConfig, run_from_config, validate_section

__all__ = ["ContinualTask", "ContinualRunner", "run_stream", "evaluate_task", "encode_stream", "check_stream",
           "concat_datasets", "Strategy", "Naive", "EWC", "L2SP", "Replay", "PerTaskAdapters", "LwF",
           "ReservoirBuffer", "STRATEGIES", "make_strategy", "diagonal_fisher", "lwf_distillation",
           "average_accuracy", "learning_accuracy", "forgetting", "backward_transfer", "summarize",
           "plot_matrix", "plot_matrices", "ContinualConfig", "run_from_config", "validate_section"]
