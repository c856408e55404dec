"""Config-driven pipeline behind the CLI: prepare model and data, add the adapter and head, train,
save; and load base + adapter back for evaluation / prediction.

``finetune(cfg)`` takes a dict from :func:`fastpeft.workflow.config.build_config` and writes into
``output_dir``: ``adapter/`` (PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``, the
task head included through ``modules_to_save``, plus ``fastpeft_task.json`` with the task, label
vocabulary and data columns), ``metrics.jsonl``, ``curves.png``, ``result.json``, ``config.yaml`` and
``checkpoint-<step>/``.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import torch

from .. import LoraConfig, PeftModel, get_peft_model
from .._optional import import_extra
from ..adversarial import build as build_adversarial_method
from .checkpointing import TASK_FILE, check_output_dir
from .config import CALLBACK_SECTIONS, METHOD_CLASSES, PLAIN_METHODS, STUDY_SECTIONS, to_yaml
from .quantize import prepare as prepare_quantized, quantized_loading
from .data import make_loader, take
from .tasks import get_task



def peft_api(backend: str = "auto"):
    """(get_peft_model, LoraConfig, PeftModel, name): fastpeft's for ``"auto"`` / ``"fastpeft"``, Hugging Face
    PEFT's for ``"peft"``."""
    if backend in ("auto", "fastpeft"):
        return get_peft_model, LoraConfig, PeftModel, "fastpeft"
    if backend != "peft":
        raise ValueError(f"method.backend: expected 'auto', 'fastpeft' or 'peft', got {backend!r}")
    peft = import_extra("peft", "method.backend: peft")
    return peft.get_peft_model, peft.LoraConfig, peft.PeftModel, "peft"


# method name -> HF peft's config class, for the methods it has under the same name
HF_PEFT_METHODS = {"lora": "LoraConfig", "ia3": "IA3Config", "prefix": "PrefixTuningConfig",
                   "prompt": "PromptTuningConfig"}


def apply_method(model, method: dict, task):
    """Wrap ``model`` with the PEFT method described by ``method`` (``{"name": "lora", ...}``; the other
    keys go to the method's config class). LoRA defaults: r=8, lora_alpha=16, lora_dropout=0, the task's
    target modules. Every method gets the task head in ``modules_to_save`` unless told otherwise."""
    method = dict(method)
    name = method.pop("name", "lora")
    backend = method.pop("backend", "auto")
    if name in PLAIN_METHODS:
        return plain_method(model, name, task, method)
    for k, v in task.method_defaults(name).items():
        method.setdefault(k, v)
    if name not in METHOD_CLASSES:
        raise ValueError(f"method.name: expected one of {sorted(METHOD_CLASSES)}, got {name!r}")
    get_peft, _, _, used = peft_api(backend)
    if name == "lora":
        method.setdefault("r", 8)
        method.setdefault("lora_alpha", 16)
        method.setdefault("lora_dropout", 0.0)
        method.setdefault("target_modules", task.default_target_modules)
    if used == "fastpeft":
        cls = METHOD_CLASSES[name]
    elif name in HF_PEFT_METHODS:
        import peft
        cls = getattr(peft, HF_PEFT_METHODS[name])
    else:
        raise ValueError(f"method.name: {name!r} is not available with the {used} backend")
    if task.head_modules:
        method.setdefault("modules_to_save", list(task.head_modules))
    if task.peft_task_type is not None:  # so HF's AutoPeftModelFor* can load the adapter
        method.setdefault("task_type", task.peft_task_type)
    try:
        pcfg = cls(**method)
    except TypeError as e:
        raise ValueError(f"method: {e}") from None
    peft_model = get_peft(model, pcfg)
    peft_model._fastpeft_backend = used
    return peft_model


PLAIN_FILE = "trainable.safetensors"  # what the Trainer saves for a model without a PEFT config


def plain_method(model, name: str, task, options: dict | None = None):
    """``full`` (every parameter trains) or ``linear_probe`` (only the task head, :attr:`Task.head_modules`),
    without a PEFT wrapper: the Trainer saves the trained parameters as ``trainable.safetensors`` and
    :func:`load_for_inference` puts them back on the base."""
    if options:
        raise ValueError(f"method: {name} takes no options, got {sorted(options)}")
    heads = [n for n, _ in model.named_modules() if n and any(n == h or n.endswith("." + h) for h in task.head_modules)]
    if name == "linear_probe" and not heads:
        raise ValueError(f"method.name: linear_probe trains the task head {task.head_modules}, which "
                         f"{type(model).__name__} does not have")
    for n, p in model.named_parameters():
        p.requires_grad_(name == "full" or any(n.startswith(h + ".") for h in heads))
    model._fastpeft_backend = "fastpeft"
    return model


