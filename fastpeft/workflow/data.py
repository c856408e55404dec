"""Data readers, encoders, collators and batch samplers for the workflow.

Readers return plain Python records (``dict``), so any source -- files, lists,
Hugging Face ``datasets`` objects -- goes through the same encoding path:

* :func:`read_table` -- TSV / CSV / JSONL with configurable column names
  (``quoting=csv.QUOTE_NONE`` by default for TSV, as GLUE files need).
* :func:`read_conll` -- CoNLL files: ``TOKEN ... TAG`` per line, blank line ends a sentence,
  ``-DOCSTART-`` lines skipped.
* :func:`from_hf_dataset` -- records from a ``datasets.Dataset`` (only when ``datasets`` is installed).

Every error names the file and (where there is one) the line.

Batching: :class:`PaddingCollator` pads each batch to its own longest sequence (dynamic padding);
:class:`BatchSampler` yields shuffled, optionally length-bucketed batches that are a pure function of
``(seed, epoch)``, can start mid-epoch (exact resume) and shard every global batch across ranks
(``global_batch[rank::world_size]``, the same split ``torch.utils.data.DistributedSampler`` makes), so a
run on N processes sees the same global batches as a run on one.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Iterable, Iterator, Sequence

import torch


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


# --------------------------------------------------------------------------- readers

def _check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer (or None for all), got {limit!r}")


def _encoding_error(path: str, err: UnicodeDecodeError) -> DataError:
    """A :class:`DataError` naming the file and the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text ({err.reason}); save the file as UTF-8")


def _reading(path: str):
    """Context for reading ``path``: an encoding error becomes a :class:`DataError` with file and line."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except UnicodeDecodeError as e:
            raise _encoding_error(path, e) from None
    return ctx()

def _detect_format(path: str, fmt: str | None) -> str:
    if fmt:
        fmt = fmt.lower()
        if fmt not in ("tsv", "csv", "jsonl"):
            raise ValueError(f"format: expected 'tsv', 'csv' or 'jsonl', got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    return {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "tsv")


def read_table(path: str, columns: Sequence[str], fmt: str | None = None, *, quoting: str | None = None,
               limit: int | None = None) -> list[dict]:
    """Read a TSV/CSV (with a header row) or JSONL file, keeping ``columns``.

    Returns one ``{column: value}`` dict per row, each with ``"_line"`` (1-based line in the file).
    ``quoting`` is ``"none"`` (default for TSV: quotes are ordinary characters) or ``"minimal"`` (default
    for CSV). Raises :class:`DataError` naming the file for a missing file or column, an empty file, or a
    malformed row / JSON line (with its line number). ``limit`` keeps the first ``limit`` rows.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    _check_limit(limit)
    fmt = _detect_format(path, fmt)
    with _reading(path):
        return _read_table(path, columns, fmt, quoting, limit)


def _read_table(path, columns, fmt, quoting, limit) -> list[dict]:
    records: list[dict] = []
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                missing = [c for c in columns if c not in obj]
                if missing:
                    raise DataError(f"{path}:{lineno}: missing column(s) {missing}; "
                                    f"this line has {sorted(obj)}")
                rec = {c: obj[c] for c in columns}
                rec["_line"] = lineno
                records.append(rec)
                if limit is not None and len(records) >= limit:
                    break
    else:
        delim = "\t" if fmt == "tsv" else ","
        quoting = quoting or ("none" if fmt == "tsv" else "minimal")
        q = {"none": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL}.get(quoting)
        if q is None:
            raise ValueError(f"quoting: expected 'none' or 'minimal', got {quoting!r}")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=delim, quoting=q)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}: empty file (expected a header row)") from None
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing}; the header has {header}")
            idx = [header.index(c) for c in columns]
            for row in reader:
                lineno = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
                rec = {c: row[i] for c, i in zip(columns, idx)}
                rec["_line"] = lineno
                records.append(rec)
                if limit is not None and len(records) >= limit:
                    break
    if not records:
        raise DataError(f"{path}: empty file (no data rows)")
    return records


_BIO = re.compile(r"^(O|[BIES][-_].+)$")


