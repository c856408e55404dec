"""relation_extraction: the official SemEval score, readers and their errors, encoding, training on a tiny
BERT, the CLI, and the saved adapter loading in HF PEFT."""
import json
import os

import pytest
import torch

from fastpeft.workflow import get_task, load_tokenizer
from fastpeft.workflow.data import DataError, make_loader
from fastpeft.workflow.tasks.relation_extraction import (EntityStartClassifier, mark_spans, read_semeval,
                                                         semeval_scores)

CE12, CE21, CW12, CW21 = "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Component-Whole(e1,e2)", "Component-Whole(e2,e1)"


# --------------------------------------------------------------------------- metric

def test_semeval_score_hand_computed():
    gold = [CE12, CE12, CE21, CW12, CW12, "Other", "Other", CW21]
    pred = [CE12, CE21, CE21, CW12, "Other", CE12, "Other", CW12]
    # Cause-Effect: correct 2 (#0, #2); predicted CE (any direction) 4 (#0, #1, #2, #5); gold CE 3
    p, r = 2 / 4, 2 / 3
    f_ce = 2 * p * r / (p + r)
    # Component-Whole: correct 1 (#3); predicted CW 2 (#3, #7: wrong direction); gold CW 3 (#3, #4, #7)
    p, r = 1 / 2, 1 / 3
    f_cw = 2 * p * r / (p + r)
    s = semeval_scores(pred, gold)
    assert s["macro_f1"] == pytest.approx((f_ce + f_cw) / 2)
    assert s["per_type_f1"] == pytest.approx({"Cause-Effect": f_ce, "Component-Whole": f_cw})
    mp, mr = 3 / 6, 3 / 6
    assert s["micro_f1"] == pytest.approx(2 * mp * mr / (mp + mr))
    assert s["accuracy"] == pytest.approx(4 / 8)


def test_semeval_score_direction_and_other():
    # the right type in the wrong direction scores nothing; Other never enters the average
    assert semeval_scores([CE21, CE12], [CE12, CE21])["macro_f1"] == 0.0
    assert semeval_scores([CE12, "Other"], [CE12, "Other"])["macro_f1"] == 1.0
    assert semeval_scores(["Other"], ["Other"]) == {"macro_f1": 0.0, "micro_f1": 0.0, "accuracy": 1.0,
                                                    "per_type_f1": {}}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        semeval_scores([CE12, CE12], [CE12])


# --------------------------------------------------------------------------- readers

SEMEVAL = '''1\t"The <e1>smoke</e1> came from the <e2>fire</e2>."
Cause-Effect(e2,e1)
Comment: a comment

2\t"A <e1>wheel</e1> of the <e2>car</e2> fell off."
Component-Whole(e1,e2)
Comment:

3\t"The <e1>child</e1> slept in the <e2>cradle</e2>."
Other
Comment:
'''


