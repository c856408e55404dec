"""callbacks_from_config: the augment: section -> callbacks (+ mixup loss), clear errors; and Trainer runs
end to end with the callbacks on a tiny random BERT (sequence and token classification)."""
import math

import pytest
import torch

from fastpeft.augment import (EmbeddingMixup, EmbeddingSubstitution, NEFTune, RandomDeletion, TokenMasking,
                              callbacks_from_config)
from fastpeft.workflow import Trainer, TrainerConfig

from ..workflow.conftest import Kill, KillAt, make_cls_setup, tiny_cls_files, tiny_conll_files, tiny_model_dir  # noqa: F401

SPEC = [{"name": "embedding_substitution", "p": 0.5, "rate": 0.2, "k": 4},
        {"name": "mixup", "alpha": 0.4},
        {"name": "random_deletion", "p": 0.3},
        {"name": "neftune", "alpha": 5}]


def _cfg(**kw):
    base = dict(lr=5e-3, batch_size=16, max_steps=6, progress=False, seed=0, plot=False)
    base.update(kw)
    return TrainerConfig(**base)


def test_builds_callbacks_in_order(tiny_model_dir, tiny_cls_files):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    cbs, loss_fn = callbacks_from_config(SPEC, model=model, tokenizer=tok, task=task, seed=10)
    assert [type(c) for c in cbs] == [EmbeddingSubstitution, RandomDeletion, NEFTune, EmbeddingMixup]  # mixup last
    assert cbs[0].p == 0.5 and cbs[0].k == 4 and cbs[0].seed == 10 and cbs[1].seed == 12
    assert loss_fn == cbs[-1].loss_fn
    assert callbacks_from_config(None, model=model) == ([], None)
    assert callbacks_from_config([{"name": "neftune"}], task="sequence_classification")[1] is None


@pytest.mark.parametrize("spec, match", [
    ([{"name": "flip_words"}], r"^augment\[0\]\.name: unknown augmentation 'flip_words'; expected one of"),
    ([{"name": "neftune"}, {"p": 0.1}], r"^augment\[1\]\.name: missing"),
    ([{"name": "token_masking", "prob": 0.1}], r"^augment\[0\]\.prob: unknown key for token_masking"),
    ([{"name": "token_masking", "p": 1.5}], r"^augment\[0\]\.p: expected a number in \[0, 1\], got 1.5"),
    ([{"name": "mixup", "alpha": 0}], r"^augment\[0\]\.alpha: expected a positive number"),
    ([{"name": "neftune", "distribution": "x"}], r"^augment\[0\]\.distribution: expected one of"),
    ([{"name": "embedding_substitution"}], r"^augment\[0\]\.model: embedding_substitution needs the model"),
    ({"name": "mixup"}, r"^augment: expected a list of mappings"),
    (["mixup"], r"^augment\[0\]: expected a mapping"),
    ([{"name": "mixup"}, {"name": "mixup"}], r"mixup is listed more than once"),
])
def test_config_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        callbacks_from_config(spec, task="sequence_classification")


def test_task_checks():
    with pytest.raises(ValueError, match=r"^augment\[1\]\.name: random_swap cannot keep per-token labels aligned "
                                         r"for task 'token_classification'"):
        callbacks_from_config([{"name": "token_masking"}, {"name": "random_swap"}], task="token_classification")
    with pytest.raises(ValueError, match=r"^augment\[0\]\.name: mixup needs one class label per example"):
        callbacks_from_config([{"name": "mixup"}], task="ner")


def _train(tiny_model_dir, tiny_cls_files, spec, **cfg):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    cbs, loss_fn = callbacks_from_config(spec, model=model, tokenizer=tok, task=task)
    t = Trainer(model, task, tr, dev, _cfg(**cfg), tokenizer=tok, callbacks=cbs, loss_fn=loss_fn)
    return t, t.train(), cbs


