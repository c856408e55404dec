"""Tasks: what to read, how to encode and batch it, which model and head to train, how to score it.

A task is one module of this package holding one subclass of :class:`Task` decorated with
:func:`register_task` (under its ``name`` and ``aliases``), imported below.  Everything else reads the
registry (:data:`TASKS`): the config's ``task:`` check, ``fastpeft finetune --task``, ``evaluate`` /
``predict`` (which rebuild the task from the name saved with the adapter), and the :class:`Trainer`,
which only calls the methods below, so a new task needs no change to it.

What a task implements
======================

Required:

* ``read(path, cfg, limit=None, with_labels=True) -> list[dict]`` -- records from a file or a Hugging Face
  dataset (``cfg`` is the config's ``data:`` section: column names, format); each record carries
  ``_line`` and ``_source`` so errors can name them (:func:`~fastpeft.workflow.tasks.base.read_rows`,
  ``source_name`` help);
* ``encode(records, tokenizer, max_length, with_labels=True)`` -> an
  :class:`~fastpeft.workflow.data.EncodedDataset` (``features``: one dict of model inputs per example,
  keys starting with ``_`` are bookkeeping the model never sees; ``records``; ``lengths`` for
  length-bucketed batches).  Unknown labels raise a :class:`~fastpeft.workflow.data.DataError` naming
  file and line;
* ``build_model(model_path)`` -- the base transformers model with its task head;
* ``evaluate(model, loader, dataset) -> {metric: value}`` -- must include ``default_metric``;
* ``predict(model, loader, dataset) -> list[dict]`` -- one JSON-able record per input record.

Class attributes: ``name`` / ``aliases``; ``default_metric`` / ``default_mode`` (``"max"`` or ``"min"``:
early stopping and the best adapter); ``head_modules`` (trained in full through ``modules_to_save``);
``default_target_modules`` (what LoRA targets unless the config says otherwise); ``peft_task_type`` (HF PEFT's
task type, written into every adapter: ``SEQ_CLS``, ``TOKEN_CLS``, ``CAUSAL_LM``).

Optional (the defaults in :class:`Task` fit token-sequence tasks whose model returns ``loss`` and
``logits``):

* ``fit_labels(records)`` -- the label vocabulary, taken from the training data (default: none);
  ``state()`` -- what is saved with the adapter to rebuild the task (default: name and labels);
* ``collator(tokenizer)`` -- list of features -> batch (default: pad to the batch's longest ``input_ids``,
  labels with -100);
* ``num_examples(batch)`` -- examples in a batch (default: ``len(batch["input_ids"])``);
* ``forward(model, batch, loss_fn=None) -> (loss, logits)`` -- the training step's forward (default: the
  model's ``loss`` and ``logits``; ``loss_fn(outputs, batch)`` replaces the loss when given); the
  adversarial methods call it too;
* ``metric_mode(metric)`` -- which way a metric improves when the config names one (default: ``"min"`` for
  losses and perplexity, else ``"max"``).
* ``resolve_model(name)`` / ``load_tokenizer(model_path)`` -- the base's location and what ``encode`` /
  ``collator`` take as ``tokenizer`` (default: a transformers directory or bundled name, and its tokenizer;
  ``image_classification`` resolves CNN bases and returns an image preprocessor);
* ``method_defaults(name)`` -- default options of a PEFT method on this task's model (default: none);
* ``data_keys`` -- extra keys of the config's ``data:`` section the task reads (``messages_column``).

Helpers: :meth:`Task.outputs` (batches moved to the model's device, with the model's outputs) is the loop
``evaluate`` / ``predict`` usually need; :meth:`Task.labelled_model` is ``build_model`` for a head over
``labels``.
"""
from __future__ import annotations

from .base import TASKS, Task, get_task, model_inputs, register_task, task_names
from .sequence_classification import SequenceClassification
from .token_classification import TokenClassification
from .causal_lm import CausalLM
from .image_classification import ImageClassification
from .dialogue import Dialogue
from .seq2seq import Seq2Seq
from .relation_extraction import RelationExtraction
from .question_answering import QuestionAnswering

__all__ = ["TASKS", "Task", "get_task", "register_task", "task_names", "model_inputs", "SequenceClassification",
           "TokenClassification", "CausalLM", "ImageClassification", "Dialogue", "Seq2Seq"]
