"""The ``quantization:`` section of a fine-tuning config (``--load-in-4bit`` / ``--load-in-8bit``): load the
base model with bitsandbytes (QLoRA), the task head kept unquantised.

    quantization:
      load_in_4bit: true                 # or load_in_8bit: true
      bnb_4bit_quant_type: nf4           # nf4 (default) | fp4
      bnb_4bit_use_double_quant: true    # default true
      bnb_4bit_compute_dtype: float32    # float32 (default) | bfloat16 | float16
      skip_modules: null                 # default: the task's head (classifier); always kept unquantised

The keys are ``transformers.BitsAndBytesConfig``'s.  The task head (``classifier`` for sequence and token
classification) is a *new* layer that transformers initialises after loading; quantised, it would be a
bitsandbytes layer over random weights that never got quantised (its forward fails, and it could not train
anyway), so its name always goes to ``llm_int8_skip_modules``.  After loading, the model goes through
:func:`fastpeft.prepare_model_for_kbit_training` (without gradient checkpointing).

:func:`quantized_loading` is how the pipeline applies the section: inside it,
:func:`fastpeft.workflow.models.load_base_model` adds ``quantization_config`` and ``device_map``.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from .config_checks import ConfigError

KEYS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
        "skip_modules")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: extra ``from_pretrained`` kwargs of the base model while :func:`quantized_loading` is active
LOAD_KWARGS: contextvars.ContextVar = contextvars.ContextVar("fastpeft_quantized_load_kwargs", default=None)


def check_quantization(spec) -> dict | None:
    """The validated ``quantization:`` section (None when absent or neither bit width is on); errors name
    ``quantization.<key>``."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"quantization: expected a mapping (e.g. {{load_in_4bit: true}}), got {spec!r}")
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise ConfigError(f"quantization: unknown key(s) {sorted(unknown)}; expected some of {list(KEYS)}")
    out = dict(spec)
    for k in ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant"):
        if k in out and not isinstance(out[k], bool):
            raise ConfigError(f"quantization.{k}: expected true or false, got {out[k]!r}")
    if out.get("load_in_4bit") and out.get("load_in_8bit"):
        raise ConfigError("quantization: load_in_4bit and load_in_8bit are both set; choose one")
    if not (out.get("load_in_4bit") or out.get("load_in_8bit")):
        return None
    qt = out.setdefault("bnb_4bit_quant_type", "nf4")
    if qt not in ("nf4", "fp4"):
        raise ConfigError(f"quantization.bnb_4bit_quant_type: expected nf4 or fp4, got {qt!r}")
    out.setdefault("bnb_4bit_use_double_quant", True)
    cd = out.setdefault("bnb_4bit_compute_dtype", "float32")
    if cd not in DTYPES:
        raise ConfigError(f"quantization.bnb_4bit_compute_dtype: expected one of {sorted(DTYPES)}, got {cd!r}")
    skip = out.get("skip_modules")
    if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) for s in skip)):
        raise ConfigError(f"quantization.skip_modules: expected a list of module names, got {skip!r}")
    return out


def skip_modules(spec: dict, head_modules) -> list[str]:
    """Modules kept unquantised: the task's head plus ``skip_modules``."""
    return list(dict.fromkeys(list(head_modules or []) + list(spec.get("skip_modules") or [])))


def bnb_config(spec: dict, head_modules=()):
    """``transformers.BitsAndBytesConfig`` of a validated section (bitsandbytes must be installed)."""
    from .._optional import import_extra, require_bnb
    require_bnb("fastpeft finetune --load-in-4bit / --load-in-8bit")
    BitsAndBytesConfig = import_extra("transformers", "quantised loading").BitsAndBytesConfig
    skip = skip_modules(spec, head_modules) or None   # None: transformers' own choice (e.g. lm_head)
    if spec.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["bnb_4bit_quant_type"],
                              bnb_4bit_use_double_quant=spec["bnb_4bit_use_double_quant"],
                              bnb_4bit_compute_dtype=DTYPES[spec["bnb_4bit_compute_dtype"]],
                              llm_int8_skip_modules=skip)


def _device_map(device: str):
    if device in (None, "auto"):
        return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return {"": device}


@contextlib.contextmanager
def quantized_loading(spec: dict | None, head_modules=(), device: str = "auto"):
    """Inside: base models load quantised as ``spec`` says (nothing changes when ``spec`` is None)."""
    if spec is None:
        yield
        return
    token = LOAD_KWARGS.set({"quantization_config": bnb_config(spec, head_modules), "device_map": _device_map(device)})
    try:
        yield
    finally:
        LOAD_KWARGS.reset(token)


def prepare(model):
    """:func:`fastpeft.prepare_model_for_kbit_training` without gradient checkpointing."""
    from .. import prepare_model_for_kbit_training
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
