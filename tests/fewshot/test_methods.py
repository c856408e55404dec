"""SetFit-style method and baselines on a tiny random BERT and a synthetic separable dataset."""
import pytest
import torch

from fastpeft.fewshot import (HeadOnlyClassifier, PromptTuningClassifier, PrototypeClassifier, SetFitClassifier,
                              evaluate_seeds, make_classifier)
from fastpeft.workflow.metrics import accuracy

from . import synthetic, tiny_bert  # noqa: F401  (fixture)

SETFIT = dict(iterations=4, lr=1e-2, r=8, lora_alpha=16, batch_size=16, max_length=24, epochs=2)


def _class_gap(X, labels):
    """mean cosine of same-class pairs minus mean cosine of cross-class pairs (X rows normalised)."""
    S = X @ X.T
    same = torch.tensor([[a == b for b in labels] for a in labels])
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return float(S[same & off].mean() - S[~same].mean())


def test_setfit_on_minilm_pulls_classes_apart_on_unseen_texts():
    """2 shots per class, a couple of pair iterations: the adapted encoder separates the classes of
    *held-out* texts more than the frozen one does, and the head classifies them."""
    texts, labels = synthetic(2, seed=0)
    test_t, test_l = synthetic(8, seed=1)
    clf = SetFitClassifier(iterations=2, lr=2e-3, batch_size=4, max_length=16).fit(texts, labels, seed=0)
    frozen = HeadOnlyClassifier(max_length=16).fit(texts, labels)
    gap_frozen = _class_gap(frozen.encoder.embed(test_t), test_l)
    gap_tuned = _class_gap(clf.embed(test_t), test_l)
    assert gap_tuned > gap_frozen + 0.05, (gap_tuned, gap_frozen)
    assert sum(clf.history[-2:]) / 2 < sum(clf.history[:2]) / 2          # the pair loss goes down
    assert accuracy(clf.predict(test_t), test_l) >= 0.9
    assert set(clf.predict(test_t[:4])) <= {"pos", "neg"}


def test_setfit_is_deterministic_and_seeded(tiny_bert):
    texts, labels = synthetic(3, seed=2)
    kw = dict(SETFIT, iterations=1, epochs=1)
    before = torch.random.get_rng_state()
    a = SetFitClassifier(model=tiny_bert, **kw).fit(texts, labels, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)       # global RNG untouched
    b = SetFitClassifier(model=tiny_bert, **kw).fit(texts, labels, seed=3)
    c = SetFitClassifier(model=tiny_bert, **kw).fit(texts, labels, seed=4)
    assert a.history == b.history
    assert torch.equal(a.embed(texts), b.embed(texts))
    assert a.history != c.history


def test_setfit_bad_config_and_input(tiny_bert):
    with pytest.raises(ValueError, match="iterations"):
        SetFitClassifier(iterations=0)
    with pytest.raises(ValueError, match="loss"):
        SetFitClassifier(loss="triplet")
    with pytest.raises(ValueError, match="lr"):
        SetFitClassifier(lr=-1)
    with pytest.raises(ValueError, match="unexpected keyword|bogus"):
        SetFitClassifier(bogus=1)
    with pytest.raises(ValueError, match="labels"):
        SetFitClassifier(model=tiny_bert).fit(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="2 classes"):
        SetFitClassifier(model=tiny_bert).fit(["a", "b"], ["x", "x"])
    with pytest.raises(RuntimeError, match="fit"):
        SetFitClassifier(model=tiny_bert).predict(["a"])


def test_prototype_and_head_only_share_features(tiny_bert):
    texts, labels = synthetic(4, seed=3)
    p = PrototypeClassifier(tiny_bert).fit(texts, labels)
    h = HeadOnlyClassifier(encoder=p.encoder).fit(texts, labels)
    assert h.encoder is p.encoder
    X = p.encoder.embed(texts)
    assert torch.allclose(X.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    # the prototype rule by hand
    y = torch.tensor([p.classes_.index(l) for l in labels])
    P = torch.stack([X[y == c].mean(0) for c in range(2)])
    P = P / P.norm(dim=1, keepdim=True)
    assert p.predict(texts) == [p.classes_[i] for i in (X @ P.T).argmax(-1).tolist()]
    assert len(h.predict(texts)) == len(texts)


def test_prompt_tuning_trains_prompt_and_head_only(tiny_bert):
    texts, labels = synthetic(4, seed=4)
    clf = PromptTuningClassifier(model=tiny_bert, epochs=15, lr=3e-2, num_virtual_tokens=4, batch_size=8)
    clf.fit(texts, labels, seed=0)
    trainable = {n for n, p in clf.model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n or "modules_to_save" in n for n in trainable)
    assert sum(clf.history[-2:]) / 2 < sum(clf.history[:2]) / 2
    assert len(clf.predict(texts)) == len(texts) and set(clf.predict(texts)) <= {"pos", "neg"}
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningClassifier(num_virtual_tokens=0)


def test_evaluate_seeds(tiny_bert):
    texts, labels = synthetic(6, seed=5)
    ev_t, ev_l = synthetic(5, seed=6)
    res = evaluate_seeds("prototype", texts, labels, ev_t, ev_l, k=2, seeds=[0, 1, 2], params={"model": tiny_bert})
    assert [r["seed"] for r in res["per_seed"]] == [0, 1, 2]
    accs = [r["accuracy"] for r in res["per_seed"]]
    assert res["mean"] == pytest.approx(sum(accs) / 3)
    assert all(len(r["shots"]) == 4 for r in res["per_seed"])
    with pytest.raises(ValueError, match="method"):
        evaluate_seeds("knn", texts, labels, ev_t, ev_l, k=2)
    with pytest.raises(ValueError, match="method"):
        make_classifier("knn")
    with pytest.raises(ValueError, match="k=7"):
        evaluate_seeds("prototype", texts, labels, ev_t, ev_l, k=7, params={"model": tiny_bert})
    with pytest.raises(ValueError, match="eval_labels"):
        evaluate_seeds("prototype", texts, labels, ev_t, ["zzz"] * len(ev_t), k=2)
    with pytest.raises(ValueError, match="seeds"):
        evaluate_seeds("prototype", texts, labels, ev_t, ev_l, k=2, seeds=[])


def test_setfit_save_and_load_round_trip(tiny_bert, tmp_path):
    """save_pretrained writes the LoRA adapter (PEFT format), the head and the labels; from_pretrained
    rebuilds a classifier with identical embeddings and predictions."""
    texts, labels = synthetic(3, seed=5)
    clf = SetFitClassifier(model=tiny_bert, **dict(SETFIT, iterations=1, epochs=1)).fit(texts, labels, seed=0)
    with pytest.raises(RuntimeError, match="fit"):
        SetFitClassifier(model=tiny_bert).save_pretrained(str(tmp_path / "unfitted"))
    out = clf.save_pretrained(str(tmp_path / "clf"))
    import os
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(out, "encoder")))
    back = SetFitClassifier.from_pretrained(out)
    torch.testing.assert_close(back.embed(texts), clf.embed(texts), rtol=0, atol=0)
    assert back.predict(texts) == clf.predict(texts) and back.classes_ == clf.classes_
    assert not torch.equal(back.embed(texts), HeadOnlyClassifier(model=tiny_bert, max_length=24).fit(
        texts, labels).encoder.embed(texts))                      # the adapter was really loaded
    with pytest.raises(FileNotFoundError, match="setfit_config.json"):
        SetFitClassifier.from_pretrained(str(tmp_path))