def test_trainer_end_to_end_sequence_classification(tiny_model_dir, tiny_cls_files):
    seen = []

    class Spy:  # the batch the model trains on, after every augmentation
        def on_batch(self, trainer, batch):
            seen.append(batch)
            return batch

    spec = SPEC + [{"name": "random_swap", "p": 0.5}, {"name": "random_insertion", "p": 0.5},
                   {"name": "token_masking", "p": 0.2}]
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    cbs, loss_fn = callbacks_from_config(spec, model=model, tokenizer=tok, task=task)
    t = Trainer(model, task, tr, dev, _cfg(), tokenizer=tok, callbacks=cbs + [Spy()], loss_fn=loss_fn)
    r = t.train()
    assert r["steps"] == 6 and all(math.isfinite(l) for l in r["losses"])
    assert len(seen) == 6 and all("_mixup_lam" in b for b in seen)
    assert 0 <= r["best_metric"] <= 1
    assert not any(c.attached for c in cbs if hasattr(c, "attached"))   # hooks removed after training
    # the same spec and seed: the same run; no augmentation: a different one
    _, r2, _ = _train(tiny_model_dir, tiny_cls_files, spec)
    assert r2["losses"] == r["losses"]
    _, r3, _ = _train(tiny_model_dir, tiny_cls_files, [])
    assert r3["losses"] != r["losses"]
    # evaluation after training is clean: equal to a fresh evaluate() of the same weights
    assert t.evaluate()["accuracy"] == t.evaluate()["accuracy"]


def test_mixup_without_its_loss_is_refused(tiny_model_dir, tiny_cls_files):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    cbs, _ = callbacks_from_config([{"name": "mixup"}], model=model, tokenizer=tok, task=task)
    with pytest.raises(ValueError, match="^loss_fn: EmbeddingMixup needs"):
        Trainer(model, task, tr, dev, _cfg(), tokenizer=tok, callbacks=cbs).train()


def test_trainer_with_grad_accum_and_resume_matches(tmp_path, tiny_model_dir, tiny_cls_files):
    spec = [{"name": "embedding_substitution", "p": 0.5}, {"name": "neftune"}, {"name": "mixup"}]
    _, ref, _ = _train(tiny_model_dir, tiny_cls_files, spec, max_steps=4, grad_accum=2,
                       output_dir=str(tmp_path / "a"))

    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files)
    cbs, loss_fn = callbacks_from_config(spec, model=model, tokenizer=tok, task=task)
    with pytest.raises(Kill):
        Trainer(model, task, tr, dev, _cfg(max_steps=4, grad_accum=2, save_every=2, output_dir=str(tmp_path / "b")),
                tokenizer=tok, callbacks=cbs + [KillAt(3)], loss_fn=loss_fn).train()
    _, res, _ = _train(tiny_model_dir, tiny_cls_files, spec, max_steps=4, grad_accum=2,
                       output_dir=str(tmp_path / "b"), resume_from="latest")
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)


def test_trainer_end_to_end_token_classification(tiny_model_dir, tiny_conll_files):
    from fastpeft.workflow import get_task, load_tokenizer
    from fastpeft.workflow.pipeline import apply_method

    task = get_task("token_classification")
    tok = load_tokenizer(tiny_model_dir)
    tr = task.read(tiny_conll_files[0], {})
    task.fit_labels(tr)
    dev = task.read(tiny_conll_files[1], {})
    torch.manual_seed(0)
    model = apply_method(task.build_model(tiny_model_dir), {"name": "lora", "r": 4, "target_modules": ["query"]},
                         task)
    spec = [{"name": "token_masking", "p": 0.5}, {"name": "embedding_substitution", "p": 0.5},
            {"name": "neftune", "alpha": 5, "distribution": "gaussian"}]
    cbs, loss_fn = callbacks_from_config(spec, model=model, tokenizer=tok, task=task)
    labels_seen = []

    class Spy:
        def on_batch(self, trainer, batch):
            labels_seen.append(batch["labels"].clone())
            return batch

    class Before:
        def on_batch(self, trainer, batch):
            labels_seen.append(batch["labels"].clone())
            return batch

    t = Trainer(model, task, task.encode(tr, tok, 32), task.encode(dev, tok, 32), _cfg(max_steps=3, batch_size=8),
                tokenizer=tok, callbacks=[Before()] + cbs + [Spy()], loss_fn=loss_fn)
    r = t.train()
    assert r["steps"] == 3 and all(math.isfinite(l) for l in r["losses"])
    for before, after in zip(labels_seen[0::2], labels_seen[1::2]):
        assert torch.equal(before, after)                                  # per-token labels untouched
    assert "f1" in t.evaluate()
