"""Fixtures for workflow tests: a tiny random-init BERT (bundled MiniLM tokenizer) and tiny data files."""
import random

import pytest
import torch

from ..helpers import save_tiny_bert

POS = ["good", "great", "fine", "lovely", "superb", "happy"]
NEG = ["bad", "awful", "poor", "boring", "sad", "dull"]
FILL = ["the", "movie", "was", "a", "plot", "actors", "film", "story", "and", "really"]


def _sentences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        rows.append((y, " ".join(words)))
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32 random BERT saved with the bundled MiniLM tokenizer (no dropout: exact
    comparisons across runs / processes)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_cls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    tr, dev = d / "train.tsv", d / "dev.tsv"
    tr.write_text("label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in _sentences(96, 1)))
    dev.write_text("label\tcontent\n" + "".join(f"{y}\t{s}\n" for y, s in _sentences(32, 2)))
    return str(tr), str(dev)


NER_SENTS = [
    [("John", "B-PER"), ("Smith", "I-PER"), ("visited", "O"), ("Paris", "B-LOC"), (".", "O")],
    [("Acme", "B-ORG"), ("Corp", "I-ORG"), ("hired", "O"), ("Mary", "B-PER"), (".", "O")],
    [("The", "O"), ("German", "B-MISC"), ("team", "O"), ("won", "O"), ("in", "O"), ("Berlin", "B-LOC")],
    [("Peter", "B-PER"), ("left", "O"), ("Google", "B-ORG"), ("yesterday", "O")],
]


def write_conll(path, sents, docstart=True):
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for s in sents:
        lines += [f"{w} {t} 0" for w, t in s] + [""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_conll_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("conll")
    return write_conll(d / "train.txt", NER_SENTS * 6), write_conll(d / "valid.txt", NER_SENTS)


def make_cls_setup(model_dir, files, *, lora_dropout=0.0, r=4, seed=0, max_length=32, backend="auto"):
    """(peft model, task, train_ds, val_ds, tokenizer) for the tiny sentiment data."""
    from fastpeft.workflow import get_task, load_tokenizer
    from fastpeft.workflow.pipeline import apply_method

    task = get_task("sequence_classification")
    tok = load_tokenizer(model_dir)
    tr = task.read(files[0], {"text_column": "sentence"})
    task.fit_labels(tr)
    dev = task.read(files[1], {"text_column": "content"})
    torch.manual_seed(seed)
    model = apply_method(task.build_model(model_dir),
                         {"name": "lora", "backend": backend, "r": r, "lora_alpha": 8, "lora_dropout": lora_dropout,
                          "target_modules": ["query", "value"]}, task)
    return model, task, task.encode(tr, tok, max_length), task.encode(dev, tok, max_length), tok


class Kill(Exception):
    pass


class KillAt:
    """Trainer callback that raises :class:`Kill` at the end of optimizer step ``step`` (a killed job)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            raise Kill()
