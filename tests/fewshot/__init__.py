"""Shared helpers of the few-shot tests: a tiny random BERT on disk and a synthetic sentiment dataset."""
import random

import pytest

from ..helpers import save_tiny_bert

POS = ["great", "wonderful", "excellent", "superb", "delightful", "brilliant"]
NEG = ["awful", "terrible", "boring", "dreadful", "horrible", "dull"]
FILL = ["the", "movie", "film", "was", "really", "quite", "plot", "acting", "story", "and", "very", "this"]


def synthetic(n_per_class: int, seed: int = 0):
    """(texts, labels): class "pos"/"neg" decided by one or two class words among neutral fillers."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n_per_class):
        for lab, words in (("pos", POS), ("neg", NEG)):
            toks = [rng.choice(FILL) for _ in range(rng.randint(3, 6))]
            for _ in range(rng.randint(1, 2)):
                toks.insert(rng.randint(0, len(toks)), rng.choice(words))
            texts.append(" ".join(toks))
            labels.append(lab)
    return texts, labels


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Directory of a randomly initialised 2-layer BERT (hidden 32, BERT's default dropout 0.1) with
    MiniLM's tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), dropout=0.1)
