"""The trainer patches causal-LM models by default (trainer.fuse_base / --no-fuse-base)."""
from __future__ import annotations

import argparse

import pytest
import torch

import fastpeft
from fastpeft.patching import is_patched

from .models import batch, tiny_model

pytest.importorskip("transformers")


def _dataset():
    from fastpeft.workflow.data import EncodedDataset

    feats = []
    for seed in range(8):
        ids, mask, labels = batch(seed, B=1, S=12)
        feats.append({"input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist(), "labels": ids[0].tolist()})
    return EncodedDataset(feats, [{"text": str(i)} for i in range(8)])


def _train(fuse_base: bool, **kw):
    from fastpeft.workflow import Trainer, TrainerConfig
    from fastpeft.workflow.tasks import get_task

    task = get_task("causal_lm")
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    ds = _dataset()
    t = Trainer(model, task, ds, ds, TrainerConfig(lr=2e-2, batch_size=4, max_steps=4, progress=False, plot=False,
                                                   device="cpu", fuse_base=fuse_base), **kw)
    before = t.evaluate()
    result = t.train()
    return t, model, before, result


def test_trainer_patches_by_default_and_trains():
    t, model, before, result = _train(True)
    assert is_patched(model)
    assert set(t.fuse_summary.patched) == {"rms_norm", "rope", "mlp", "cross_entropy"}
    assert t.evaluate()["loss"] < before["loss"]
    fastpeft.unpatch_model(model)


def test_fuse_base_false_leaves_the_model_alone():
    t, model, _, _ = _train(False)
    assert not is_patched(model) and not hasattr(t, "fuse_summary")


def test_custom_loss_fn_keeps_the_logits():
    seen = []

    def loss_fn(out, b):
        seen.append(out.logits is not None)
        return out.loss

    t, model, _, _ = _train(True, loss_fn=loss_fn)
    assert "cross_entropy" not in t.fuse_summary.patched and "reads the logits" in t.fuse_summary.skipped["cross_entropy"]
    assert seen and all(seen)
    fastpeft.unpatch_model(model)


def test_config_and_flag():
    from fastpeft.workflow import TrainerConfig
    from fastpeft.workflow.cli_finetune import add_arguments, overrides_from_args

    with pytest.raises(ValueError, match="trainer.fuse_base: expected true or false"):
        TrainerConfig(fuse_base="no")
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert overrides_from_args(p.parse_args(["--no-fuse-base"]))["trainer.fuse_base"] is False
    assert "trainer.fuse_base" not in overrides_from_args(p.parse_args([]))
    assert "--no-fuse-base" in p.format_help()


def test_unsupported_architecture_trains_unfused_with_a_warning():
    from fastpeft.workflow.tasks import get_task

    class NotADecoder(torch.nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.warns(UserWarning, match="unsupported architecture"):
        assert get_task("causal_lm").fuse_base(NotADecoder()) is None
