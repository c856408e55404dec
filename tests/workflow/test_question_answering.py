"""question_answering: the official SQuAD metric, the reader and its errors, windows and labels, span
decoding, training on a tiny BERT through the CLI, and the adapter loading in HF PEFT."""
import json
import os

import pytest
import torch

from fastpeft.workflow import get_task, load_tokenizer
from fastpeft.workflow.data import DataError, make_loader
from fastpeft.workflow.tasks.question_answering import (best_span, compute_exact, compute_f1, normalize_answer,
                                                        read_squad, squad_scores)


# --------------------------------------------------------------------------- the official metric

@pytest.mark.parametrize("text, norm", [
    ("The Cat!", "cat"), ("  a  quick,  brown fox ", "quick brown fox"), ("Denver Broncos.", "denver broncos"),
    ("an apple, the pear and a plum", "apple pear and plum"), ("theatre", "theatre"),  # whole words only
    ("U.S.-based", "usbased"), ("", ""), ("the", ""),
])
def test_normalize_answer_like_the_official_script(text, norm):
    assert normalize_answer(text) == norm


def test_exact_and_f1_like_the_official_script():
    assert compute_exact("Denver Broncos", "the denver broncos.") == 1
    assert compute_exact("Denver Broncos", "Broncos") == 0
    assert compute_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # P 2/3, R 1
    assert compute_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap: 2 of 3
    assert compute_f1("", "") == 1.0 and compute_f1("", "x") == 0.0 and compute_f1("x", "") == 0.0
    assert compute_f1("a b", "c d") == 0.0


