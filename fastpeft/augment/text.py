"""Token-level text augmentation on already-tokenised batches, applied on the fly as Trainer callbacks.

Every operation works on the trainer's padded batches (``input_ids`` / ``attention_mask`` /
``token_type_ids`` [B, L] long, ``labels`` [B] or, for token classification, [B, L] with -100 on ignored
positions), after collation and before the forward pass. Each example is augmented with probability
``p`` (independently); an augmented example has ``n = max(1, round(rate * m))`` of its ``m`` *eligible*
tokens changed. Eligible tokens are real tokens (``attention_mask == 1``) that are not special tokens
(``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``, ``[UNK]``... = ``tokenizer.all_special_ids`` plus
``special_ids``): special tokens never move, disappear or get replaced, and ``attention_mask`` always
marks exactly the real tokens of the result. Operations act on token ids (sub-word pieces for WordPiece /
BPE tokenizers), so no re-tokenisation is needed and any tokenizer works.

============================  =========================================================  ==============
operation (config name)       what it does to an augmented example                      per-token labels
============================  =========================================================  ==============
``RandomSwap``                ``n`` times: swap two eligible tokens of the same segment  error
(``random_swap``)             (``token_type_ids``), i.e. ``x[i], x[j] = x[j], x[i]``
``RandomDeletion``            drop ``n`` eligible tokens (at least one stays), shift     error
(``random_deletion``)         the rest left, pad the end: ``x = x[keep]``
``RandomInsertion``           insert ``n`` tokens next to random eligible tokens; each   error
(``random_insertion``)        is a copy of a random eligible token of its segment (or
                              an embedding neighbour of it when ``neighbours`` is given)
``TokenMasking``              ``x[i] = mask_id`` (tokenizer's mask token, else unk)      kept aligned
(``token_masking``)
``EmbeddingSubstitution``     ``x[i] = N[x[i], j]``, ``j ~ U{0..k-1}``: one of the ``k``  kept aligned
(``embedding_substitution``)  nearest neighbours of the token by cosine similarity in
                              the base model's own input-embedding matrix
============================  =========================================================  ==============

Sequence-level labels are untouched (the operations are meant to be label-preserving). With per-token
labels ([B, L], token classification) only masking and substitution are allowed: they change ids in place,
so every label stays on its position; the other operations raise a ``ValueError`` (moving sub-word pieces
around would break the word/label alignment).

Randomness: each operation owns a ``torch.Generator`` re-seeded for every batch from ``(seed, batch
counter)``; the counter restarts at ``trainer.state.step * grad_accum`` in ``on_train_begin``, so a run
is reproducible for a seed and a resumed run sees the same augmentations as an uninterrupted one.

Use::

    from fastpeft.augment import EmbeddingSubstitution, RandomDeletion
    cbs = [EmbeddingSubstitution(model, tokenizer, p=0.5, rate=0.15, k=8, seed=0), RandomDeletion(p=0.2)]
    Trainer(model, task, train_ds, dev_ds, cfg, tokenizer=tokenizer, callbacks=cbs).train()
    new_batch = cbs[0](batch)          # standalone: same op on one batch

Plain PyTorch for masking (the other ops follow the table)::

    eligible = (attention_mask == 1) & ~torch.isin(input_ids, special_ids)
    pick = top-n of torch.rand(B, L) over eligible positions, rows chosen with torch.rand(B) < p
    input_ids = torch.where(pick, mask_id, input_ids)
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch

__all__ = ["TokenAugmentation", "RandomSwap", "RandomDeletion", "RandomInsertion", "TokenMasking",
           "EmbeddingSubstitution", "embedding_neighbours", "special_token_ids", "TEXT_OPS"]

# per-token keys whose padding value is known; any other [B, L] tensor blocks length-changing ops
_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "special_tokens_mask": 1}
_UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")


def _prob(name: str, value, *, open_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected a number in {'(0' if open_zero else '[0'}, 1], got {value!r}")
    value = float(value)
    if not ((0 < value if open_zero else 0 <= value) and value <= 1):
        raise ValueError(f"{name}: expected a number in {'(0' if open_zero else '[0'}, 1], got {value!r}")
    return value


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed: expected an integer, got {value!r}")
    return value


def special_token_ids(tokenizer=None, extra: Iterable[int] | None = None, *, unused: bool = True) -> list[int]:
    """``tokenizer.all_special_ids`` + ``extra`` (+ ``[unusedN]`` placeholder tokens when ``unused``)."""
    ids = set(int(i) for i in (extra or ()))
    if tokenizer is not None:
        ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)
        if unused:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            ids.update(int(i) for t, i in vocab.items() if _UNUSED.match(t))
    return sorted(ids)


def _excluded_mask(V: int, exclude_ids: Sequence[int], vocab_size: int | None) -> torch.Tensor:
    excluded = torch.zeros(V, dtype=torch.bool)
    ex = torch.as_tensor(list(exclude_ids), dtype=torch.long)
    if ex.numel():
        if int(ex.min()) < 0 or int(ex.max()) >= V:
            raise ValueError(f"exclude_ids: ids must be in [0, {V}), got min {int(ex.min())} max {int(ex.max())}")
        excluded[ex] = True
    if vocab_size is not None:
        excluded[min(int(vocab_size), V):] = True
    return excluded


@torch.no_grad()
def _neighbour_rows(w: torch.Tensor, excluded: torch.Tensor, rows: torch.Tensor, k: int, chunk_size: int,
                    min_similarity: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of ``rows`` given row-normalised ``w`` [V, d]; excluded rows map to themselves."""
    ids = rows.unsqueeze(1).repeat(1, k)
    sims = torch.ones(rows.numel(), k)
    todo = (~excluded[rows]).nonzero().squeeze(1)
    for s in range(0, todo.numel(), chunk_size):
        at = todo[s:s + chunk_size]
        r = rows[at]
        sim = w[r] @ w.T                                    # [c, V]
        sim[:, excluded] = -math.inf
        sim[torch.arange(r.numel()), r] = -math.inf          # not its own neighbour
        top_s, top_i = sim.topk(k, dim=1)
        ids[at], sims[at] = top_i, top_s
    if min_similarity is not None:
        ids = torch.where(sims < float(min_similarity), rows.unsqueeze(1), ids)
    return ids, sims


