"""The seq2seq task (translation / summarisation): readers and their errors, metrics against hand-computed
values, teacher forcing with masked label padding, training and beam-search generation on tiny random
T5 / BART / Marian bases, the CLI, and adapters that HF PEFT loads with equal logits."""
import json
import os

import pytest
import torch
import yaml

from fastpeft.workflow import Trainer, TrainerConfig, get_task, load_tokenizer
from fastpeft.workflow.data import DataError
from fastpeft.workflow.pipeline import apply_method
from fastpeft.workflow.tasks.seq2seq import Seq2SeqCollator, bleu_chrf, read_parallel, rouge
from fastpeft.workflow.tasks.seq2seq_base import make_seq2seq_base

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
FR = ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit"]


def toy_pairs(n, seed=0):
    """Word-by-word 'translation' of number words (English -> French)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(EN), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out.append((" ".join(EN[i] for i in idx), " ".join(FR[i] for i in idx)))
    return out


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_mt")
    for split, n, seed in (("train", 48, 0), ("val", 12, 1)):
        pairs = toy_pairs(n, seed)
        (d / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs))
        (d / f"{split}.fr").write_text("".join(t + "\n" for _, t in pairs))
    return d


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory, toy_files):
    """arch -> directory of a tiny random-init model (no dropout) with a BPE tokenizer trained on the toy text."""
    texts = (toy_files / "train.en").read_text().splitlines() + (toy_files / "train.fr").read_text().splitlines()
    root = tmp_path_factory.mktemp("s2s_bases")
    return {arch: make_seq2seq_base(str(root / arch), texts, arch=arch, vocab_size=80, d_model=32, layers=2,
                                    heads=2, ffn=64, dropout=0.0, max_positions=64)
            for arch in ("t5", "bart", "marian")}


PARALLEL = {"source_lang": "en", "target_lang": "fr"}


# --------------------------------------------------------------------------- readers

def test_parallel_files_by_prefix_or_source_file(toy_files):
    task = get_task("translation")
    assert task.name == "seq2seq" and task.peft_task_type == "SEQ_2_SEQ_LM"
    recs = task.read(str(toy_files / "train"), PARALLEL)
    assert len(recs) == 48 and recs[0]["_line"] == 1 and recs[0]["_source"].endswith("train.en")
    first = (toy_files / "train.fr").read_text().splitlines()[0]
    assert recs[0]["target"] == first
    assert task.read(str(toy_files / "train.en"), PARALLEL, limit=5) == recs[:5]
    only_src = task.read(str(toy_files / "val"), PARALLEL, with_labels=False)
    assert len(only_src) == 12 and "target" not in only_src[0]


def test_parallel_files_of_different_lengths_name_both_files_and_counts(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.fr").write_text("un\ndeux\n")
    with pytest.raises(DataError) as e:
        get_task("seq2seq").read(str(tmp_path / "a"), PARALLEL)
    msg = str(e.value)
    assert str(tmp_path / "a.en") in msg and "3 lines" in msg and str(tmp_path / "a.fr") in msg and "2" in msg


def test_empty_lines_and_missing_files_name_file_and_line(tmp_path):
    (tmp_path / "b.en").write_text("one\n\nthree\n")
    (tmp_path / "b.fr").write_text("un\ndeux\ntrois\n")
    with pytest.raises(DataError, match=r"b\.en:2: empty source"):
        read_parallel(str(tmp_path / "b.en"), str(tmp_path / "b.fr"))
    (tmp_path / "c.en").write_text("one\ntwo\n")
    (tmp_path / "c.fr").write_text("un\n \n")
    with pytest.raises(DataError, match=r"c\.fr:2: empty target"):
        read_parallel(str(tmp_path / "c.en"), str(tmp_path / "c.fr"))
    with pytest.raises(DataError, match=r"d\.fr: file not found"):
        (tmp_path / "d.en").write_text("one\n")
        get_task("seq2seq").read(str(tmp_path / "d"), PARALLEL)
    with pytest.raises(DataError, match="go together"):
        get_task("seq2seq").read(str(tmp_path / "d"), {"source_lang": "en"})


def test_tsv_and_jsonl_columns(tmp_path):
    task = get_task("summarization")
    (tmp_path / "s.jsonl").write_text(json.dumps({"document": "a long text", "summary": "short"}) + "\n"
                                      + json.dumps({"document": "another text", "summary": "brief"}) + "\n")
    recs = task.read(str(tmp_path / "s.jsonl"), {"source_column": "document", "target_column": "summary"})
    assert [(r["source"], r["target"], r["_line"]) for r in recs] == [("a long text", "short", 1),
                                                                      ("another text", "brief", 2)]
    (tmp_path / "t.tsv").write_text("source\ttarget\none two\tun deux\nthree\t\n")
    with pytest.raises(DataError, match=r"t\.tsv:3: empty target"):
        task.read(str(tmp_path / "t.tsv"), {})
    assert task.read(str(tmp_path / "t.tsv"), {}, with_labels=False)[1]["source"] == "three"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"source": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl"):
        task.read(str(tmp_path / "bad.jsonl"), {})
    with pytest.raises(DataError, match="data.num_beams"):
        task.read(str(tmp_path / "s.jsonl"), {"source_column": "document", "target_column": "summary",
                                              "num_beams": 0})


# --------------------------------------------------------------------------- metrics

def test_bleu_against_hand_computed_value():
    # precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1): BLEU = (0.8 * 0.75 * 2/3 * 0.5) ** 0.25 = 0.2 ** 0.25
    m = bleu_chrf(["a b c d e"], ["a b c d f"])
    assert m["bleu"] == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    # brevity penalty: hypothesis 4 tokens, reference 5, all n-grams correct: BLEU = exp(1 - 5/4)
    assert bleu_chrf(["a b c d"], ["a b c d e"])["bleu"] == pytest.approx(100 * torch.tensor(-0.25).exp().item(),
                                                                         abs=1e-4)
    perfect = bleu_chrf(["the cat sat .", "a dog"], ["the cat sat .", "a dog"])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert bleu_chrf(["xyz"], ["abc"])["chrf"] == pytest.approx(0)


def test_rouge_against_hand_computed_values():
    # unigrams: P 3/3, R 3/6 -> F 2/3; bigrams: P 2/2, R 2/5 -> F 4/7; LCS 3 -> F 2/3
    m = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(200 / 3) and m["rouge2"] == pytest.approx(400 / 7)
    assert m["rougeL"] == pytest.approx(200 / 3)


# --------------------------------------------------------------------------- batches and the loss

def test_collator_pads_sources_and_labels_separately():
    batch = Seq2SeqCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 1], "attention_mask": [1, 1, 1], "labels": [7, 1]},
        {"input_ids": [5, 1], "attention_mask": [1, 1], "labels": [7, 8, 9, 1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [7, 8, 9, 1]]


@pytest.mark.parametrize("arch", ["t5", "bart", "marian"])
def test_label_padding_costs_no_loss(arch, tiny_bases, toy_files):
    """Teacher-forced loss of a padded batch == token-weighted mean of each example's loss alone."""
    task = get_task("seq2seq")
    tok = load_tokenizer(tiny_bases[arch])
    recs = task.read(str(toy_files / "train"), PARALLEL, limit=4)
    ds = task.encode(recs, tok, 32)
    assert all(f["labels"][-1] == tok.eos_token_id for f in ds.features)
    model = task.build_model(tiny_bases[arch]).eval()
    col = task.collator(tok)
    batch = col(ds.features)
    assert (batch["labels"] == -100).any()
    with torch.no_grad():
        together = float(model(**batch).loss)
        sums = [float(model(**col([f])).loss) * len(f["labels"]) for f in ds.features]
    assert together == pytest.approx(sum(sums) / sum(len(f["labels"]) for f in ds.features), rel=1e-4)