def test_squad_scores_with_no_answer_and_best_threshold():
    golds = {"q1": ["Denver Broncos", "Broncos"], "q2": ["the cat sat"], "q3": [], "q4": ["the"]}
    preds = {"q1": "Broncos", "q2": "cat sat down", "q3": "", "q4": "something"}
    s = squad_scores(golds, preds, na_probs={"q1": -2.0, "q2": 1.0, "q3": 3.0, "q4": 0.5})
    # q4's only gold answer normalises to "" -> an unanswerable question, as in the official script
    assert s["total"] == 4 and s["HasAns_total"] == 2 and s["NoAns_total"] == 2
    assert s["exact"] == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)
    assert s["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert s["HasAns_f1"] == pytest.approx(100 * 1.8 / 2) and s["NoAns_exact"] == pytest.approx(50.0)
    # find_best_thresh: start from "all no answer" = 2 correct; in na order q1 (+1 -> 3, best so far),
    # q4 (-1: answered a no-answer question -> 2), q2 (+0.8 -> 2.8), q3 (0: already empty) -> 3 at -2.0
    assert s["best_f1"] == pytest.approx(100 * 3 / 4) and s["best_f1_thresh"] == -2.0
    assert s["best_exact"] == pytest.approx(100 * 3 / 4) and s["best_exact_thresh"] == -2.0
    s = squad_scores(golds, preds, na_probs={"q1": -2.0, "q2": 1.0, "q3": 3.0, "q4": 5.0})
    # q4 last: 2 -> 3 (q1) -> 3.8 (q2) -> 3.8 (q3) -> 2.8 (q4): best 3.8 at q2's 1.0 (exact: 3 at -2.0)
    assert s["best_f1"] == pytest.approx(100 * 3.8 / 4) and s["best_f1_thresh"] == 1.0
    assert s["best_exact"] == pytest.approx(100 * 3 / 4) and s["best_exact_thresh"] == -2.0
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        squad_scores(golds, {"q1": "", "q2": "", "q3": ""})


# --------------------------------------------------------------------------- reader

CONTEXT = ("Normandy is a region in France. The Normans gave their name to Normandy in the 10th and 11th "
           "centuries. They were descended from Norse raiders.")


def _squad(tmp_path, qas, name="s.json", context=CONTEXT, version="v2.0"):
    doc = {"version": version, "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=1))
    return str(p)


def _line_of(path, text):
    return next(i for i, l in enumerate(open(path).read().splitlines(), 1) if text in l)


def _qa(qid, q, answer=None, impossible=False):
    ans = [] if answer is None else [{"text": answer, "answer_start": CONTEXT.index(answer)}]
    return {"id": qid, "question": q, "answers": ans, "is_impossible": impossible}


def test_read_squad_records(tmp_path):
    p = _squad(tmp_path, [_qa("a", "Where is Normandy?", "France"), _qa("b", "Who is the king?", impossible=True)])
    recs = read_squad(p)
    assert [r["id"] for r in recs] == ["a", "b"]
    assert recs[0]["answers"] == [{"text": "France", "start": CONTEXT.index("France")}]
    assert recs[1]["is_impossible"] and recs[1]["answers"] == [] and recs[0]["_v2"]
    assert recs[0]["_line"] == _line_of(p, '"id": "a"')


def test_answer_not_at_its_offset_names_file_and_question(tmp_path):
    bad = _qa("q7", "Where is Normandy?", "France")
    bad["answers"][0]["answer_start"] += 2
    p = _squad(tmp_path, [_qa("a", "x?", "Normans"), bad], name="bad.json")
    line = _line_of(p, '"id": "q7"')
    with pytest.raises(DataError, match=rf"bad.json:{line}: question 'q7' \(article 'Normans'\): answer 0 'France' "
                                        r"does not match the context at answer_start=\d+ \(the context there reads 'ance. '\)"):
        read_squad(p)


@pytest.mark.parametrize("qa, message", [
    ({"id": "x", "question": "q?", "answers": [{"text": "France", "answer_start": 24}], "is_impossible": True},
     "is_impossible is true but the question has answers"),
    ({"id": "x", "question": "q?", "answers": []}, "no answers"),
    ({"id": "x", "question": "", "answers": []}, "missing or empty 'question'"),
    ({"id": "x", "question": "q?", "answers": [{"text": "France"}]}, "answer 0: expected"),
])
def test_reader_errors(tmp_path, qa, message):
    with pytest.raises(DataError, match=f"question 'x'.*{message}"):
        read_squad(_squad(tmp_path, [qa]))


def test_reads_the_shared_sample(shared_data):
    recs = read_squad(os.path.join(shared_data, "squad_sample", "squad_v2_sample.json"))
    assert len(recs) == 1407 and sum(not r["is_impossible"] for r in recs) == 705


# --------------------------------------------------------------------------- windows and decoding

def test_windows_stride_and_answer_positions(tiny_model_dir):
    task = get_task("question_answering")
    long_ctx = " ".join(f"w{i}" for i in range(60)) + " " + CONTEXT + " " + " ".join(f"v{i}" for i in range(60))
    qas = [{"id": "a", "question": "Where is Normandy?", "is_impossible": False, "title": "t",
            "context": long_ctx, "answers": [{"text": "France", "start": long_ctx.index("France")}]},
           {"id": "b", "question": "Who?", "is_impossible": True, "title": "t", "context": long_ctx, "answers": []}]
    task.options["doc_stride"] = 16
    tok = load_tokenizer(tiny_model_dir)
    ds = task.encode(qas, tok, 64)
    by_ex = [[f for f in ds.features if f["_example"] == i] for i in range(2)]
    assert len(by_ex[0]) > 3 and len(by_ex[1]) > 3
    hits = 0
    for f in by_ex[0]:
        assert len(f["input_ids"]) <= 64
        s, e = f["start_positions"], f["end_positions"]
        if s:
            hits += 1
            assert long_ctx[f["_offsets"][s][0]:f["_offsets"][e][1]] == "France"
        else:
            assert e == 0
    assert 1 <= hits < len(by_ex[0])  # in some windows, outside others (-> CLS)
    assert all(f["start_positions"] == f["end_positions"] == 0 for f in by_ex[1])
    # consecutive windows overlap by the stride: the last 16 context tokens come again
    c0 = [o for o in by_ex[0][0]["_offsets"] if o is not None]
    c1 = [o for o in by_ex[0][1]["_offsets"] if o is not None]
    assert c0[-16:] == c1[:16]
    with pytest.raises(ValueError, match="doc_stride: 64 must be smaller than max_length=64"):
        task.options["doc_stride"] = 64
        task.encode(qas, tok, 64)


def test_negative_ratio_only_for_training_records(tiny_model_dir):
    task = get_task("question_answering")
    long_ctx = " ".join(f"w{i}" for i in range(80)) + " " + CONTEXT
    rec = lambda i, imp: {"id": str(i), "question": "Where?", "is_impossible": imp, "title": "t", "context": long_ctx,
                          "answers": [] if imp else [{"text": "France", "start": long_ctx.index("France")}]}
    train = [rec(i, i % 2 == 0) for i in range(6)]
    task._set_options({"negative_ratio": 0.5, "doc_stride": 16})
    tok = load_tokenizer(tiny_model_dir)
    task.fit_labels(train)
    full = task.encode(list(train), tok, 48)  # a copy: not the training records -> every window
    sampled = task.encode(train, tok, 48)
    pos = sum(f["start_positions"] > 0 for f in full.features)
    assert sum(f["start_positions"] > 0 for f in sampled.features) == pos
    assert len(sampled.features) - pos == round(0.5 * pos) < len(full.features) - pos
    with pytest.raises(ValueError, match="data.negative_ratio: expected a number"):
        task._set_options({"negative_ratio": "many"})


def test_best_span_decoding():
    ctx = "abc def ghi jkl"
    offsets = [None, None, (0, 3), (4, 7), (8, 11), (12, 15), None]
    s = torch.tensor([1.0, 0.0, 0.5, 3.0, 0.2, 0.1, 9.0])
    e = torch.tensor([1.0, 0.0, 0.1, 0.3, 2.0, 4.0, 9.0])
    # best: start 3 ("def") .. end 5 ("jkl") = 7.0; position 6 (not context) is never used
    assert best_span([(s, e, offsets)], ctx, n_best=5, max_answer_length=30) == ("def ghi jkl", 4, 7.0, 2.0)
    # max_answer_length=2 -> "def ghi" (3 + 2) beats "ghi jkl" (0.2 + 4)
    assert best_span([(s, e, offsets)], ctx, n_best=5, max_answer_length=2)[:3] == ("def ghi", 4, 5.0)
    # end before start is never a span; the null score is the smallest over the windows
    s2, e2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]), torch.tensor([-1.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    text, start, score, null = best_span([(s, e, offsets), (s2, e2, offsets)], ctx, n_best=7, max_answer_length=30)
    assert (text, score, null) == ("def ghi jkl", 7.0, -1.0)


# --------------------------------------------------------------------------- training, CLI, HF PEFT

FACTS = [("Paris", "France"), ("Berlin", "Germany"), ("Rome", "Italy"), ("Madrid", "Spain"), ("Lisbon", "Portugal"),
         ("Vienna", "Austria"), ("Athens", "Greece"), ("Dublin", "Ireland")]


def _fact_file(path, facts, start_id):
    qas_all = []
    for k, (city, country) in enumerate(facts):
        ctx = f"{city} is the capital of {country}. It is a big city with many people."
        qas = [{"id": f"{start_id + k}a", "question": f"What is {country}'s capital?",
                "answers": [{"text": city, "answer_start": 0}], "is_impossible": False},
               {"id": f"{start_id + k}b", "question": "Who won the match?", "answers": [], "is_impossible": True}]
        qas_all.append({"context": ctx, "qas": qas})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "capitals", "paragraphs": qas_all}]}))
    return str(path)


