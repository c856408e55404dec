"""Training runs that go wrong say so (issue 16, items 1-4, 10, 12): a diverging run stops and exits 3
without saving a non-finite adapter; config numbers are finite and in range; an output directory holding a
run is refused unless resumed or overwritten; resume checks the checkpoint against the run (and falls back
past a torn newest checkpoint); temporaries of killed runs are cleaned; bad devices, lengths, metrics and
regexes are one-line errors."""
import json
import math
import os

import pytest
import torch

from fastpeft.cli import main
from fastpeft.workflow import Trainer, TrainerConfig
from fastpeft.workflow import checkpointing as ckpt
from fastpeft.workflow.config import ConfigError, build_config

from ..workflow.conftest import make_cls_setup


def _cfg(**kw):
    base = dict(lr=5e-3, batch_size=16, max_steps=6, progress=False, seed=0, plot=False)
    base.update(kw)
    return TrainerConfig(**base)


class NanLossFrom:
    """loss_fn: the task's loss, NaN from the ``at``-th call on (a run that diverges at step ``at``)."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, out, batch):
        self.calls += 1
        return out.loss * (math.nan if self.calls >= self.at else 1.0)


def _trainer(tiny_model_dir, tiny_cls_files, cfg, **kw):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    return Trainer(model, task, tr, dev, cfg, tokenizer=tok, **kw)


def _flags(tiny_model_dir, tiny_cls_files, out, *extra):
    train, dev = tiny_cls_files
    return ["finetune", "--model", tiny_model_dir, "--task", "sequence_classification", "--train", train,
            "--validation", dev, "--validation-text-column", "content", "--max-length", "32", "--r", "2",
            "--batch-size", "16", "--no-progress", "--output-dir", str(out), "--set", "trainer.plot=false", *extra]


# ----------------------------------------------------------------------------- 1: divergence

@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_diverging_run_stops_or_skips_and_says_so(tmp_path, tiny_model_dir, tiny_cls_files, policy):
    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg(eval_every=2, output_dir=str(tmp_path), on_nonfinite=policy),
                 loss_fn=NanLossFrom(4))
    with pytest.warns(RuntimeWarning, match="training diverged.*step 4"):
        r = t.train()
    if policy == "stop":
        assert r["steps"] == 4 and r["nonfinite_steps"] == 1 and "stopped" in r["diverged"]
    else:
        assert r["steps"] == 6 and r["nonfinite_steps"] == 3 and "3 of 6" in r["diverged"]
    assert r["best_step"] == 2  # the best state is one evaluated before the divergence
    saved = json.load(open(tmp_path / "result.json"))
    assert saved["diverged"] == r["diverged"] and saved["nonfinite_steps"] == r["nonfinite_steps"]
    from safetensors.torch import load_file
    for v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values():
        assert torch.isfinite(v).all()


def test_a_non_finite_state_is_never_the_best_and_never_saved(tmp_path, tiny_model_dir, tiny_cls_files):
    class PoisonWeights:  # the parameters themselves turn NaN after step 1 (an optimizer gone wrong)
        def on_step_end(self, trainer, step, loss):
            if step == 1:
                with torch.no_grad():
                    for p in trainer.module.parameters():
                        if p.requires_grad:
                            p.fill_(math.nan)

    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg(eval_every=2, max_steps=4, output_dir=str(tmp_path)),
                 callbacks=[PoisonWeights()])
    with pytest.warns(RuntimeWarning, match="training diverged"):
        r = t.train()
    assert r["best_step"] is None and r["steps"] == 2
    assert "none written" in r["adapter"] and not (tmp_path / "adapter").exists()
    assert not any(n.startswith("checkpoint-2") for n in os.listdir(tmp_path))  # no NaN checkpoint either


def test_cli_exits_3_on_divergence(tmp_path, tiny_model_dir, tiny_cls_files, capsys, monkeypatch):
    from fastpeft.workflow.tasks.sequence_classification import SequenceClassification
    calls = {"n": 0}
    forward = SequenceClassification.forward

    def nan_from_step_3(self, model, batch, loss_fn=None):
        loss, logits = forward(self, model, batch, loss_fn)
        calls["n"] += model.training
        return (loss * math.nan if model.training and calls["n"] >= 3 else loss), logits

    monkeypatch.setattr(SequenceClassification, "forward", nan_from_step_3)
    rc = main(_flags(tiny_model_dir, tiny_cls_files, tmp_path / "run", "--max-steps", "6"))
    err = capsys.readouterr().err
    assert rc == 3
    assert "training diverged" in err and "at step 3" in err and "on_nonfinite: stop" in err


@pytest.mark.parametrize("key,value,match", [
    ("trainer.lr", "inf", "finite"), ("trainer.lr", "nan", "finite"), ("trainer.lr", 1e30, r"\(0, 10\]"),
    ("trainer.lr", -1e-3, r"\(0, 10\]"), ("trainer.weight_decay", "inf", "finite"),
    ("trainer.max_grad_norm", math.inf, "finite"), ("trainer.momentum", 1.5, r"\[0, 1\)"),
    ("trainer.eps", 0.0, "positive"), ("trainer.betas", [0.9, 1.0], r"\[0, 1\)"),
    ("trainer.on_nonfinite", "ignore", "'stop' or 'skip'"), ("trainer.device", "gpu0", "device"),
    ("method.r", 0, "method.r"), ("method.lora_dropout", 1.0, r"method.lora_dropout.*\[0, 1\)"),
    ("method.lora_alpha", "-inf", "finite"), ("trainer.warmup_ratio", "nan", "finite"),
])
def test_config_numbers_are_finite_and_in_range(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"}}, {key: value})


def test_cli_refuses_an_infinite_lr_in_one_line(capsys):
    assert main(["finetune", "--model", "m", "--task", "sequence_classification", "--train", "x", "--lr", "inf"]) == 2
    err = capsys.readouterr().err
    assert "trainer.lr: expected a finite number" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 3 and 12: output directories

def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_model_dir,
                                                                             tiny_cls_files, capsys):
    out = tmp_path / "run"
    assert main(_flags(tiny_model_dir, tiny_cls_files, out, "--max-steps", "3", "--save-every", "1")) == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_flags(tiny_model_dir, tiny_cls_files, out, "--max-steps", "2", "--lr", "1e-2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume-from" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before  # nothing lost
    # --overwrite replaces the old run: none of its checkpoints survive to be "resumed" later
    assert main(_flags(tiny_model_dir, tiny_cls_files, out, "--max-steps", "2", "--overwrite")) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert json.load(open(out / "result.json"))["steps"] == 2


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir, tiny_cls_files, capsys):
    f = tmp_path / "notadir"
    f.write_text("keep me")
    assert main(_flags(tiny_model_dir, tiny_cls_files, f, "--max-steps", "1")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err and f.read_text() == "keep me"


def test_temporaries_of_a_killed_run_are_cleaned_at_the_next_start(tmp_path, tiny_model_dir, tiny_cls_files):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint-4.abc123.tmp").mkdir()  # what atomic_dir / atomic_write leave when killed
    (out / ".checkpoint-4.abc123.tmp" / "state.safetensors").write_bytes(b"\0" * 10)
    (out / ".adapter.xyz.old").mkdir()
    (out / ".result.json.q1w2.tmp").write_text("{")
    (out / ".keep_me").write_text("user file")
    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg(max_steps=1, output_dir=str(out)))
    t.train()
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".keep_me"]


# ----------------------------------------------------------------------------- 2 and 4: resume

@pytest.fixture
def checkpointed_run(tmp_path, tiny_model_dir, tiny_cls_files):
    """A run killed at the end of step 4 of 6 (checkpoints 3 and 4; 96 examples, batch 16: 6 batches an epoch)."""
    from ..workflow.conftest import Kill, KillAt
    out = str(tmp_path / "run")
    with pytest.raises(Kill):
        _trainer(tiny_model_dir, tiny_cls_files, _cfg(save_every=1, output_dir=out), callbacks=[KillAt(4)]).train()
    return out


@pytest.mark.parametrize("change,match", [
    (dict(batch_size=32), r"batch_size: checkpoint 16, this run 32"),       # once looped forever
    (dict(grad_accum=2), r"grad_accum: checkpoint 1, this run 2"),
])
def test_resume_with_other_batching_is_refused_with_the_reason(checkpointed_run, tiny_model_dir, tiny_cls_files,
                                                              change, match):
    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg(output_dir=checkpointed_run, resume_from="latest", **change))
    with pytest.raises(ValueError, match=match):
        t.train()


def test_resume_with_less_data_is_refused(checkpointed_run, tiny_model_dir, tiny_cls_files):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    from fastpeft.workflow.data import EncodedDataset
    small = EncodedDataset(tr.features[:40], tr.records[:40])  # once: position past the epoch's end, endless loop
    t = Trainer(model, task, small, dev, _cfg(output_dir=checkpointed_run, resume_from="latest"), tokenizer=tok)
    with pytest.raises(ValueError, match="train_examples: checkpoint 96, this run 40"):
        t.train()


def test_resume_with_another_rank_is_refused(checkpointed_run, tiny_model_dir, tiny_cls_files):
    from fastpeft.workflow.pipeline import apply_method
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    model1 = apply_method(task.build_model(tiny_model_dir), {"name": "lora", "r": 1, "lora_alpha": 8,
                                                             "target_modules": ["query", "value"]}, task)
    t = Trainer(model1, task, tr, dev, _cfg(output_dir=checkpointed_run, resume_from="latest"), tokenizer=tok)
    with pytest.raises(ValueError, match=r"method.r: checkpoint 4, this run 1.*parameter shapes"):
        t.train()


def test_shapes_are_checked_even_for_old_checkpoints(tiny_model_dir, tiny_cls_files):
    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg())
    name, p = next((n, p) for n, p in t.module.named_parameters() if "lora_A" in n)
    with pytest.raises(ValueError, match="other shapes"):  # once: r=1 broadcast into r=4 rows
        t.load_trainable_state({name: torch.zeros(1, p.shape[1])})


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(checkpointed_run, tiny_model_dir, tiny_cls_files,
                                                                capsys):
    assert [os.path.basename(p) for p in ckpt.checkpoints(checkpointed_run)] == ["checkpoint-4", "checkpoint-3"]
    newest = os.path.join(checkpointed_run, "checkpoint-4", "state.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    t = _trainer(tiny_model_dir, tiny_cls_files, _cfg(output_dir=checkpointed_run, resume_from="latest"))
    with pytest.warns(UserWarning, match="checkpoint-4.*truncated.*previous good checkpoint checkpoint-3"):
        r = t.train()
    assert r["resumed_from"].endswith("checkpoint-3") and r["steps"] == 6
    assert "checkpoint-3" in capsys.readouterr().err
    # an explicitly named torn checkpoint is an error naming the file
    with open(os.path.join(checkpointed_run, "checkpoint-6", "state.json"), "w") as f:
        f.write('{"step": 6, "opt')
    with pytest.raises(ValueError, match=r"checkpoint-6.state.json: corrupt or truncated"):
        ckpt.load_checkpoint(os.path.join(checkpointed_run, "checkpoint-6"))


# ----------------------------------------------------------------------------- 10: one-line errors

@pytest.mark.parametrize("extra,match", [
    (["--device", "cuda"], "trainer.device: 'cuda' asked for"),
    (["--max-length", "4096"], r"data.max_length: 4096 is more tokens than the model takes"),
    (["--set", "method.target_modules=quer[y"], "not a valid regular expression"),
    (["--metric", "acc"], "no metric 'acc'; expected one of"),
])
def test_bad_run_settings_are_one_line_errors(tmp_path, tiny_model_dir, tiny_cls_files, capsys, extra, match):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(_flags(tiny_model_dir, tiny_cls_files, tmp_path / "r", "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "r" / "adapter").exists()


def test_a_corrupt_task_file_is_named(tmp_path, tiny_model_dir, tiny_cls_files, capsys):
    out = tmp_path / "run"
    assert main(_flags(tiny_model_dir, tiny_cls_files, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    for text, match in (('{"task": ', "corrupt task file, not valid JSON"),
                        ('["x"]', "expected a JSON object with a 'task' name"),
                        ('{"task": "sequence_classification", "labels": 3}', "'labels' must be a list")):
        (out / "adapter" / "fastpeft_task.json").write_text(text)
        assert main(["evaluate", "--adapter", str(out / "adapter"), "--data", tiny_cls_files[1]]) == 2
        err = capsys.readouterr().err
        assert "fastpeft_task.json" in err and match in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 11: adv_perturb_update NaN

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("norm", ["l2_token", "l2_example"])
def test_adv_perturb_update_keeps_a_nan_gradient_nan(backend, norm):
    import fastpeft
    from fastpeft.ops import adv_perturb_update
    if backend == "cpu" and fastpeft._ext.cpu_available() is not None:
        pytest.skip("no compiled extension")
    d = torch.full((2, 3, 8), 0.1)
    g = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    g[0, 1, 2] = math.nan
    with fastpeft.use_backend(backend, op="adv_perturb_update"):
        out = adv_perturb_update(d, g, norm=norm, step_size=0.1, epsilon=1.0)  # issue: norm ~2e7 on cpu
    bad_rows = out[0, 1] if norm == "l2_token" else out[0]
    assert torch.isnan(bad_rows).all()
    assert torch.isfinite(out[1]).all()