# --------------------------------------------------------------------------- training and generation

@pytest.mark.parametrize("arch", ["t5", "bart", "marian"])
def test_lora_on_encoder_and_decoder_trains_and_generates(arch, tiny_bases, toy_files):
    task = get_task("seq2seq")
    tok = load_tokenizer(tiny_bases[arch])
    cfg = dict(PARALLEL, num_beams=2, max_target_length=12)
    ds = task.encode(task.read(str(toy_files / "train"), cfg), tok, 32)
    val = task.encode(task.read(str(toy_files / "val"), cfg), tok, 32)
    torch.manual_seed(0)
    model = apply_method(task.build_model(tiny_bases[arch]), {"name": "lora", "r": 4, "lora_alpha": 8}, task)
    lora = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any(".encoder." in n for n in lora) and any(".decoder." in n for n in lora)
    assert any(("EncDecAttention" in n or "encoder_attn" in n) for n in lora)  # cross-attention too
    assert not any("lm_head" in n or "shared" in n or "embed" in n for n in lora)
    t = Trainer(model, task, ds, val, TrainerConfig(lr=2e-2, batch_size=16, max_steps=4, progress=False,
                                                    plot=False), tokenizer=tok)
    before = t.evaluate()
    t.train()
    after = t.evaluate()
    assert set(after) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "loss", "gen_len"}
    assert after["loss"] < before["loss"]
    preds = task.predict(t.module, None, task.encode(task.read(str(toy_files / "val"), cfg, with_labels=False),
                                                     tok, 32, with_labels=False))
    assert len(preds) == 12 and all(isinstance(p["generated"], str) for p in preds)
    assert preds[0]["source"] == (toy_files / "val.en").read_text().splitlines()[0]