@torch.no_grad()
def embedding_neighbours(weight: torch.Tensor, k: int = 8, *, exclude_ids: Sequence[int] = (),
                         vocab_size: int | None = None, token_ids: Sequence[int] | torch.Tensor | None = None,
                         chunk_size: int = 1024, min_similarity: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest tokens of every token by cosine similarity of embedding rows.

    ``weight`` [V, d] (e.g. ``model.get_input_embeddings().weight``). Returns ``(ids [V, k] long,
    sims [V, k] float32)`` sorted by decreasing similarity. A token is never its own neighbour;
    ``exclude_ids`` (special tokens, padding) and ids ``>= vocab_size`` are never neighbours and their own
    row is themselves (substitution leaves them unchanged); neighbours less similar than
    ``min_similarity`` are replaced by the token itself. ``token_ids``: compute only these rows (the
    others map to themselves) -- the full table costs ``V * V * d`` multiply-adds (0.36 T for a 30k x 384
    matrix, tens of seconds on a laptop CPU), a data set's few thousand distinct tokens a few percent of
    that; :class:`EmbeddingSubstitution` fills its table lazily this way. Computed in row chunks of
    ``chunk_size`` (memory ``chunk_size * V`` floats). Plain PyTorch::

        w = F.normalize(weight.float(), dim=1); s = w @ w.T
        s[:, excluded] = -inf; s.fill_diagonal_(-inf); sims, ids = s.topk(k, dim=1)
    """
    if not torch.is_tensor(weight) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D embedding matrix [V, d], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    V = weight.shape[0]
    _int("k", k, 1)
    _int("chunk_size", chunk_size, 1)
    excluded = _excluded_mask(V, exclude_ids, vocab_size)
    candidates = int((~excluded).sum())
    if candidates <= k:
        raise ValueError(f"k: expected fewer than the {candidates} candidate tokens, got {k}")
    w = torch.nn.functional.normalize(weight.detach().float().cpu(), dim=1)
    ids = torch.arange(V).unsqueeze(1).repeat(1, k)
    sims = torch.ones(V, k)
    rows = torch.arange(V) if token_ids is None else torch.unique(torch.as_tensor(token_ids, dtype=torch.long))
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= V):
        raise ValueError(f"token_ids: ids must be in [0, {V})")
    ids[rows], sims[rows] = _neighbour_rows(w, excluded, rows, k, chunk_size, min_similarity)
    return ids, sims


class TokenAugmentation:
    """Base class of the token-level operations (see the module docstring).

    ``p``: probability that an example is augmented; ``rate``: fraction of its eligible tokens changed
    (at least one); ``seed``: the operation's own generator; ``tokenizer``: gives the special tokens
    and the pad id (else taken from the trainer at ``on_train_begin``); ``special_ids``: more protected
    ids; ``pad_token_id``: overrides the tokenizer's; ``max_length``: the longest sequence insertion may
    produce (default ``tokenizer.model_max_length`` when set, else unbounded)."""

    name = "token_op"
    changes_length = False
    keeps_token_labels = False

    def __init__(self, *, p: float = 0.5, rate: float = 0.1, seed: int = 0, tokenizer=None,
                 special_ids: Iterable[int] | None = None, pad_token_id: int | None = None,
                 max_length: int | None = None):
        self.p = _prob("p", p)
        self.rate = _prob("rate", rate, open_zero=True)
        self.seed = _seed(seed)
        self.tokenizer = tokenizer
        self._extra_special = [int(i) for i in (special_ids or ())]
        self.pad_token_id = pad_token_id
        self.max_length = None if max_length is None else _int("max_length", max_length, 2)
        self._calls = 0
        self._special: torch.Tensor | None = None
        self.generator = torch.Generator()
        if tokenizer is not None or special_ids is not None:
            self._set_special(tokenizer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, rate={self.rate}, seed={self.seed})"

    # ---- trainer callbacks ---------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        if self.tokenizer is None and getattr(trainer, "tokenizer", None) is not None:
            self.tokenizer = trainer.tokenizer
            self._set_special(self.tokenizer)
        if self.pad_token_id is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
            if pad is None:
                pad = getattr(getattr(trainer, "collator", None), "pad_token_id", None)
            self.pad_token_id = pad
        step = getattr(getattr(trainer, "state", None), "step", 0)
        accum = getattr(getattr(trainer, "config", None), "grad_accum", 1) or 1
        self._calls = int(step) * int(accum)

    def on_batch(self, trainer, batch: dict) -> dict:
        return self(batch)

    # ---- the operation -------------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(f"batch: expected a dict with 'input_ids' [B, L], got "
                             f"{type(batch).__name__}{' without input_ids' if isinstance(batch, dict) else ''}")
        ids = batch["input_ids"]
        if not torch.is_tensor(ids) or ids.dim() != 2:
            raise ValueError(f"batch['input_ids']: expected a 2-D tensor [B, L], got "
                             f"{getattr(ids, 'shape', type(ids).__name__)}")
        if self._special is None:
            raise ValueError(f"tokenizer: {self.name} needs the tokenizer (or special_ids=...) to know which "
                             f"tokens are special; pass tokenizer= or use it in a Trainer that has one")
        self._check_labels(batch)
        self.generator.manual_seed((self.seed * 1_000_003 + self._calls) % (2 ** 63))
        self._calls += 1
        if ids.shape[0] == 0 or ids.shape[1] == 0 or self.p == 0:
            return dict(batch)
        valid = self._valid(batch)
        eligible = valid & ~torch.isin(ids, self._special.to(ids.device))
        B = ids.shape[0]
        rows = (torch.rand(B, generator=self.generator) < self.p).to(ids.device)
        count = eligible.sum(1)
        n = torch.clamp(torch.round(count.float() * self.rate).long(), min=1)
        n = torch.where(rows & (count > 0), torch.minimum(n, count), torch.zeros_like(n))
        return self.apply(dict(batch), eligible, valid, n)

    def apply(self, batch: dict, eligible: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> dict:
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------
    def _set_special(self, tokenizer) -> None:
        self._special = torch.tensor(special_token_ids(tokenizer, self._extra_special), dtype=torch.long)

    def _pad_id(self, batch) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _valid(self, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            return ids != self._pad_id(batch)
        if not torch.is_tensor(mask) or mask.shape != ids.shape:
            raise ValueError(f"batch['attention_mask']: expected the shape of input_ids {list(ids.shape)}, got "
                             f"{list(getattr(mask, 'shape', []))}")
        return mask.bool()

    def _token_labels(self, batch) -> bool:
        lab = batch.get("labels")
        return torch.is_tensor(lab) and lab.dim() == 2 and lab.shape == batch["input_ids"].shape

    def _check_labels(self, batch) -> None:
        if not self.keeps_token_labels and self._token_labels(batch):
            raise ValueError(f"{self.name}: the batch has per-token labels {list(batch['labels'].shape)} "
                             f"(token classification / language modelling); {self.name} moves tokens and cannot "
                             f"keep them aligned -- use token_masking or embedding_substitution")

    def _pick(self, eligible: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: ``n[b]`` distinct random eligible positions of each row."""
        scores = torch.rand(eligible.shape, generator=self.generator).to(eligible.device)
        scores = torch.where(eligible, scores, torch.full_like(scores, 2.0))
        rank = scores.argsort(dim=1).argsort(dim=1)
        return eligible & (rank < n.unsqueeze(1))

    def _per_token_keys(self, batch) -> list[str]:
        shape = batch["input_ids"].shape
        keys = [k for k, v in batch.items() if k != "input_ids" and torch.is_tensor(v) and v.dim() == 2
                and v.shape == shape]
        unknown = [k for k in keys if k not in _PAD_VALUES]
        if unknown:
            raise ValueError(f"batch[{unknown[0]!r}]: {self.name} changes sequence lengths and does not know how "
                             f"to pad this per-token tensor (known: input_ids, {', '.join(_PAD_VALUES)})")
        return keys

    def _check_right_padded(self, valid: torch.Tensor) -> None:
        if valid.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(f"batch['attention_mask']: {self.name} needs right-padded batches (real tokens "
                             f"first, padding after); this batch is left-padded or has holes")

    def _rebuild(self, batch: dict, rows: list[dict], keys: list[str], width: int | None = None) -> dict:
        """New [B, L'] tensors from per-row python lists (right padded to the longest row)."""
        ref = batch["input_ids"]
        longest = max((len(r["input_ids"]) for r in rows), default=0)
        width = max(longest, 1) if width is None else width
        pad = self._pad_id(batch)
        for k in ["input_ids"] + keys:
            fill = pad if k == "input_ids" else _PAD_VALUES[k]
            out = torch.full((len(rows), width), fill, dtype=batch[k].dtype)
            for b, r in enumerate(rows):
                out[b, :len(r[k])] = torch.as_tensor(r[k], dtype=batch[k].dtype)
            batch[k] = out.to(ref.device)
        return batch


class TokenMasking(TokenAugmentation):
    """Replace ``rate`` of an example's eligible tokens by ``mask_id`` (default: the tokenizer's mask
    token, else its unk token). Keeps per-token labels aligned."""

    name = "token_masking"
    keeps_token_labels = True

    def __init__(self, *, mask_id: int | None = None, **kw):
        super().__init__(**kw)
        self.mask_id = mask_id

    def _mask(self) -> int:
        if self.mask_id is not None:
            return int(self.mask_id)
        for attr in ("mask_token_id", "unk_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                return int(v)
        raise ValueError("mask_id: the tokenizer has neither a mask nor an unk token; pass mask_id=")

    def apply(self, batch, eligible, valid, n):
        pick = self._pick(eligible, n)
        batch["input_ids"] = torch.where(pick, torch.full_like(batch["input_ids"], self._mask()), batch["input_ids"])
        return batch


class EmbeddingSubstitution(TokenAugmentation):
    """Replace ``rate`` of an example's eligible tokens by one of their ``k`` nearest neighbours (cosine
    similarity) in the model's input-embedding matrix, chosen uniformly. The neighbour rows are computed
    by :func:`embedding_neighbours` once per token id, the first time the id is picked (``precompute=True``:
    the whole vocabulary at construction); special tokens, ``[unusedN]`` placeholders and ids past the
    tokenizer's vocabulary are never neighbours. ``min_similarity`` drops weak neighbours (those tokens are
    left unchanged). ``neighbours``: a precomputed ``[V, k]`` table instead of ``model``. Keeps per-token
    labels aligned. Note: nearest neighbours in embedding space include antonyms ("good" / "bad" in
    MiniLM), so this is only approximately label-preserving for sentiment -- measure it
    (benchmarks/augment_effect.py)."""

    name = "embedding_substitution"
    keeps_token_labels = True

    def __init__(self, model=None, tokenizer=None, *, k: int = 8, min_similarity: float | None = None,
                 neighbours: torch.Tensor | None = None, precompute: bool = False, chunk_size: int = 1024, **kw):
        super().__init__(tokenizer=tokenizer, **kw)
        self.k = _int("k", k, 1)
        self.min_similarity = min_similarity
        self.chunk_size = _int("chunk_size", chunk_size, 1)
        if neighbours is not None:
            if not torch.is_tensor(neighbours) or neighbours.dim() != 2 or neighbours.dtype != torch.long:
                raise ValueError(f"neighbours: expected a [V, k] long tensor, got "
                                 f"{getattr(neighbours, 'shape', type(neighbours).__name__)}")
            self.neighbours = neighbours.cpu()
            self.k = neighbours.shape[1]
            self._w = None
            self._done = torch.ones(self.neighbours.shape[0], dtype=torch.bool)
            return
        if model is None:
            raise ValueError("model: embedding_substitution needs the model (its input-embedding matrix) or "
                             "a precomputed neighbours= table")
        from ..adversarial.hooks import input_embedding
        weight = getattr(input_embedding(model), "weight", None)
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ValueError("model: its input embedding has no [V, d] .weight matrix")
        V = weight.shape[0]
        vocab = len(tokenizer) if tokenizer is not None else None
        self._excluded = _excluded_mask(V, special_token_ids(tokenizer, self._extra_special), vocab)
        if int((~self._excluded).sum()) <= self.k:
            raise ValueError(f"k: expected fewer than the {int((~self._excluded).sum())} candidate tokens, "
                             f"got {self.k}")
        self._w = torch.nn.functional.normalize(weight.detach().float().cpu(), dim=1)
        self.neighbours = torch.arange(V).unsqueeze(1).repeat(1, self.k)
        self.similarities = torch.ones(V, self.k)
        self._done = torch.zeros(V, dtype=torch.bool)
        if precompute:
            self.ensure(torch.arange(V))

    def ensure(self, token_ids: torch.Tensor) -> None:
        """Compute the neighbour rows of ``token_ids`` not computed yet."""
        t = torch.unique(token_ids.detach().cpu().long().reshape(-1))
        t = t[~self._done[t]]
        if t.numel() == 0 or self._w is None:
            return
        ids, sims = _neighbour_rows(self._w, self._excluded, t, self.k, self.chunk_size, self.min_similarity)
        self.neighbours[t], self.similarities[t] = ids, sims
        self._done[t] = True

    def apply(self, batch, eligible, valid, n):
        ids = batch["input_ids"]
        if ids.numel() and (int(ids.max()) >= self.neighbours.shape[0] or int(ids.min()) < 0):
            raise ValueError(f"batch['input_ids']: id {int(ids.max())} is outside the neighbour table "
                             f"({self.neighbours.shape[0]} tokens)")
        pick = self._pick(eligible, n)
        j = torch.randint(0, self.k, ids.shape, generator=self.generator)
        self.ensure(ids[pick])
        table = self.neighbours.to(ids.device)
        subst = table[ids, j.to(ids.device)]
        batch["input_ids"] = torch.where(pick, subst, ids)
        return batch


class RandomSwap(TokenAugmentation):
    """``n`` times, swap two eligible tokens of the same segment (same ``token_type_ids``)."""

    name = "random_swap"

    def apply(self, batch, eligible, valid, n):
        ids = batch["input_ids"].clone()
        seg = batch.get("token_type_ids")
        nmax = int(n.max()) if n.numel() else 0
        if nmax == 0:
            return batch
        u = torch.rand(ids.shape[0], nmax, 2, generator=self.generator)
        for b in range(ids.shape[0]):
            pos = eligible[b].nonzero().squeeze(1).tolist()
            for t in range(int(n[b])):
                i = pos[int(u[b, t, 0] * len(pos))]
                same = [q for q in pos if q != i and (seg is None or int(seg[b, q]) == int(seg[b, i]))]
                if not same:
                    continue
                j = same[int(u[b, t, 1] * len(same))]
                ids[b, i], ids[b, j] = ids[b, j].clone(), ids[b, i].clone()
        batch["input_ids"] = ids
        return batch


class RandomDeletion(TokenAugmentation):
    """Delete ``n`` eligible tokens (at least one eligible token stays); later tokens shift left, the row
    is re-padded on the right and ``attention_mask`` / ``token_type_ids`` follow. The batch is trimmed to
    its new longest row."""

    name = "random_deletion"
    changes_length = True

    def apply(self, batch, eligible, valid, n):
        self._check_right_padded(valid)
        keys = self._per_token_keys(batch)
        n = torch.minimum(n, torch.clamp(eligible.sum(1) - 1, min=0))
        if int(n.sum()) == 0:
            return batch
        drop = self._pick(eligible, n)
        seg = batch.get("token_type_ids")
        if torch.is_tensor(seg) and seg.shape == drop.shape:  # never empty a segment of a text pair
            for b in range(drop.shape[0]):
                for v in torch.unique(seg[b][eligible[b]]).tolist():
                    in_seg = eligible[b] & (seg[b] == v)
                    if bool((drop[b] | ~in_seg).all()):
                        drop[b, in_seg.nonzero()[0, 0]] = False
        keep = valid & ~drop
        rows = [{k: batch[k][b][keep[b]].tolist() for k in ["input_ids"] + keys} for b in range(keep.shape[0])]
        return self._rebuild(batch, rows, keys)


class RandomInsertion(TokenAugmentation):
    """Insert ``n`` tokens, each next to (before or after, at random) a random eligible token and in its
    segment; the inserted token is a copy of a random eligible token of the same example, or, when
    ``neighbours`` ([V, k] from :func:`embedding_neighbours`) is given, a random neighbour of it (EDA's
    "insert a synonym"). Rows grow up to ``max_length``; the batch widens when needed."""

    name = "random_insertion"
    changes_length = True

    def __init__(self, *, neighbours=None, **kw):
        super().__init__(**kw)
        if neighbours is not None and not isinstance(neighbours, EmbeddingSubstitution) and \
                (not torch.is_tensor(neighbours) or neighbours.dim() != 2):
            raise ValueError(f"neighbours: expected a [V, k] long tensor or an EmbeddingSubstitution, got "
                             f"{getattr(neighbours, 'shape', type(neighbours).__name__)}")
        self._source = neighbours if isinstance(neighbours, EmbeddingSubstitution) else None
        self.neighbours = None if neighbours is None else \
            (neighbours.neighbours if self._source is not None else neighbours.long().cpu())

    def _cap(self) -> int | None:
        if self.max_length is not None:
            return self.max_length
        m = getattr(self.tokenizer, "model_max_length", None)
        return int(m) if isinstance(m, int) and 0 < m < 1_000_000 else None

    def apply(self, batch, eligible, valid, n):
        self._check_right_padded(valid)
        keys = self._per_token_keys(batch)
        lengths = valid.sum(1)
        cap = self._cap()
        if cap is not None:
            n = torch.minimum(n, torch.clamp(cap - lengths, min=0))
        nmax = int(n.max()) if n.numel() else 0
        if nmax == 0:
            return batch
        u = torch.rand(n.shape[0], nmax, 4, generator=self.generator)
        if self._source is not None:
            self._source.ensure(batch["input_ids"][eligible])
        rows = []
        for b in range(n.shape[0]):
            row = {k: batch[k][b][valid[b]].tolist() for k in ["input_ids"] + keys}
            elig = eligible[b][valid[b]].tolist()
            for t in range(int(n[b])):
                pos = [q for q, e in enumerate(elig) if e]
                src = pos[int(u[b, t, 0] * len(pos))]
                if "token_type_ids" in row:  # copy a token of the same segment
                    pos = [q for q in pos if row["token_type_ids"][q] == row["token_type_ids"][src]]
                tok = row["input_ids"][pos[int(u[b, t, 1] * len(pos))]]
                if self.neighbours is not None and tok < self.neighbours.shape[0]:
                    tok = int(self.neighbours[tok, int(u[b, t, 2] * self.neighbours.shape[1])])
                at = src + (1 if u[b, t, 3] >= 0.5 else 0)
                row["input_ids"].insert(at, tok)
                for k in keys:
                    v = {"attention_mask": 1, "special_tokens_mask": 0, "labels": -100}.get(k, row[k][src])
                    row[k].insert(at, v)
                elig.insert(at, True)
            rows.append(row)
        width = max(batch["input_ids"].shape[1], max(len(r["input_ids"]) for r in rows))
        return self._rebuild(batch, rows, keys, width=width)


TEXT_OPS = {c.name: c for c in (RandomSwap, RandomDeletion, RandomInsertion, TokenMasking, EmbeddingSubstitution)}