def load_plain(base, adapter_dir: str):
    """``base`` with the parameters a ``full`` / ``linear_probe`` run saved (names and shapes checked)."""
    from safetensors.torch import load_file
    path = os.path.join(adapter_dir, PLAIN_FILE)
    state = load_file(path)
    own = base.state_dict()
    bad = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad or shapes:
        raise ValueError(f"{path}: does not match the base model: unknown parameters {bad[:5]}, "
                         f"shape mismatches {shapes[:5]}")
    base.load_state_dict(state, strict=False)
    return base


def _file_cfg(data: dict, split: str) -> tuple[str | None, dict]:
    v = data.get(split)
    if v is None:
        return None, data
    if isinstance(v, str):
        return v, data
    merged = {k: val for k, val in data.items() if k not in ("train", "validation", "test")}
    merged.update({k: val for k, val in v.items() if k != "path"})
    return v["path"], merged


def load_split(task, data: dict, split: str, limit=None, seed=None, with_labels=True):
    path, fcfg = _file_cfg(data, split)
    if path is None:
        return None
    recs = task.read(path, fcfg, limit=None if seed is not None else limit, with_labels=with_labels)
    return take(recs, limit, seed)


def finetune(cfg: dict, *, callbacks=None, loss_fn=None, adversarial=None) -> dict:
    """Run the job ``cfg`` describes: one fine-tuning run, or, with a ``fewshot:`` / ``continual:`` section,
    a k-shot study over seeds (:mod:`fastpeft.fewshot`) / a stream of tasks (:mod:`fastpeft.continual`)."""
    for section, load in STUDY_SECTIONS.items():
        if cfg.get(section) is not None:
            if callbacks or loss_fn is not None or adversarial is not None:
                raise ValueError(f"finetune: callbacks / loss_fn / adversarial are not supported with {section}:")
            _, run = load()
            return run(cfg, log=lambda msg: print(msg, file=sys.stderr))  # stdout carries the summary
    from .trainer import Trainer

    trcfg = cfg["trainer"]
    data = cfg["data"]
    if trcfg.output_dir:  # before anything is written there (config.yaml)
        check_output_dir(trcfg.output_dir, resume=bool(trcfg.resume_from), overwrite=trcfg.overwrite)
    task = get_task(cfg["task"])
    model_path = task.resolve_model(cfg["model"])
    tok = task.load_tokenizer(model_path)
    train_recs = load_split(task, data, "train", data.get("train_limit"), data.get("train_subset_seed"))
    task.fit_labels(train_recs)
    val_recs = load_split(task, data, "validation", data.get("validation_limit"))
    max_len = data.get("max_length", 128)
    train_ds = task.encode(train_recs, tok, max_len)
    val_ds = task.encode(val_recs, tok, max_len) if val_recs else None

    torch.manual_seed(trcfg.seed)  # head / adapter initialisation
    quant = cfg.get("quantization")
    with quantized_loading(quant, task.head_modules, trcfg.device):  # QLoRA: the head stays unquantised
        base = task.build_model(model_path)
    if quant is not None:
        base = prepare_quantized(base)
    check_max_length(base, max_len, "data.max_length")
    model = apply_method(base, cfg["method"], task)
    if adversarial is None and cfg.get("adversarial"):
        adversarial = build_adversarial(cfg["adversarial"])
    if cfg.get("augment"):
        callbacks_from_config = CALLBACK_SECTIONS["augment"]()
        aug_callbacks, aug_loss = callbacks_from_config(cfg["augment"], model=model, tokenizer=tok, task=task,
                                                        seed=trcfg.seed)
        callbacks = list(callbacks or []) + list(aug_callbacks)
        if aug_loss is not None:
            if loss_fn is not None:
                raise ValueError("augment: mixup replaces the loss; it cannot be combined with a custom loss_fn")
            loss_fn = aug_loss
    task_info = dict(task.state(), model=cfg["model"], max_length=max_len,
                     data={k: v for k, v in data.items() if k not in ("train", "validation", "test")},
                     # the columns of each split given as a mapping (evaluate / predict try them too)
                     split_data={split: {k: v for k, v in data[split].items() if k != "path"}
                                 for split in ("validation", "test") if isinstance(data.get(split), dict)},
                     method_backend=getattr(model, "_fastpeft_backend", None))
    trainer = Trainer(model, task, train_ds, val_ds, trcfg, tokenizer=tok, callbacks=callbacks,
                      loss_fn=loss_fn, adversarial=adversarial,
                      extra_files={TASK_FILE: json.dumps(task_info, indent=1)})
    if trcfg.output_dir:
        os.makedirs(trcfg.output_dir, exist_ok=True)
        with open(os.path.join(trcfg.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    result = trainer.train()
    if val_ds is not None:
        result["final_metrics"] = trainer.evaluate()
    result["backend"] = getattr(model, "_fastpeft_backend", None)
    result["trainer"] = trainer
    return result


def build_adversarial(spec: dict):
    """The ``adversarial:`` section (``{method: freelb, <its arguments>}``) as a :mod:`fastpeft.adversarial`
    method; the section itself is left as it is."""
    spec = dict(spec)
    return build_adversarial_method(spec.pop("method"), **spec)


def check_max_length(model, max_length, where: str) -> None:
    """``max_length`` must fit the model's position embeddings (a longer sequence fails deep inside the
    model, or silently reads past the table)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length is not None and max_length > limit:
        raise ValueError(f"{where}: {max_length} is more tokens than the model takes (max_position_embeddings "
                         f"{limit}); use at most {limit}")


def read_task_info(adapter_dir: str) -> dict:
    """``fastpeft_task.json`` of an adapter directory, checked; errors name the file."""
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"--adapter: {adapter_dir!r} is not a directory")
    info_path = os.path.join(adapter_dir, TASK_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"--adapter: {adapter_dir!r} has no {TASK_FILE} (written by fastpeft finetune and "
                                f"the Python Trainer; for another adapter, write one: {{\"task\": ..., \"labels\": "
                                f"[...], \"model\": ...}})")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_path}: corrupt task file, not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("task"), str):
        raise ValueError(f"{info_path}: corrupt task file: expected a JSON object with a 'task' name")
    if info.get("labels") is not None and not (isinstance(info["labels"], list)
                                               and all(isinstance(x, str) for x in info["labels"])):
        raise ValueError(f"{info_path}: 'labels' must be a list of strings, got {info['labels']!r}")
    return info


def load_for_inference(adapter_dir: str, model: str | None = None, backend: str = "auto"):
    """(model in eval mode, tokenizer, task, task_info) from a saved adapter directory."""
    info = read_task_info(adapter_dir)
    task = get_task(info["task"], labels=info.get("labels"))
    if not (model or info.get("model")):
        raise ValueError(f"--model: {os.path.join(adapter_dir, TASK_FILE)} names no base model; pass --model")
    model_path = task.resolve_model(model or info["model"])
    tok = task.load_tokenizer(model_path)
    base = task.build_model(model_path)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")) and \
            os.path.isfile(os.path.join(adapter_dir, PLAIN_FILE)):  # a full / linear_probe run
        m = load_plain(base, adapter_dir)
        m.eval()
        return m, tok, task, info
    _, _, PeftModel, _ = peft_api(backend)
    m = PeftModel.from_pretrained(base, adapter_dir)
    m.eval()
    return m, tok, task, info


def _read_with_known_columns(task, path: str, info: dict, columns: dict, limit, with_labels: bool):
    """Records of ``path`` with the columns the command line names, else those the adapter remembers: the
    training file's, then (when the file lacks them) each other split's the run was given."""
    from .data import DataError
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    base = dict(info.get("data") or {})
    tries = [{**base, **given}]
    for split_cfg in (info.get("split_data") or {}).values():
        tries.append({**base, **split_cfg, **given})
    first = None
    for dcfg in tries:
        try:
            return task.read(path, dcfg, limit=limit, with_labels=with_labels)
        except DataError as e:
            if "missing column" not in str(e):
                raise
            first = first or e
    raise first


def run_on_file(adapter_dir: str, path: str, *, mode: str, model: str | None = None, batch_size: int = 64,
                columns: dict | None = None, limit: int | None = None, max_length: int | None = None,
                scores: bool = False) -> list | dict:
    """``mode="evaluate"``: metrics dict; ``mode="predict"``: list of prediction records (with ``scores``, each
    with the model's probabilities where the task gives them)."""
    for name, v in (("--limit", limit), ("--batch-size", batch_size), ("--max-length", max_length)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    m, tok, task, info = load_for_inference(adapter_dir, model)
    max_length = max_length or info.get("max_length") or 128
    check_max_length(m, max_length, "--max-length")
    with_labels = mode == "evaluate"
    recs = _read_with_known_columns(task, path, info, columns, limit, with_labels)
    ds = task.encode(recs, tok, max_length, with_labels=with_labels)
    loader = make_loader(ds, task.collator(tok), batch_size, shuffle=False)
    with torch.no_grad():
        if with_labels:
            return task.evaluate(m, loader, ds)
        if scores:
            if "scores" not in inspect.signature(task.predict).parameters:
                raise ValueError(f"--scores: the {task.name} task has no scores to print")
            return task.predict(m, loader, ds, scores=True)
        return task.predict(m, loader, ds)