def test_beam_search_is_used_and_differs_from_greedy_only_by_width(tiny_bases, toy_files):
    task = get_task("seq2seq")
    tok = load_tokenizer(tiny_bases["t5"])
    ds = task.encode(task.read(str(toy_files / "val"), PARALLEL, limit=3), tok, 32)
    model = task.build_model(tiny_bases["t5"]).eval()
    batch = task.collator(tok)(ds.features)
    calls = []
    orig = model.generate

    def spy(*a, **k):
        calls.append(k)
        return orig(*a, **k)

    model.generate = spy
    task.num_beams = 3
    out = task.generate(model, batch, tok, max_new_tokens=5)
    assert calls[-1]["num_beams"] == 3 and len(out) == 3
    with torch.no_grad():
        ref = orig(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3,
                   max_new_tokens=5, do_sample=False, early_stopping=True)
    assert out == tok.batch_decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- CLI and HF PEFT

def test_cli_finetune_evaluate_predict_and_hf_peft_loads_the_adapter(tmp_path, tiny_bases, toy_files, capsys):
    peft = pytest.importorskip("peft")
    import fastpeft
    from fastpeft.cli import main
    base = tiny_bases["t5"]
    cfg = {"model": base, "task": "seq2seq", "output_dir": str(tmp_path / "run"),
           "data": {"train": str(toy_files / "train"), "validation": str(toy_files / "val"), "source_lang": "en",
                    "target_lang": "fr", "max_length": 24, "max_target_length": 12, "num_beams": 2},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8},
           "trainer": {"batch_size": 16, "lr": 1e-2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml"), "--max-steps", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "bleu" in summary["final_metrics"]
    adapter = tmp_path / "run" / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["task_type"] == "SEQ_2_SEQ_LM" and acfg["target_modules"]

    assert main(["evaluate", "--adapter", str(adapter), "--data", str(toy_files / "val")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["bleu"] == pytest.approx(summary["final_metrics"]["bleu"])
    assert main(["predict", "--adapter", str(adapter), "--data", str(toy_files / "val.en"), "--limit", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and set(lines[0]) == {"source", "generated"}

    hf = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(str(adapter)).eval()
    fp = fastpeft.AutoPeftModelForSeq2SeqLM.from_pretrained(str(adapter)).eval()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(4, 60, (2, 7), generator=g), torch.randint(4, 60, (2, 5), generator=g)
    with torch.no_grad():
        a = fp(input_ids=ids, labels=labels).logits
        b = hf(input_ids=ids, labels=labels).logits
        plain = hf.get_base_model()
        with hf.disable_adapter():
            c = plain(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # the adapter changes the output


def test_hf_peft_backend_matches_fastpeft_step_for_step(tiny_bases, toy_files):
    pytest.importorskip("peft")
    task = get_task("seq2seq")
    tok = load_tokenizer(tiny_bases["bart"])
    ds = task.encode(task.read(str(toy_files / "train"), PARALLEL, limit=32), tok, 32)
    losses = {}
    for backend in ("fastpeft", "peft"):
        torch.manual_seed(0)
        model = apply_method(task.build_model(tiny_bases["bart"]),
                             {"name": "lora", "r": 4, "lora_alpha": 8, "backend": backend}, task)
        r = Trainer(model, task, ds, None, TrainerConfig(lr=1e-2, batch_size=8, max_steps=3, progress=False,
                                                         plot=False), tokenizer=tok).train()
        losses[backend] = r["losses"]
    assert losses["fastpeft"] == pytest.approx(losses["peft"], rel=1e-4)


def test_make_seq2seq_base_command(tmp_path, toy_files):
    from fastpeft.workflow.tasks.seq2seq_base import main
    out = tmp_path / "base"
    assert main([str(out), str(toy_files / "train.en"), str(toy_files / "train.fr"), "--arch", "marian",
                 "--vocab", "60", "--d-model", "16", "--layers", "1", "--heads", "2", "--ffn", "32"]) == 0
    tok = load_tokenizer(str(out))
    ids = tok("one two")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == "one two"
    assert get_task("seq2seq").build_model(str(out)).config.model_type == "marian"


# --------------------------------------------------------------------------- real data

MULTI30K = os.path.join(os.environ.get("FASTPEFT_DATA", "/work/shared/data"), "multi30k")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(MULTI30K, "train.en")), reason="Multi30k not available")
def test_multi30k_en_de_lora_learns(tmp_path):
    """A tiny T5 trained on 4000 Multi30k en->de pairs: LoRA on top of a briefly pretrained base lowers the
    validation loss and raises chrF over the untrained model (a pipeline check, not a benchmark)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    task = get_task("seq2seq")
    cfg = {"source_lang": "en", "target_lang": "de", "num_beams": 1, "max_target_length": 40}
    train = task.read(os.path.join(MULTI30K, "train"), cfg, limit=4000)
    val = task.read(os.path.join(MULTI30K, "val"), cfg, limit=100)
    base = make_seq2seq_base(str(tmp_path / "base"), [r["source"] for r in train] + [r["target"] for r in train],
                             arch="t5", vocab_size=2000, d_model=64, layers=2, heads=4, ffn=256, dropout=0.0)
    tok = load_tokenizer(base)
    tr_ds, va_ds = task.encode(train, tok, 48), task.encode(val, tok, 48)
    torch.manual_seed(0)
    full = task.build_model(base)
    Trainer(full, task, tr_ds, None, TrainerConfig(lr=3e-3, batch_size=32, max_steps=150, progress=False,
                                                   plot=False)).train()
    full.save_pretrained(str(tmp_path / "pre"))
    tok.save_pretrained(str(tmp_path / "pre"))
    model = apply_method(task.build_model(str(tmp_path / "pre")), {"name": "lora", "r": 8, "lora_alpha": 16}, task)
    t = Trainer(model, task, tr_ds, va_ds, TrainerConfig(lr=3e-3, batch_size=32, max_steps=60, progress=False,
                                                         plot=False), tokenizer=tok)
    untrained = task.evaluate(task.build_model(base).eval(),
                              t._eval_loader(va_ds), va_ds)
    before = t.evaluate()
    t.train()
    after = t.evaluate()
    assert after["loss"] < before["loss"] < untrained["loss"]
    assert after["chrf"] > untrained["chrf"]