def _semeval(tmp_path, text=SEMEVAL, name="train.txt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_read_semeval(tmp_path):
    recs = read_semeval(_semeval(tmp_path))
    assert [r["label"] for r in recs] == [CE21, CW12, "Other"]
    assert recs[0]["e1"] == "smoke" and recs[0]["e2"] == "fire" and recs[1]["_line"] == 5
    # the unkeyed test file: ID<TAB>"sentence" lines only
    unkeyed = _semeval(tmp_path, '8001\t"The <e1>a</e1> b <e2>c</e2>."\n8002\t"<e1>x</e1> and <e2>y</e2>"\n', "t.txt")
    recs = read_semeval(unkeyed, with_labels=False)
    assert [r["id"] for r in recs] == ["8001", "8002"] and "label" not in recs[0]
    with pytest.raises(DataError, match=r"t.txt:2: expected the relation label"):
        read_semeval(unkeyed, with_labels=True)


@pytest.mark.parametrize("sentence, message", [
    ('The <e1>smoke</e1> came from the fire.', r"bad.txt:5: .*both entities marked.*<e2> x0, </e2> x0"),
    ('The <e1>smoke</e1> <e2>a</e2> <e2>b</e2>.', r"bad.txt:5: .*<e2> x2, </e2> x2"),
    ('The </e1>smoke<e1> came from <e2>fire</e2>.', r"bad.txt:5: </e1> comes before <e1>"),
    ('The <e1> </e1> came from <e2>fire</e2>.', r"bad.txt:5: entity e1 is empty"),
])
def test_semeval_bad_markers_name_file_and_line(tmp_path, sentence, message):
    text = SEMEVAL.split("\n\n")[0] + f'\n\n2\t"{sentence}"\nOther\n'
    with pytest.raises(DataError, match=message):
        read_semeval(_semeval(tmp_path, text, "bad.txt"))


def test_jsonl_spans_become_markers(tmp_path):
    text = "The smoke came from the fire."
    rows = [{"text": text, "e1": [4, 9], "e2": [24, 28], "label": CE21},
            {"text": "The <e1>x</e1> and <e2>y</e2>", "label": "Other"}]
    p = tmp_path / "re.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = get_task("relation_extraction").read(str(p), {})
    assert recs[0]["text"] == "The <e1>smoke</e1> came from the <e2>fire</e2>."
    assert (recs[0]["e1"], recs[0]["e2"], recs[0]["label"]) == ("smoke", "fire", CE21)
    assert recs[1]["e2"] == "y"
    # e2 before e1 in the text, too
    assert mark_spans("fire makes smoke", [11, 16], [0, 4], "x") == "<e2>fire</e2> makes <e1>smoke</e1>"


@pytest.mark.parametrize("row, message", [
    ({"text": "abc def", "e1": [0, 3], "label": "Other"}, "both entity spans e1 and e2 are needed"),
    ({"text": "abc def", "e1": [0, 3], "e2": [2, 5], "label": "Other"}, "overlap"),
    ({"text": "abc def", "e1": [0, 3], "e2": [4, 99], "label": "Other"}, r"e2: span \[4, 99\] is empty or outside"),
    ({"text": "abc def", "e1": "abc", "e2": [4, 7], "label": "Other"}, "e1: expected a character span"),
    ({"text": "abc <e1>def</e1>", "label": "Other"}, "both entities marked"),
    ({"text": "<e1>a</e1> <e2>b</e2>"}, "missing the label 'label'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, row, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "<e1>a</e1> <e2>b</e2>", "label": "Other"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        get_task("relation_extraction").read(str(p), {})


def test_labels_in_both_directions_other_first(tmp_path):
    task = get_task("relation_extraction")
    task.fit_labels(read_semeval(_semeval(tmp_path)))
    assert task.labels == ["Other", CE12, CE21, CW12, CW21]


# --------------------------------------------------------------------------- encoding

def test_encode_marker_positions_and_window(tmp_path, tiny_model_dir):
    task = get_task("relation_extraction")
    tok = load_tokenizer(tiny_model_dir)
    base = len(tok)
    long = " ".join(["word"] * 40)
    text = (f'1\t"{long} The <e1>smoke</e1> came from the <e2>fire</e2> {long}"\n{CE21}\n\n'
            + SEMEVAL.split("\n\n", 1)[1])
    recs = read_semeval(_semeval(tmp_path, text))
    task.fit_labels(recs)
    ds = task.encode(recs, tok, 24)
    ids_m = tok.convert_tokens_to_ids(["<e1>", "</e1>", "<e2>", "</e2>"])
    assert ids_m == list(range(base, base + 4))  # appended after the vocabulary
    for f, r in zip(ds.features, recs):
        assert len(f["input_ids"]) <= 24
        assert f["input_ids"][f["e1_index"]] == ids_m[0] and f["input_ids"][f["e2_index"]] == ids_m[2]
        assert f["input_ids"][0] == tok.cls_token_id and f["input_ids"][-1] == tok.sep_token_id
        assert task.labels[f["labels"]] == r["label"]
    toks = tok.convert_ids_to_tokens(ds.features[0]["input_ids"])
    assert "smoke" in toks and "fire" in toks
    # encoding again (validation, a second file) adds nothing more to the tokenizer
    task.encode(recs, tok, 24)
    assert len(tok) == base + 4
    far = f'1\t"<e1>a</e1> {long} {long} <e2>b</e2>"\nOther\n'
    with pytest.raises(DataError, match=r"far.txt:1: the entity markers are \d+ tokens apart; max_length=24"):
        task.encode(read_semeval(_semeval(tmp_path, far, "far.txt")), tok, 24)


def test_marker_embeddings_replace_marker_ids(tiny_model_dir):
    """EntityStartClassifier embeds ids >= marker_base with entity_markers, the rest with the encoder's table."""
    task = get_task("relation_extraction", labels=["Other", CE12, CE21])
    model = task.build_model(tiny_model_dir).eval()
    seen = {}
    model.encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    base = model.marker_base
    ids = torch.tensor([[101, base, 2000, base + 1, base + 2, 2001, base + 3, 102]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), e1_index=torch.tensor([1]),
                e2_index=torch.tensor([4]), labels=torch.tensor([2]))
    emb = seen["inputs_embeds"][0]
    word = model.encoder.get_input_embeddings().weight
    torch.testing.assert_close(emb[[0, 2, 5, 7]], word[[101, 2000, 2001, 102]])
    torch.testing.assert_close(emb[[1, 3, 4, 6]], model.entity_markers.weight)
    assert out.logits.shape == (1, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([2])))


# --------------------------------------------------------------------------- training, CLI, HF PEFT

SENTS = [("The {a} caused the {b}.", CE12), ("The {b} was caused by the {a}.", CE21),
         ("The {a} is part of the {b}.", CW12), ("The {b} has a {a}.", CW21), ("The {a} and the {b}.", "Other")]
NOUNS = ["smoke", "fire", "wheel", "car", "door", "house", "virus", "fever", "engine", "truck"]


@pytest.fixture(scope="module")
def tiny_re_files(tmp_path_factory):
    import random
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("re")

    def block(i):
        tmpl, label = SENTS[i % len(SENTS)]
        a, b = rng.sample(NOUNS, 2)
        if label.endswith("(e2,e1)"):  # e1 is the first mention in the text
            s = tmpl.format(a=f"<e2>{a}</e2>", b=f"<e1>{b}</e1>")
        else:
            s = tmpl.format(a=f"<e1>{a}</e1>", b=f"<e2>{b}</e2>")
        return f'{i + 1}\t"{s}"\n{label}\nComment:\n'

    tr, va = d / "train.txt", d / "val.txt"
    tr.write_text("\n".join(block(i) for i in range(120)))
    va.write_text("\n".join(block(i) for i in range(120, 150)))
    return str(tr), str(va)


def test_cli_finetune_evaluate_predict_and_hf_peft_loads(tmp_path, tiny_model_dir, tiny_re_files, capsys):
    import yaml
    from fastpeft.cli import main
    train, val = tiny_re_files
    cfg = {"model": tiny_model_dir, "task": "relation_extraction", "output_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation": val, "max_length": 32},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "trainer": {"lr": 1e-2, "epochs": 6, "batch_size": 16, "progress": False, "plot": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    fm = summary["final_metrics"]
    assert {"macro_f1", "micro_f1", "accuracy", "loss"} <= set(fm)
    assert fm["accuracy"] > 0.6, fm  # learns the templates (chance is 0.2)
    adapter = tmp_path / "run" / "adapter"
    acfg = json.load(open(adapter / "adapter_config.json"))
    assert set(acfg["modules_to_save"]) == {"classifier", "entity_markers"}

    assert main(["evaluate", "--adapter", str(adapter), "--data", val]) == 0
    assert json.loads(capsys.readouterr().out)["macro_f1"] == pytest.approx(fm["macro_f1"])
    assert main(["predict", "--adapter", str(adapter), "--data", val, "--limit", "3"]) == 0
    preds = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(preds) == 3 and all({"id", "e1", "e2", "relation", "reading"} <= set(p) for p in preds)
    p = preds[0]
    assert p["e1"] in p["reading"] and p["e2"] in p["reading"] and p["reading"].startswith(p["relation"].split("(")[0])

    bad = tmp_path / "bad.txt"
    bad.write_text('1\t"<e1>a</e1> b c"\nOther\n')
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(bad)]) == 2
    assert "bad.txt:1: expected each of <e1> </e1> <e2> </e2> exactly once" in capsys.readouterr().err

    # HF PEFT loads the adapter into the same model class and gives the same logits as fastpeft
    peft = pytest.importorskip("peft")
    import fastpeft
    task = get_task("relation_extraction", labels=json.load(open(adapter / "fastpeft_task.json"))["labels"])
    tok = load_tokenizer(tiny_model_dir)
    ds = task.encode(task.read(val, {}), tok, 32)
    batch = next(iter(make_loader(ds, task.collator(tok), 8, shuffle=False)))
    inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
    fp = fastpeft.PeftModel.from_pretrained(task.build_model(tiny_model_dir), str(adapter)).eval()
    hf = peft.PeftModel.from_pretrained(task.build_model(tiny_model_dir), str(adapter)).eval()
    assert isinstance(hf.base_model.model, EntityStartClassifier)
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, fp(**inputs).logits, rtol=1e-4, atol=1e-5)
        fresh = task.build_model(tiny_model_dir).eval()
        assert not torch.allclose(fresh(**inputs).logits, fp(**inputs).logits, atol=1e-3)  # the adapter matters


def test_hf_peft_trains_the_same_module(tiny_model_dir):
    """The model is an ordinary nn.Module for HF PEFT: LoRA + modules_to_save train, markers included."""
    peft = pytest.importorskip("peft")
    task = get_task("relation_extraction", labels=["Other", CE12, CE21])
    torch.manual_seed(0)
    m = peft.get_peft_model(task.build_model(tiny_model_dir), peft.LoraConfig(
        r=2, target_modules=["query", "value"], modules_to_save=["classifier", "entity_markers"]))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("entity_markers" in n for n in names) and any("lora_A" in n for n in names)


@pytest.mark.slow
@pytest.mark.usefixtures("real_data_run_selected")
def test_real_semeval_learns(shared_data, tmp_path):
    """The README's run: MiniLM + LoRA (examples/semeval_re_lora.yaml), 3,000 SemEval sentences for one
    epoch, official macro-F1 on 1,000 held-out ones (measured 0.614; HF PEFT beside it in
    benchmarks/real_tasks_encoder.py --task re)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "rte", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "real_tasks_encoder.py"))
    rte = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rte)
    tr, va = rte.split_semeval(os.path.join(shared_data, "semeval2010_task8", "train.txt"), str(tmp_path / "s"),
                               3000, 1000)
    r = rte.run_fastpeft(rte.config("semeval_re_lora.yaml", tr, va, str(tmp_path / "run"), progress=False))
    assert r["final_metrics"]["macro_f1"] > 0.5, r["final_metrics"]
