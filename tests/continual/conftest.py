"""Fixtures for the continual-learning tests: a tiny random BERT (vocab 40, hidden 32, 2 layers) with
LoRA, and a synthetic two-feature stream whose tasks conflict: task ``a`` labels "token 5 present",
task ``b`` labels "token 6 present" on inputs drawn the same way, so learning b overwrites a."""
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine run ~50x faster on one thread (no OpenMP spin contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synth(n, key, seed):
    """``n`` encoded examples: random tokens 10..39, token 5 and token 6 each present with p=0.5;
    label = presence of token ``key``."""
    from fastpeft.workflow.data import EncodedDataset
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, 40) for _ in range(rng.randint(4, 10))]
        has = {5: rng.random() < 0.5, 6: rng.random() < 0.5}
        for tok in (5, 6):
            if has[tok]:
                ids.insert(rng.randrange(len(ids) + 1), tok)
        ids = [2] + ids + [3]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(has[key])})
    return EncodedDataset(out)


def make_stream(n_train=192, n_eval=96, keys=(5, 6), names=("a", "b")):
    from fastpeft.continual import ContinualTask
    return [ContinualTask(nm, synth(n_train, k, 10 * i + 1), synth(n_eval, k, 10 * i + 2), ["0", "1"])
            for i, (nm, k) in enumerate(zip(names, keys))]


def make_model(seed=0, r=4):
    import fastpeft
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    return fastpeft.get_peft_model(BertForSequenceClassification(cfg), fastpeft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["query", "value"], modules_to_save=["classifier"]))


def make_task():
    from fastpeft.workflow import get_task
    return get_task("sequence_classification", labels=["0", "1"])


def trainer_config(**kw):
    from fastpeft.workflow import TrainerConfig
    base = dict(lr=0.1, epochs=4, batch_size=32, progress=False, seed=0)
    base.update(kw)
    return TrainerConfig(**base)


@pytest.fixture
def stream():
    return make_stream()
