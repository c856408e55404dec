"""Small random-init seq2seq bases with a tokenizer trained on your text (no pretrained seq2seq model
ships offline).

:func:`train_tokenizer` trains a `tokenizers` BPE model (NFKC, SentencePiece-style ``▁`` word
boundaries, so decoding gives back the spacing) with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
``<s>`` = 3, appending ``</s>`` to every encoded text, and wraps it as a transformers
``PreTrainedTokenizerFast``.  :func:`make_seq2seq_base` saves that tokenizer and a random-init T5, BART or
Marian model of the given size into one directory, which ``AutoTokenizer`` / ``AutoModelForSeq2SeqLM``
(and so ``fastpeft finetune --model DIR --task seq2seq``) load offline::

    from fastpeft.workflow.tasks.seq2seq_base import make_seq2seq_base
    make_seq2seq_base("bases/t5-tiny", texts=open("train.en").read().splitlines()
                      + open("train.de").read().splitlines(), arch="t5", vocab_size=8000)

or from the shell (one text per line in each file)::

    python -m fastpeft.workflow.tasks.seq2seq_base bases/t5-tiny train.en train.de --arch t5 --vocab 8000
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from ..._optional import import_extra

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0, 1, 2, 3
ARCHS = ("t5", "bart", "marian")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2):
    """A ``PreTrainedTokenizerFast`` (BPE, ``vocab_size`` pieces at most, specials as in the module doc)
    trained on ``texts``; encoding appends ``</s>``."""
    tk = import_extra("tokenizers", "training a seq2seq tokenizer")
    transformers = import_extra("transformers", "training a seq2seq tokenizer")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.normalizer = tk.normalizers.NFKC()
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    tok.decoder = tk.decoders.Metaspace()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = tk.processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                          special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", bos_token="<s>")


def base_config(arch: str, vocab_size: int, *, d_model: int = 256, layers: int = 3, heads: int = 4,
                ffn: int = 1024, dropout: float = 0.1, max_positions: int = 256):
    """A transformers config of ``arch`` (``t5`` | ``bart`` | ``marian``) with ``layers`` encoder and
    ``layers`` decoder layers, ids as :data:`SPECIALS` (pad 0, eos 1, bos 3)."""
    transformers = import_extra("transformers", "building a seq2seq base")
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=3)
    if arch == "t5":
        return transformers.T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=ffn,
                                     num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                                     dropout_rate=dropout, feed_forward_proj="relu", decoder_start_token_id=0,
                                     **ids)
    common = dict(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                  decoder_ffn_dim=ffn, dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
                  max_position_embeddings=max_positions, forced_eos_token_id=1, **ids)
    if arch == "bart":
        return transformers.BartConfig(decoder_start_token_id=1, forced_bos_token_id=None, **common)
    if arch == "marian":
        return transformers.MarianConfig(decoder_vocab_size=vocab_size, decoder_start_token_id=0,
                                         share_encoder_decoder_embeddings=True, **common)
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


def make_seq2seq_base(directory: str, texts: Iterable[str] | None = None, *, tokenizer=None, arch: str = "t5",
                      vocab_size: int = 8000, seed: int = 0, **config_kwargs) -> str:
    """Save a random-init ``arch`` model and its tokenizer (trained on ``texts``, or ``tokenizer`` as given)
    into ``directory``; returns it. ``config_kwargs`` go to :func:`base_config` (``d_model``, ``layers``,
    ``heads``, ``ffn``, ``dropout``, ``max_positions``). The vocabulary is the tokenizer's size."""
    transformers = import_extra("transformers", "building a seq2seq base")
    if tokenizer is None:
        if texts is None:
            raise ValueError("make_seq2seq_base: give texts to train a tokenizer on, or a tokenizer")
        tokenizer = train_tokenizer(texts, vocab_size)
    cfg = base_config(arch, len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=1, pad_token_id=0, bos_token_id=3,
        forced_eos_token_id=None if arch == "t5" else 1)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m fastpeft.workflow.tasks.seq2seq_base",
                                description="Save a random-init seq2seq base and a BPE tokenizer trained on text "
                                            "files (one text per line) into a directory.")
    p.add_argument("directory")
    p.add_argument("texts", nargs="+", help="text files the tokenizer is trained on")
    p.add_argument("--arch", choices=ARCHS, default="t5")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    texts = []
    for path in a.texts:
        with open(path, encoding="utf-8") as f:
            texts += f.read().splitlines()
    out = make_seq2seq_base(a.directory, texts, arch=a.arch, vocab_size=a.vocab, seed=a.seed, d_model=a.d_model,
                            layers=a.layers, heads=a.heads, ffn=a.ffn, dropout=a.dropout)
    print(out)
    return 0


__all__ = ["SPECIALS", "ARCHS", "train_tokenizer", "base_config", "make_seq2seq_base", "main"]


if __name__ == "__main__":
    raise SystemExit(main())

