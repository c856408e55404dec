"""SetFit's templated examples (setfit.get_templated_dataset): generation, use in fit(), errors, config keys."""
import pytest

from fastpeft.fewshot import SetFitClassifier, SetFitConfig
from fastpeft.fewshot import setfit as setfit_mod
from fastpeft.fewshot.config import method_params, run_from_config, validate_section
from fastpeft.fewshot.setfit import DEFAULT_TEMPLATE, templated_examples

from . import synthetic, tiny_bert  # noqa: F401  (fixture)
from .test_config import _cfg

NAMES = {0: "negative", 1: "positive"}


def test_templated_examples_content_and_count():
    assert DEFAULT_TEMPLATE == "This sentence is {}"
    texts, labels = templated_examples(["0", "1"], NAMES, sample_size=3)     # int keys name str labels
    assert texts == ["This sentence is negative"] * 3 + ["This sentence is positive"] * 3
    assert labels == ["0"] * 3 + ["1"] * 3
    texts, labels = templated_examples(["neg", "pos"], {"pos": "great", "neg": "awful"}, "Review: {}.", 2)
    assert texts == ["Review: awful."] * 2 + ["Review: great."] * 2 and labels == ["neg", "neg", "pos", "pos"]
    assert templated_examples([0, 1, 2], {0: "a", 1: "b", 2: "c"}, sample_size=0) == ([], [])


