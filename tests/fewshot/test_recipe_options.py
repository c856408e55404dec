"""SetFit recipe options: oversampling pairs, the label-name prior head, the end-to-end phase, shot
augmentation, their config keys."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.fewshot import SetFitClassifier, SetFitConfig
from fastpeft.fewshot import setfit as setfit_mod
from fastpeft.fewshot.config import method_params, run_from_config, validate_section
from fastpeft.fewshot.head import LogisticHead
from fastpeft.fewshot.setfit import augmented_copies, label_name_prior, oversampled_pairs

from . import synthetic, tiny_bert  # noqa: F401  (fixture)
from .test_config import _cfg

NAMES = {"pos": "good", "neg": "bad"}
KW = dict(iterations=1, max_length=16, batch_size=8, lr=1e-2)


# ---- oversampling pairs -------------------------------------------------------------------------------
def test_oversampled_pairs_are_all_unique_pairs_balanced():
    labels = [0, 0, 0, 1, 1, 2]                 # pos pairs (i <= j, same class): 6 + 3 + 1 = 10; neg: 11
    pairs = oversampled_pairs(labels, seed=3)
    pos = [(a, b) for a, b, t in pairs if t == 1.0]
    neg = [(a, b) for a, b, t in pairs if t == 0.0]
    assert len(pos) == len(neg) == 11
    for a, b, t in pairs:
        assert a <= b and (labels[a] == labels[b]) == (t == 1.0)
    want_pos = {(i, j) for i in range(6) for j in range(i, 6) if labels[i] == labels[j]}
    want_neg = {(i, j) for i in range(6) for j in range(i, 6) if labels[i] != labels[j]}
    assert set(pos) == want_pos and len(want_pos) == 10        # every positive once, one repeated
    assert set(neg) == want_neg and len(neg) == len(set(neg))  # negatives: each exactly once
    assert pairs == oversampled_pairs(labels, seed=3) and pairs != oversampled_pairs(labels, seed=4)
    with pytest.raises(ValueError, match="labels"):
        oversampled_pairs([1, 1, 1])


def _spy_pairs(monkeypatch):
    seen = {}
    train = SetFitClassifier._contrastive_train

    def contrastive(self, tk, pairs, seed):
        seen["pairs"] = pairs
        return train(self, tk, pairs, seed)
    monkeypatch.setattr(SetFitClassifier, "_contrastive_train", contrastive)
    return seen


def test_fit_uses_oversampled_pairs_for_epochs(tiny_bert, monkeypatch):
    texts, labels = synthetic(3, seed=0)        # 6 shots: 2 * (3 + 3) = 12 positives, 9 negatives -> 24 pairs
    seen = _spy_pairs(monkeypatch)
    clf = SetFitClassifier(model=tiny_bert, sampling="oversampling", epochs=2, **dict(KW, iterations=5))
    clf.fit(texts, labels, seed=1)
    y = [clf.classes_.index(l) for l in labels]
    assert seen["pairs"] == oversampled_pairs(y, 1) and len(seen["pairs"]) == 24     # iterations not used
    assert len(clf.history) == 2 * math.ceil(24 / 8)
    SetFitClassifier(model=tiny_bert, **dict(KW, iterations=5)).fit(texts, labels, seed=1)
    assert len(seen["pairs"]) == 2 * 5 * 6                    # the default is still SetFit's R rounds


# ---- label-name prior head ----------------------------------------------------------------------------
def test_logistic_head_with_prior_reaches_its_optimum():
    g = torch.Generator().manual_seed(7)
    X = F.normalize(torch.randn(20, 6, generator=g), dim=-1)
    y = torch.randint(0, 3, (20,), generator=g)
    P = 3 * torch.randn(3, 6, generator=g)
    C = 0.7
    h = LogisticHead(6, 3).fit(X, y, C=C, max_iter=500, prior=P)
    W = h.weight.detach().clone().requires_grad_(True)
    b = h.bias.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(X @ W.T + b, y) + ((W - P) ** 2).sum() / (2 * C * len(y))
    gw, gb = torch.autograd.grad(loss, (W, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    assert not torch.allclose(h.weight, LogisticHead(6, 3).fit(X, y, C=C, max_iter=500).weight, atol=1e-2)
    # a very strong prior: the head is the prior (up to the bias)
    torch.testing.assert_close(LogisticHead(6, 3).fit(X, y, C=1e-7, prior=P).weight, P, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prior: expected a tensor of shape"):
        LogisticHead(6, 3).fit(X, y, prior=P[:2])
    with pytest.raises(ValueError, match="prior: contains non-finite"):
        LogisticHead(6, 3).fit(X, y, prior=P * float("nan"))


def test_label_name_prior_is_scaled_centred_template_embeddings():
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 4.0]])
    P = label_name_prior(embed, ["neg", "pos"], NAMES, "It is {}.", scale=10.0)
    assert seen == [["It is bad.", "It is good."]]
    torch.testing.assert_close(P, torch.tensor([[5.0, -5.0, -10.0], [-5.0, 5.0, 10.0]]))


def test_fit_with_prior_passes_it_to_the_head(tiny_bert, monkeypatch):
    texts, labels = synthetic(2, seed=2)
    got = {}
    fit = setfit_mod.LogisticHead.fit

    def head_fit(self, X, y, **kw):
        got.update(kw)
        return fit(self, X, y, **kw)
    monkeypatch.setattr(setfit_mod.LogisticHead, "fit", head_fit)
    clf = SetFitClassifier(model=tiny_bert, label_names=NAMES, head_prior="label_names", head_prior_scale=5.0,
                           head_C=1e-6, **KW).fit(texts, labels, seed=0)
    want = label_name_prior(clf.embed, clf.classes_, NAMES, clf.config.template, 5.0)
    torch.testing.assert_close(got["prior"], want)
    torch.testing.assert_close(clf.prior_, want)
    torch.testing.assert_close(clf.head.weight.detach(), want, atol=1e-3, rtol=0)   # C -> 0: the prior
    SetFitClassifier(model=tiny_bert, label_names=NAMES, **KW).fit(texts, labels, seed=0)
    assert got["prior"] is None                                                   # default: no prior


# ---- end-to-end phase ---------------------------------------------------------------------------------
def test_end_to_end_phase_trains_lora_and_head(tiny_bert, monkeypatch):
    texts, labels = synthetic(3, seed=3)        # 6 shots
    heads = []
    fit_head = SetFitClassifier._fit_head
    monkeypatch.setattr(SetFitClassifier, "_fit_head",
                        lambda self, t, y: heads.append(fit_head(self, t, y)) or heads[-1])
    base = SetFitClassifier(model=tiny_bert, **KW).fit(texts, labels, seed=0)
    w0 = heads[-1].weight.detach().clone()
    e2e = SetFitClassifier(model=tiny_bert, end_to_end_epochs=3, body_lr=1e-2, head_lr=1e-1, **KW)
    e2e.fit(texts, labels, seed=0)
    assert base.end_to_end_history == [] and len(e2e.end_to_end_history) == 3 * math.ceil(6 / 8)
    assert e2e.history == base.history                                  # same contrastive phase
    torch.testing.assert_close(w0, base.head.weight.detach())
    assert not torch.allclose(e2e.head.weight.detach(), w0)             # the head moved ...
    assert not torch.allclose(e2e.embed(texts), base.embed(texts))      # ... and so did LoRA
    again = SetFitClassifier(model=tiny_bert, end_to_end_epochs=3, body_lr=1e-2, head_lr=1e-1, **KW)
    assert again.fit(texts, labels, seed=0).end_to_end_history == e2e.end_to_end_history
    assert set(e2e.predict(texts)) <= {"pos", "neg"}


# ---- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(sampling="unique"), "sampling: expected one of"),
    (dict(head_prior="labels"), "head_prior: expected one of"),
    (dict(head_prior="label_names"), "head_prior: 'label_names' needs label_names"),
    (dict(label_names=NAMES, head_prior="label_names", head_prior_scale=0), "head_prior_scale"),
    (dict(end_to_end_epochs=-1), "end_to_end_epochs"),
    (dict(end_to_end_epochs=1.5), "end_to_end_epochs"),
    (dict(body_lr=0), "body_lr"),
    (dict(head_lr=-1e-2), "head_lr"),
])
def test_setfit_config_new_keys_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SetFitConfig(**kw)


def test_config_section_new_keys():
    s = validate_section({"sampling": "oversampling", "label_names": {0: "negative", 1: "positive"},
                          "head_prior": "label_names", "head_prior_scale": "10", "end_to_end_epochs": 4,
                          "body_lr": "1e-4", "head_lr": 1e-2})
    p = method_params(s, "setfit", "minilm")
    assert p["sampling"] == "oversampling" and p["head_prior"] == "label_names" and p["head_prior_scale"] == 10.0
    assert p["end_to_end_epochs"] == 4 and p["body_lr"] == 1e-4 and p["head_lr"] == 1e-2
    SetFitConfig(**{k: v for k, v in p.items() if k != "model"})          # the section's keys build a config


@pytest.mark.parametrize("section, match", [
    ({"sampling": "all"}, "fewshot.sampling"),
    ({"head_prior": "label_names"}, "fewshot.head_prior: 'label_names' needs fewshot.label_names"),
    ({"label_names": NAMES, "head_prior_scale": 5}, "fewshot.head_prior_scale: only applies"),
    ({"end_to_end_epochs": -2}, "fewshot.end_to_end_epochs"),
    ({"body_lr": 1e-4}, "only apply with fewshot.end_to_end_epochs"),
    ({"end_to_end_epochs": 2, "head_lr": 0}, "fewshot.head_lr"),
    ({"method": "head_only", "sampling": "oversampling"}, "do not apply to method 'head_only'"),
])
def test_config_section_new_keys_errors(section, match):
    with pytest.raises(ValueError, match=match):
        validate_section(section)


def test_run_from_config_with_recipe_options(tmp_path, tiny_bert):
    cfg = _cfg(tmp_path, tiny_bert, {"shots": 2, "seeds": [0], "method": "setfit", "sampling": "oversampling",
                                     "label_names": NAMES, "template_samples": 1, "head_prior": "label_names",
                                     "end_to_end_epochs": 1, "augment": ["random_deletion"], "augment_rate": 0.5})
    res = run_from_config(cfg, log=None)
    assert res["fewshot"]["sampling"] == "oversampling" and res["fewshot"]["end_to_end_epochs"] == 1
    assert res["fewshot"]["augment"] == ["random_deletion"] and res["fewshot"]["augment_rate"] == 0.5
    assert len(res["per_seed"]) == 1 and 0.0 <= res["mean"] <= 1.0


# ---- several templates --------------------------------------------------------------------------------
def test_several_templates():
    from fastpeft.fewshot.setfit import templated_examples
    texts, labels = templated_examples(["neg", "pos"], NAMES, ["It is {}.", "So {}!"], 2)
    assert texts == ["It is bad."] * 2 + ["So bad!"] * 2 + ["It is good."] * 2 + ["So good!"] * 2
    assert labels == ["neg"] * 4 + ["pos"] * 4
    E = {"It is bad.": [1.0, 0.0], "So bad!": [3.0, 2.0], "It is good.": [0.0, 2.0], "So good!": [0.0, 4.0]}
    P = label_name_prior(lambda t: torch.tensor([E[x] for x in t]), ["neg", "pos"], NAMES,
                         ["It is {}.", "So {}!"], scale=1.0)
    mean = torch.tensor([[2.0, 1.0], [0.0, 3.0]])                   # per class, over the templates
    torch.testing.assert_close(P, mean - mean.mean(0))
    for bad, match in [([], "non-empty list"), (["a {}", "a {}"], "distinct"), (["a {}", "b"], "exactly one")]:
        with pytest.raises(ValueError, match=match):
            SetFitConfig(label_names=NAMES, template=bad)
    assert validate_section({"label_names": NAMES, "template": ["a {}", "b {}."]})["template"] == ["a {}", "b {}."]
    with pytest.raises(ValueError, match="fewshot.template"):
        validate_section({"label_names": NAMES, "template": ["a {}", 3]})


# ---- shot augmentation --------------------------------------------------------------------------------
def _tok():
    from fastpeft.fewshot.encoder import resolve_encoder_path
    from fastpeft.workflow.models import load_tokenizer
    return load_tokenizer(resolve_encoder_path(None))


def test_augmented_copies_order_and_content():
    from fastpeft.augment.text import RandomDeletion, TokenMasking
    from fastpeft.fewshot.encoder import Tokenized
    tok = _tok()
    tk = Tokenized(tok, ["the movie was really great fun", "a dull and boring plot", "ok"], 32)
    ops = [RandomDeletion(p=1.0, rate=0.25, seed=1, tokenizer=tok), TokenMasking(p=1.0, rate=0.25, seed=2,
                                                                                  tokenizer=tok)]
    rows = augmented_copies(tk, [0, 1, 2], ops, copies=2)
    assert len(rows) == 2 * 2 * 3                                  # op, copy, row
    special = {tok.cls_token_id, tok.sep_token_id}
    for t, row in enumerate(rows):
        src = tk.input_ids[t % 3]
        assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id and tok.pad_token_id not in row
        real = len(src) - 2
        n = max(1, round(0.25 * real))
        if t < 6:                                                  # deletion: n real tokens dropped, order kept
            assert len(row) == len(src) - min(n, real - 1)        # at least one real token stays
            it = iter(src)
            assert all(any(x == y for y in it) for x in row)       # a subsequence of the source
        else:                                                      # masking: n real tokens -> [MASK]
            assert len(row) == len(src)
            changed = [i for i, (a, b) in enumerate(zip(src, row)) if a != b]
            assert len(changed) == n and all(row[i] == tok.mask_token_id for i in changed)
            assert all(src[i] not in special for i in changed)
    assert rows[0:3] != rows[3:6]                                  # the two copies differ
    again = [RandomDeletion(p=1.0, rate=0.25, seed=1, tokenizer=tok), TokenMasking(p=1.0, rate=0.25, seed=2,
                                                                                   tokenizer=tok)]
    assert augmented_copies(tk, [0, 1, 2], again, copies=2) == rows   # seeded
    assert augmented_copies(tk, [], ops, copies=2) == []


def test_fit_with_augment_adds_labelled_copies_of_the_real_shots(tiny_bert, monkeypatch):
    texts, labels = synthetic(3, seed=5)        # 6 shots
    seen = {}
    fit_head = SetFitClassifier._fit_head

    def spy(self, tk, y):
        seen["ids"], seen["y"] = list(tk.input_ids), list(y)
        return fit_head(self, tk, y)
    monkeypatch.setattr(SetFitClassifier, "_fit_head", spy)
    pairs = _spy_pairs(monkeypatch)
    clf = SetFitClassifier(model=tiny_bert, label_names=NAMES, template_samples=1,
                           augment=["random_swap", "token_masking"], augment_copies=2, augment_rate=0.3, **KW)
    clf.fit(texts, labels, seed=0)
    assert clf.templated_ == 2 and clf.augmented_ == 2 * 2 * 6
    n = 6 + 2 + 24
    assert len(seen["ids"]) == len(seen["y"]) == n
    assert len(pairs["pairs"]) == 2 * KW["iterations"] * n and max(max(a, b) for a, b, _ in pairs["pairs"]) == n - 1
    y = [clf.classes_.index(l) for l in labels]
    assert seen["y"][8:] == [y[t % 6] for t in range(24)]          # every copy keeps its shot's label
    assert clf.train_tokens_.input_ids == seen["ids"] and clf.train_y_ == seen["y"]    # kept on the classifier
    swapped = 0
    for t in range(24):                                            # ... and its tokens (swap / mask only)
        src, row = seen["ids"][t % 6], seen["ids"][8 + t]
        assert len(row) == len(src)
        if t < 12:                                                 # (swapping two equal words changes nothing)
            assert sorted(row) == sorted(src)
            swapped += row != src
        else:
            assert row != src
    assert swapped >= 6
    again = SetFitClassifier(model=tiny_bert, label_names=NAMES, template_samples=1,
                             augment=["random_swap", "token_masking"], augment_copies=2, augment_rate=0.3, **KW)
    assert again.fit(texts, labels, seed=0).history == clf.history                     # seeded
    plain = SetFitClassifier(model=tiny_bert, label_names=NAMES, template_samples=1, **KW).fit(texts, labels, seed=0)
    assert plain.augmented_ == 0 and len(seen["ids"]) == 8                             # off by default


def test_fit_with_embedding_substitution(tiny_bert):
    texts, labels = synthetic(2, seed=6)
    clf = SetFitClassifier(model=tiny_bert, augment=["embedding_substitution"], **KW).fit(texts, labels, seed=0)
    assert clf.augmented_ == 4 and set(clf.predict(texts)) <= {"pos", "neg"}


@pytest.mark.parametrize("kw, match", [
    (dict(augment=["paraphrase"]), r"augment: unknown operation\(s\) \['paraphrase'\]"),
    (dict(augment="random_swap"), "augment: expected a list of distinct names"),
    (dict(augment=["random_swap", "random_swap"]), "augment: expected a list of distinct names"),
    (dict(augment_copies=0), "augment_copies: expected an int >= 1"),
    (dict(augment_rate=0), r"augment_rate: expected a number in \(0, 1\]"),
    (dict(augment_rate=1.5), "augment_rate"),
])
def test_setfit_config_augment_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SetFitConfig(**kw)


def test_config_section_augment():
    s = validate_section({"augment": "random_deletion", "augment_copies": 3, "augment_rate": "0.2"})
    p = method_params(s, "setfit", "minilm")
    assert p["augment"] == ["random_deletion"] and p["augment_copies"] == 3 and p["augment_rate"] == 0.2
    SetFitConfig(**{k: v for k, v in p.items() if k != "model"})
    for section, match in [({"augment": ["nope"]}, r"fewshot.augment: unknown operation"),
                           ({"augment_copies": 2}, "only apply with a non-empty fewshot.augment"),
                           ({"augment": ["random_swap"], "augment_rate": 0}, r"fewshot.augment_rate: expected a "
                                                                               r"number in \(0, 1\]"),
                           ({"method": "head_only", "augment": ["random_swap"]}, "do not apply to method")]:
        with pytest.raises(ValueError, match=match):
            validate_section(section)
