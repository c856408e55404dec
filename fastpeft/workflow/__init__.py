"""The fine-tuning workflow: data, tasks, trainer, checkpoints, CLI (``fastpeft finetune``,
``fastpeft evaluate``, ``fastpeft predict``). See README.md, "Using fastpeft"."""
from .trainer import Trainer, TrainerConfig, train
from .tasks import CausalLM, SequenceClassification, Task, TokenClassification, get_task, register_task
from .data import (BatchSampler, DataError, EncodedDataset, PaddingCollator, make_loader, read_conll,
                   read_table, from_hf_dataset)
from .metrics import accuracy, entity_prf, macro_f1, perplexity
from .config import build_config, load_yaml
from .pipeline import finetune, load_for_inference, apply_method, run_on_file
from .models import resolve_model_path, load_tokenizer

__all__ = ["Trainer", "TrainerConfig", "train", "Task", "SequenceClassification", "TokenClassification",
           "CausalLM", "get_task", "register_task", "BatchSampler", "DataError", "EncodedDataset",
           "PaddingCollator", "make_loader", "read_conll", "read_table", "from_hf_dataset", "accuracy",
           "entity_prf", "macro_f1", "perplexity", "build_config", "load_yaml", "finetune",
           "load_for_inference", "apply_method", "run_on_file", "resolve_model_path", "load_tokenizer"]