def read_conll(path: str, *, token_column: int = 0, tag_column: int | None = None, limit: int | None = None,
               separator: str | None = None) -> list[dict]:
    """Read a CoNLL file into ``[{"tokens": [...], "tags": [...], "_line": first_line}, ...]``.

    Each non-blank line is ``TOKEN ... TAG`` (whitespace-separated unless ``separator`` is given); a blank
    line ends a sentence; ``-DOCSTART-`` lines are skipped. ``tag_column=None`` picks, on the first data
    line, the last column that looks like a BIO tag (``O``, ``B-X``, ``I-X``): the NER column of both
    ``TOKEN POS CHUNK NER`` and ``TOKEN NER 0`` layouts. Raises :class:`DataError` naming the file and
    line for a line with too few fields or lines of unequal width, and for an empty file.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    _check_limit(limit)
    with _reading(path):
        return _read_conll(path, token_column, tag_column, limit, separator)


def _read_conll(path, token_column, tag_column, limit, separator) -> list[dict]:
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = None
    width = None
    need = (token_column if token_column >= 0 else -token_column - 1) + 1
    if tag_column is not None:
        need = max(need, (tag_column if tag_column >= 0 else -tag_column - 1) + 1)

    def flush():
        nonlocal tokens, tags, start
        if tokens:
            sentences.append({"tokens": tokens, "tags": tags, "_line": start})
        tokens, tags, start = [], [], None

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                flush()
                if limit is not None and len(sentences) >= limit:
                    break
                continue
            parts = line.split(separator) if separator else line.split()
            if parts[0] == "-DOCSTART-":
                flush()
                continue
            if len(parts) < max(need, 2):
                raise DataError(f"{path}:{lineno}: malformed CoNLL line {line!r}: expected at least "
                                f"{max(need, 2)} fields (TOKEN ... TAG), got {len(parts)}")
            if width is None:
                width = len(parts)
                if tag_column is None:
                    cands = [i for i in range(len(parts)) if i != token_column % len(parts) and _BIO.match(parts[i])]
                    if not cands:
                        raise DataError(f"{path}:{lineno}: no column looks like a BIO tag in {line!r}; "
                                        f"set tag_column")
                    tag_column = cands[-1]
            elif len(parts) != width:
                raise DataError(f"{path}:{lineno}: malformed CoNLL line {line!r}: {len(parts)} fields, "
                                f"earlier lines have {width}")
            if start is None:
                start = lineno
            tokens.append(parts[token_column])
            tags.append(parts[tag_column])
        flush()
    if limit is not None:
        sentences = sentences[:limit]
    if not sentences:
        raise DataError(f"{path}: empty file (no sentences)")
    return sentences


def from_hf_dataset(dataset, columns: Sequence[str], limit: int | None = None) -> list[dict]:
    """Records from a Hugging Face ``datasets.Dataset`` (or any sequence of dicts) keeping ``columns``."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"dataset: missing column(s) {missing}; it has {list(names)}")
    out = []
    for i, row in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"dataset row {i}: missing column(s) {missing}")
        rec = {c: row[c] for c in columns}
        rec["_line"] = i
        out.append(rec)
    if not out:
        raise DataError("dataset: empty")
    return out


# --------------------------------------------------------------------------- datasets / collation

class EncodedDataset(torch.utils.data.Dataset):
    """A list of encoded examples (dicts of Python lists / ints) with their lengths."""

    def __init__(self, features: list[dict], records: list[dict] | None = None):
        if not features:
            raise DataError("no examples to train or evaluate on")
        self.features = features
        self.records = records
        self.lengths = [len(f["input_ids"]) for f in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i]


class PaddingCollator:
    """Pad a list of features to the longest in the batch (dynamic padding).

    ``input_ids`` pad with ``pad_token_id``, ``attention_mask``/``token_type_ids`` with 0, ``labels`` that
    are sequences with ``label_pad`` (-100: ignored by the loss). Scalar labels become a 1-D tensor.
    Keys starting with ``_`` are passed through as Python lists (bookkeeping, e.g. word ids).
    """

    def __init__(self, pad_token_id: int, label_pad: int = -100, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.label_pad = label_pad
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = int(math.ceil(longest / self.multiple) * self.multiple)
        batch: dict = {}
        for key in features[0]:
            vals = [f[key] for f in features]
            if key.startswith("_"):
                batch[key] = vals
            elif isinstance(vals[0], (list, tuple)):
                pad = {"input_ids": self.pad_token_id, "labels": self.label_pad}.get(key, 0)
                batch[key] = torch.tensor([list(v) + [pad] * (longest - len(v)) for v in vals], dtype=torch.long)
            else:
                batch[key] = torch.tensor(vals)
        return batch


class BatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, shardable batches of indices.

    The epoch's order is ``torch.randperm(n, generator seeded seed + epoch)`` (as in
    ``DistributedSampler``), or ``arange(n)`` without shuffle. With ``bucket_size`` (in batches), the
    permutation is cut into chunks of ``bucket_size * global_batch`` indices, each chunk sorted by length
    and split into batches, and the batches shuffled again -- so batches hold similar lengths (less
    padding) while staying random. Each global batch of ``batch_size * world_size`` indices is then
    split ``batch[rank::world_size]``. ``set_epoch(e, start_batch=k)`` skips the first ``k`` batches of
    epoch ``e`` (used to resume a run exactly where it stopped).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, bucket_size: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.bucket_size = bucket_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        gbs = self.batch_size * self.world_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.bucket_size and self.bucket_size > 1:
            chunk = self.bucket_size * gbs
            batches = []
            for s in range(0, n, chunk):
                part = sorted(order[s:s + chunk], key=lambda i: self.lengths[i])
                batches += [part[j:j + gbs] for j in range(0, len(part), gbs)]
            if self.shuffle:
                g2 = torch.Generator()
                g2.manual_seed(self.seed + epoch + 1_000_003)
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g2).tolist()]
        else:
            batches = [order[j:j + gbs] for j in range(0, n, gbs)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == gbs]
        # every rank needs at least one example of each global batch
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches(self.epoch)[self.start_batch:]:
            yield b[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(0, len(self.global_batches(self.epoch)) - self.start_batch)


def make_loader(dataset: EncodedDataset, collator, batch_size: int, *, shuffle: bool, seed: int = 0,
                bucket_size: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    sampler = BatchSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           bucket_size=bucket_size, rank=rank, world_size=world_size)
    # a private generator: creating an iterator must not draw from the global RNG (dropout), or a
    # resumed run would see different dropout masks than an uninterrupted one
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                       num_workers=num_workers, generator=g)


def take(records: Iterable, n: int | None, seed: int | None = None) -> list:
    """The first ``n`` records, or a fixed random subset of ``n`` when ``seed`` is given."""
    records = list(records)
    if n is None or n >= len(records):
        return records
    if seed is None:
        return records[:n]
    g = torch.Generator()
    g.manual_seed(seed)
    idx = sorted(torch.randperm(len(records), generator=g)[:n].tolist())
    return [records[i] for i in idx]