@pytest.mark.parametrize("kw, match", [
    (dict(classes=["0", "1", "2"]), "label_names: no name for label"),
    (dict(classes=["0"]), r"label_names: label\(s\) \['1'\] are not among"),
    (dict(label_names={0: "negative", 1: ""}), "label_names: expected a non-empty string name"),
    (dict(label_names={0: "a", "0": "b", 1: "c"}), "label_names: label '0' is given two names"),
    (dict(label_names=["negative", "positive"]), "label_names: expected a non-empty mapping"),
    (dict(template="This sentence is"), "template: expected a string with exactly one"),
    (dict(template="{} and {}"), "template: expected a string with exactly one"),
    (dict(template="{name} is {}"), "template: expected a string with exactly one"),
    (dict(sample_size=-1), "sample_size"),
])
def test_templated_examples_errors(kw, match):
    args = dict(classes=["0", "1"], label_names=NAMES, template=DEFAULT_TEMPLATE, sample_size=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        templated_examples(**args)


def test_setfit_config_template_keys():
    c = SetFitConfig()
    assert c.label_names is None and c.template == "This sentence is {}" and c.template_samples == 8
    for kw, match in [(dict(template_samples=-1), "template_samples"), (dict(template_samples=1.5), "template_samples"),
                      (dict(template="no placeholder"), "template"), (dict(label_names={"0": " "}), "label_names"),
                      (dict(label_names="0=negative"), "label_names")]:
        with pytest.raises(ValueError, match=match):
            SetFitConfig(**kw)


def _spy(monkeypatch):
    """Record the texts/pairs the contrastive stage sees and the rows the head is fitted on."""
    seen = {}
    train = SetFitClassifier._contrastive_train

    def contrastive(self, tk, pairs, seed):
        seen["n_texts"], seen["pairs"] = len(tk), pairs
        return train(self, tk, pairs, seed)
    fit = setfit_mod.LogisticHead.fit

    def head_fit(self, X, y, **kw):
        seen["head_rows"], seen["head_y"] = X.shape[0], y.tolist()
        return fit(self, X, y, **kw)
    monkeypatch.setattr(SetFitClassifier, "_contrastive_train", contrastive)
    monkeypatch.setattr(setfit_mod.LogisticHead, "fit", head_fit)
    return seen


def test_setfit_fit_adds_templates_to_pairs_and_head(tiny_bert, monkeypatch):
    texts, labels = synthetic(2, seed=0)                       # 4 shots, "pos"/"neg" interleaved
    seen = _spy(monkeypatch)
    embedded = []                                              # the examples the head is fitted on, decoded
    fit_head = SetFitClassifier._fit_head
    monkeypatch.setattr(SetFitClassifier, "_fit_head", lambda self, tk, y: embedded.append(
        [self.tokenizer.decode(r, skip_special_tokens=True) for r in tk.input_ids]) or fit_head(self, tk, y))
    clf = SetFitClassifier(model=tiny_bert, iterations=2, max_length=16, batch_size=8,
                           label_names={"pos": "good", "neg": "bad"}, template_samples=3)
    clf.fit(texts, labels, seed=0)
    n = len(texts) + 2 * 3
    assert clf.templated_ == 6 and seen["n_texts"] == n and seen["head_rows"] == n
    assert len(seen["pairs"]) == 2 * 2 * n                     # every example, templated ones included, paired
    templ = set(range(len(texts), n))
    assert any(a in templ for a, b, _ in seen["pairs"]) and any(b in templ for a, b, _ in seen["pairs"])
    # templated examples carry their class: "This sentence is good" pairs positively only with "pos" examples
    y = [clf.classes_.index(l) for l in labels] + [clf.classes_.index(c) for c in ("neg",) * 3 + ("pos",) * 3]
    assert seen["head_y"] == y
    assert all((y[a] == y[b]) == (t == 1.0) for a, b, t in seen["pairs"])
    assert embedded[0][len(texts):] == ["this sentence is bad"] * 3 + ["this sentence is good"] * 3   # uncased
    assert set(clf.predict(texts)) <= {"pos", "neg"}


def test_setfit_templates_off(tiny_bert, monkeypatch):
    texts, labels = synthetic(2, seed=1)
    seen = _spy(monkeypatch)
    kw = dict(model=tiny_bert, iterations=1, max_length=16, batch_size=8)
    a = SetFitClassifier(**kw).fit(texts, labels, seed=0)
    assert a.templated_ == 0 and seen["n_texts"] == len(texts) == seen["head_rows"]
    b = SetFitClassifier(**kw, label_names={"pos": "good", "neg": "bad"}, template_samples=0).fit(texts, labels)
    assert b.templated_ == 0 and seen["n_texts"] == len(texts) and a.history == b.history
    with pytest.raises(ValueError, match="label_names: no name for label"):
        SetFitClassifier(**kw, label_names={"pos": "good"}).fit(texts, labels)
    with pytest.raises(ValueError, match="label_names"):
        SetFitClassifier(**kw, label_names={"pos": "good", "neg": "bad", "meh": "so-so"}).fit(texts, labels)


def test_config_section_template_keys():
    s = validate_section({"label_names": {0: "negative", 1: "positive"}, "template": "It was {}.",
                          "template_samples": "4"})
    assert s["label_names"] == NAMES and s["template"] == "It was {}." and s["template_samples"] == 4
    assert validate_section({})["label_names"] is None
    p = method_params(s, "setfit", "minilm")
    assert p["label_names"] == NAMES and p["template"] == "It was {}." and p["template_samples"] == 4
    assert "label_names" not in method_params(dict(s, method="setfit"), "head_only", "minilm")
    assert validate_section({"label_names": NAMES, "template_samples": 0})["template_samples"] == 0


@pytest.mark.parametrize("section, match", [
    ({"label_names": ["negative", "positive"]}, "fewshot.label_names: expected a mapping"),
    ({"label_names": {0: ""}}, "fewshot.label_names: expected a non-empty string"),
    ({"label_names": NAMES, "template": "no slot"}, "fewshot.template: expected a string with exactly one"),
    ({"label_names": NAMES, "template_samples": -1}, "fewshot.template_samples"),
    ({"template": "It was {}."}, "only apply with fewshot.label_names"),
    ({"template_samples": 4}, "only apply with fewshot.label_names"),
    ({"method": "prototype", "label_names": NAMES}, "do not apply to method 'prototype'"),
])
def test_config_section_template_errors(section, match):
    with pytest.raises(ValueError, match=match):
        validate_section(section)


def test_run_from_config_with_templates(tmp_path, tiny_bert):
    cfg = _cfg(tmp_path, tiny_bert, {"shots": 2, "seeds": [0], "method": "setfit", "iterations": 1,
                                     "label_names": {"pos": "good", "neg": "bad"}, "template_samples": 2})
    res = run_from_config(cfg, log=None)
    assert res["fewshot"]["label_names"] == {"pos": "good", "neg": "bad"} and res["fewshot"]["template_samples"] == 2
    assert len(res["per_seed"]) == 1 and 0.0 <= res["mean"] <= 1.0