def test_cli_finetune_evaluate_predict_and_hf_peft_loads(tmp_path, tiny_model_dir, capsys):
    import yaml
    from fastpeft.cli import main
    train = _fact_file(tmp_path / "train.json", FACTS * 3, 0)
    val = _fact_file(tmp_path / "val.json", FACTS[:4], 100)
    cfg = {"model": tiny_model_dir, "task": "question_answering", "output_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation": val, "max_length": 48, "doc_stride": 16},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "trainer": {"lr": 1e-2, "epochs": 3, "batch_size": 8, "progress": False, "plot": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 0
    fm = json.loads(capsys.readouterr().out)["final_metrics"]
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "loss"} <= set(fm)
    adapter = tmp_path / "run" / "adapter"
    acfg = json.load(open(adapter / "adapter_config.json"))
    assert acfg["task_type"] == "QUESTION_ANS" and "qa_outputs" in acfg["modules_to_save"]

    assert main(["evaluate", "--adapter", str(adapter), "--data", val]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == pytest.approx(fm["f1"])
    assert main(["predict", "--adapter", str(adapter), "--data", val, "--limit", "4"]) == 0
    preds = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(preds) == 4 and all({"id", "question", "answer", "start", "end", "no_answer"} <= set(p) for p in preds)
    ctx = json.load(open(val))["data"][0]["paragraphs"][0]["context"]
    for p in preds[:1]:
        assert p["no_answer"] or ctx[p["start"]:p["end"]] == p["answer"]

    bad = tmp_path / "bad.json"
    doc = json.load(open(val))
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    bad.write_text(json.dumps(doc))
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(bad)]) == 2
    assert "question '100a' (article 'capitals'): answer 0 'Paris' does not match" in capsys.readouterr().err

    # HF PEFT loads the adapter as a PeftModelForQuestionAnswering with the same logits
    peft = pytest.importorskip("peft")
    import fastpeft
    task = get_task("question_answering")
    tok = load_tokenizer(tiny_model_dir)
    ds = task.encode(task.read(val, {}), tok, 48)
    batch = next(iter(make_loader(ds, task.collator(tok), 8, shuffle=False)))
    inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
    hf = peft.PeftModel.from_pretrained(task.build_model(tiny_model_dir), str(adapter)).eval()
    fp = fastpeft.PeftModel.from_pretrained(task.build_model(tiny_model_dir), str(adapter)).eval()
    assert type(hf).__name__ == "PeftModelForQuestionAnswering"
    assert inputs["token_type_ids"].any()  # question 0, context 1
    with torch.no_grad():
        # HF PEFT's PeftModelForQuestionAnswering.forward (0.21) drops token_type_ids; its LoRA model
        # (hf.base_model) passes every input on, and gives fastpeft's logits
        a, b = hf.base_model(**inputs), fp(**inputs)
        torch.testing.assert_close(a.start_logits, b.start_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.end_logits, b.end_logits, rtol=1e-4, atol=1e-5)
        no_types = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        torch.testing.assert_close(hf(**inputs).start_logits, fp(**no_types).start_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("real_data_run_selected")
def test_real_squad_sample_learns_spans(shared_data, tmp_path):
    """Train on four articles of the SQuAD 2.0 sample (examples/squad_qa_lora.yaml), evaluate on the fifth:
    F1 and HasAns F1 rise above the untrained model's (a smoke run, not a benchmark; measured F1 2.9 -> 25.6,
    HasAns F1 5.7 -> 6.7, HasAns exact 0 -> 4.0)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "rte", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "real_tasks_encoder.py"))
    rte = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rte)
    tr, va = rte.split_squad(os.path.join(shared_data, "squad_sample", "squad_v2_sample.json"), str(tmp_path / "s"))
    cfg = rte.config("squad_qa_lora.yaml", tr, va, str(tmp_path / "run"), progress=False)
    before = rte.untrained(cfg)
    after = rte.run_fastpeft(cfg)["final_metrics"]
    assert after["HasAns_f1"] > before["HasAns_f1"] and after["HasAns_exact"] > before["HasAns_exact"], (before, after)
    assert after["f1"] > before["f1"] + 10
