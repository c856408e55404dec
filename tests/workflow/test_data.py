"""Readers (and their errors), collator, batch sampler."""
import pytest
import torch

from fastpeft.workflow.data import (BatchSampler, DataError, PaddingCollator, read_conll, read_table,
                                    from_hf_dataset, take)
from fastpeft.workflow.tasks import get_task

from .conftest import NER_SENTS, write_conll


def test_read_table_tsv_quotes_and_columns(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text('label\tsentence\n1\ta "quoted word\n0\tplain\n')
    recs = read_table(str(p), ["sentence", "label"])
    assert [r["sentence"] for r in recs] == ['a "quoted word', "plain"]
    assert [r["_line"] for r in recs] == [2, 3]
    with pytest.raises(DataError, match=r"a\.tsv:1: missing column\(s\) \['text'\]"):
        read_table(str(p), ["text", "label"])


def test_read_table_csv_jsonl(tmp_path):
    c = tmp_path / "a.csv"
    c.write_text('text,label\n"x, y",pos\n')
    assert read_table(str(c), ["text", "label"])[0] == {"text": "x, y", "label": "pos", "_line": 2}
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "hi", "label": 1}\n\n{"text": "yo"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: missing column"):
        read_table(str(j), ["text", "label"])
    j.write_text('{"text": "hi", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        read_table(str(j), ["text", "label"])


def test_empty_and_missing_files(tmp_path):
    e = tmp_path / "e.tsv"
    e.write_text("")
    with pytest.raises(DataError, match=r"e\.tsv: empty file"):
        read_table(str(e), ["sentence"])
    e.write_text("label\tsentence\n")
    with pytest.raises(DataError, match=r"e\.tsv: empty file \(no data rows\)"):
        read_table(str(e), ["sentence"])
    c = tmp_path / "e.txt"
    c.write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.txt: empty file"):
        read_conll(str(c))
    with pytest.raises(DataError, match="file not found"):
        read_conll(str(tmp_path / "nope.txt"))


def test_read_table_wrong_field_count(tmp_path):
    p = tmp_path / "b.tsv"
    p.write_text("label\tsentence\n1\tok\n0\ttoo\tmany\n")
    with pytest.raises(DataError, match=r"b\.tsv:3: expected 2 fields, got 3"):
        read_table(str(p), ["sentence", "label"])


def test_read_conll_layouts_and_errors(tmp_path):
    path = write_conll(tmp_path / "t.txt", NER_SENTS)
    sents = read_conll(path)
    assert len(sents) == 4
    assert sents[0]["tokens"][:2] == ["John", "Smith"] and sents[0]["tags"][:2] == ["B-PER", "I-PER"]
    assert sents[0]["_line"] == 3  # after the DOCSTART line and a blank
    # TOKEN POS CHUNK NER layout: the last BIO column is the NER tag
    q = tmp_path / "q.txt"
    q.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n")
    assert read_conll(str(q))[0]["tags"] == ["B-ORG", "O"]
    bad = tmp_path / "bad.txt"
    bad.write_text("EU B-ORG 0\nrejects O 0\nGerman\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: malformed CoNLL line 'German'"):
        read_conll(str(bad))
    bad.write_text("EU B-ORG 0\nrejects O\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: malformed CoNLL line"):
        read_conll(str(bad))


def test_unknown_label_at_eval_names_file_and_line(tmp_path, tiny_model_dir):
    from fastpeft.workflow import load_tokenizer
    tok = load_tokenizer(tiny_model_dir)
    task = get_task("sequence_classification")
    tr = tmp_path / "tr.tsv"
    tr.write_text("label\tsentence\n0\ta\n1\tb\n")
    task.fit_labels(task.read(str(tr), {}))
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tsentence\n0\ta\n2\tc\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: unknown label '2'"):
        task.encode(task.read(str(dev), {}), tok, 16)
    ner = get_task("token_classification")
    ner.fit_labels(read_conll(write_conll(tmp_path / "t.txt", NER_SENTS[:1])))
    v = tmp_path / "v.txt"
    v.write_text("Paris B-LOC 0\n\nAcme B-ORG 0\n")
    with pytest.raises(DataError, match=r"v\.txt:3: unknown tag 'B-ORG'"):
        ner.encode(ner.read(str(v), {}), tok, 16)


def test_subword_label_alignment(tiny_model_dir):
    from fastpeft.workflow import load_tokenizer
    tok = load_tokenizer(tiny_model_dir)
    ner = get_task("token_classification")
    recs = [{"tokens": ["Blackburnshire", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]}]
    ner.fit_labels(recs)
    f = ner.encode(recs, tok, 32).features[0]
    ids = f["input_ids"]
    assert len(tok.convert_ids_to_tokens(ids)) > 5  # the long word splits into several pieces
    labels = f["labels"]
    starts = f["_word_starts"]
    assert len(starts) == 3 and labels[0] == -100 and labels[-1] == -100  # [CLS], [SEP]
    assert [labels[s] for s in starts] == [ner.label2id[t] for t in ["B-PER", "O", "B-LOC"]]
    assert sum(l != -100 for l in labels) == 3
    # truncation: words cut off are predicted "O" at evaluation, not dropped from the gold
    f2 = ner.encode(recs, tok, 4).features[0]
    assert len(f2["_word_starts"]) < 3


def test_collator_pads_dynamically():
    c = PaddingCollator(pad_token_id=7)
    b = c([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [0, -100, 1], "_w": [1]},
           {"input_ids": [4], "attention_mask": [1], "labels": [2], "_w": [0]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[0, -100, 1], [2, -100, -100]]
    assert b["_w"] == [[1], [0]]
    b = c([{"input_ids": [1], "labels": 1}, {"input_ids": [2, 3], "labels": 0}])
    assert b["labels"].tolist() == [1, 0] and b["input_ids"].shape == (2, 2)


def test_batch_sampler_deterministic_resumable_sharded():
    lengths = list(range(1, 38))
    s = BatchSampler(lengths, 4, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert sorted(i for b in full for i in b) == list(range(37))
    s.set_epoch(0)
    assert list(s) != full  # a new order each epoch
    s.set_epoch(1, start_batch=3)
    assert list(s) == full[3:]
    # two ranks with batch 2 see exactly the single-process batches of 4, split [rank::2]
    r0 = BatchSampler(lengths, 2, seed=3, rank=0, world_size=2)
    r1 = BatchSampler(lengths, 2, seed=3, rank=1, world_size=2)
    r0.set_epoch(1)
    r1.set_epoch(1)
    for a, b, g in zip(r0, r1, full):
        assert sorted(a + b) == sorted(g)
    # same split as torch's DistributedSampler for the same seed / epoch
    ds = torch.utils.data.DistributedSampler(range(36), num_replicas=2, rank=0, seed=3)
    ds.set_epoch(1)
    mine = BatchSampler(list(range(36)), 2, seed=3, rank=0, world_size=2)
    mine.set_epoch(1)
    assert [i for b in mine for i in b] == list(ds)


def test_length_bucketing_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (400,), generator=g).tolist()

    def padding(sampler):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in sampler)

    plain, bucketed = BatchSampler(lengths, 8, seed=0), BatchSampler(lengths, 8, seed=0, bucket_size=10)
    assert sorted(i for b in bucketed for i in b) == list(range(400))
    assert padding(bucketed) < 0.3 * padding(plain)


def test_take_and_hf_like_dataset():
    recs = list(range(10))
    assert take(recs, 3) == [0, 1, 2]
    sub = take(recs, 4, seed=1)
    assert sub == take(recs, 4, seed=1) and len(set(sub)) == 4
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert from_hf_dataset(rows, ["text", "label"])[1]["text"] == "b"
    with pytest.raises(DataError, match="missing column"):
        from_hf_dataset(rows, ["sentence"])
