"""Tasks: causal LM on a tiny random GPT-2, records from a datasets-like object, a new task as one class."""
import json

import pytest
import torch

from fastpeft.workflow import Trainer, TrainerConfig, get_task
from fastpeft.workflow.data import DataError
from fastpeft.workflow.pipeline import apply_method


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    import shutil, os
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(d)
    for f in os.listdir(tiny_model_dir):  # reuse the MiniLM WordPiece tokenizer files
        if "token" in f or f == "vocab.txt" or f == "special_tokens_map.json":
            shutil.copy(os.path.join(tiny_model_dir, f), d)
    return str(d)


def test_causal_lm_trains_evaluates_generates(tmp_path, tiny_gpt2_dir):
    from fastpeft.workflow import load_tokenizer
    p = tmp_path / "lm.jsonl"
    p.write_text("".join(json.dumps({"text": f"the cat sat on the mat number {i}"}) + "\n" for i in range(24)))
    task = get_task("causal_lm")
    tok = load_tokenizer(tiny_gpt2_dir)
    recs = task.read(str(p), {"text_column": "text"})
    ds = task.encode(recs, tok, 32)
    torch.manual_seed(0)
    model = apply_method(task.build_model(tiny_gpt2_dir), {"name": "lora", "r": 4, "lora_alpha": 8,
                                                            "target_modules": "all-linear"}, task)
    t = Trainer(model, task, ds, ds, TrainerConfig(lr=2e-2, batch_size=8, max_steps=6, progress=False, plot=False),
                tokenizer=tok)
    before = t.evaluate()
    r = t.train()
    after = t.evaluate()
    assert r["metric"] == "loss" and r["mode"] == "min"
    assert after["loss"] < before["loss"]
    assert after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item(), rel=1e-5)
    task.max_new_tokens = 3
    out = task.predict(t.module, None, task.encode(recs[:2], tok, 32))
    assert len(out) == 2 and isinstance(out[0]["continuation"], str)


def test_records_from_a_datasets_like_object():
    class FakeDataset(list):  # the parts of datasets.Dataset the readers use
        column_names = ["sentence", "label"]

        class _Label:
            names = ["neg", "pos"]

        features = {"label": _Label()}

    task = get_task("sequence_classification")
    recs = task.read(FakeDataset([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]), {})
    assert [(r["text"], r["label"]) for r in recs] == [("good", "pos"), ("bad", "neg")]
    with pytest.raises(DataError, match="missing column"):
        task.read(FakeDataset([{"text": "x"}]), {"text_column": "text"})


@pytest.mark.parametrize("name,extra", [("ia3", {"target_modules": ["key", "value", "output.dense"],
                                                 "feedforward_modules": ["output.dense"]}),
                                        ("bitfit", {})])
def test_other_peft_methods_through_the_workflow(name, extra, tiny_model_dir, tiny_cls_files):
    import fastpeft
    from fastpeft.workflow import load_tokenizer
    task = get_task("sequence_classification")
    tok = load_tokenizer(tiny_model_dir)
    recs = task.read(tiny_cls_files[0], {}, limit=32)
    task.fit_labels(recs)
    model = apply_method(task.build_model(tiny_model_dir), dict(name=name, **extra), task)
    assert model._fastpeft_backend == "fastpeft"
    r = Trainer(model, task, task.encode(recs, tok, 16), None,
                TrainerConfig(max_steps=2, batch_size=16, progress=False, plot=False)).train()
    assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])


def test_a_new_task_is_one_registered_class():
    """A task whose batches have no ``input_ids`` (its own dataset lengths, collator, example count and loss)
    trains through the unchanged Trainer; the config check and ``finetune --help`` read the registry."""
    from types import SimpleNamespace

    from fastpeft.workflow.config import build_config
    from fastpeft.workflow.data import EncodedDataset
    from fastpeft.workflow.tasks import TASKS, Task, register_task, task_names

    class VectorDataset(EncodedDataset):
        def __init__(self, features):
            self.features, self.records, self.lengths = features, None, [1] * len(features)

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x, labels=None):
            y = self.lin(x).squeeze(-1)
            return SimpleNamespace(logits=y, loss=None if labels is None else ((y - labels) ** 2).mean())

    counted = []

    @register_task
    class ToyRegression(Task):
        name = "toy_regression"
        default_metric = "mse"

        def collator(self, tokenizer):
            return lambda feats: {"x": torch.tensor([f["x"] for f in feats]),
                                  "labels": torch.tensor([f["y"] for f in feats])}

        def num_examples(self, batch):
            counted.append(len(batch["x"]))
            return len(batch["x"])

        def evaluate(self, model, loader, dataset):
            return {"mse": sum(float(out.loss) for _, out in self.outputs(model, loader))}

    try:
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(24, 3, generator=g)
        ds = VectorDataset([{"x": x.tolist(), "y": float(x.sum())} for x in xs])
        torch.manual_seed(0)
        model = Regressor()
        t = Trainer(model, get_task("toy_regression"), ds, ds,
                    TrainerConfig(lr=0.1, batch_size=8, max_steps=6, progress=False, plot=False, max_grad_norm=None))
        before = t.evaluate()["mse"]
        r = t.train()
        assert r["metric"] == "mse" and r["mode"] == "min" and r["examples"] == 48 and counted == [8] * 6
        assert t.evaluate()["mse"] < before
        assert "toy_regression" in task_names()
        assert build_config({"model": "m", "task": "toy_regression", "data": {"train": "x.tsv"}})["task"] == \
            "toy_regression"
        import argparse
        from fastpeft.workflow import cli_finetune
        p = argparse.ArgumentParser()
        cli_finetune.add_arguments(p)
        assert "toy_regression" in p.format_help()
    finally:
        TASKS.pop("toy_regression")


def test_task_decides_metric_direction_and_default_hooks():
    task = get_task("sequence_classification")
    assert task.metric_mode("loss") == "min" and task.metric_mode("perplexity") == "min"
    assert task.metric_mode("macro_f1") == "max"
    assert task.num_examples({"input_ids": torch.zeros(5, 3)}) == 5
    assert task.collator(None).pad_token_id == 0
    assert get_task("ner").name == "token_classification" and get_task("lm").name == "causal_lm"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
