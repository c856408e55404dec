"""SetFit-style few-shot classification (Tunstall et al. 2022) with a LoRA-adapted sentence encoder.

Two stages, both on the k-shot set only:

1. **Contrastive fine-tuning of the encoder.** ``iterations`` (R) rounds of pair generation: in each
   round every shot ``i`` is paired with one shot of its own class (target 1) and one of another class
   (target 0), so ``2 * R * N`` pairs for ``N`` shots. The encoder is wrapped with LoRA
   (``fastpeft.get_peft_model(AutoModel, LoraConfig(...))``) and trained on the pairs, e.g. with the
   cosine-similarity loss. Equivalent plain PyTorch of one step::

       ea = mean_pool(encoder(**tok(a_texts)).last_hidden_state, mask_a)     # [B, D]
       eb = mean_pool(encoder(**tok(b_texts)).last_hidden_state, mask_b)     # [B, D]
       cos = F.cosine_similarity(ea, eb, dim=-1)                             # [B]
       loss = F.mse_loss(cos, target)                                        # loss="cosine"
       # loss="contrastive" (Hadsell et al.; sentence-transformers' ContrastiveLoss, cosine distance):
       # d = 1 - cos; loss = 0.5 * (target * d**2 + (1 - target) * F.relu(margin - d)**2).mean()
       loss.backward(); opt.step(); sched.step()                             # AdamW, linear warmup/decay

Optionally (``label_names``), SetFit's templated examples (the ``setfit`` library's
``get_templated_dataset``) are added to the shots before both stages: for every class ``c``,
``template_samples`` copies of ``template.format(label_names[c])`` (default ``"This sentence is {}"``;
a list of templates gives ``template_samples`` copies of every one)
labelled ``c``, so they take part in pair generation and in head fitting like real shots.

Optionally (``augment``), altered copies of the real shots join them before both stages, with the
shot's label: every operation named in ``augment`` (token-level ops of :mod:`fastpeft.augment.text`:
``random_swap``, ``random_deletion``, ``random_insertion``, ``token_masking``,
``embedding_substitution``) makes ``augment_copies`` copies of each shot, each changing
``augment_rate`` of its tokens (at least one). Templated examples are not altered. Equivalent::

    for name in augment:
        op = TEXT_OPS[name](p=1.0, rate=augment_rate, seed=..., tokenizer=tok, max_length=max_length)
        for _ in range(augment_copies):
            extra_ids += unpad(op(pad(shot_ids)))        # same labels as the shots

Pair sampling (``sampling``): ``"random"`` is the above (SetFit < 1.0, ``num_iterations``);
``"oversampling"`` is SetFit >= 1.0's default (``ContrastiveDataset``): every unique pair of examples, an
example with itself included, is built once, and the smaller of the positive / negative sets is cycled
until it is as large as the other; ``epochs`` passes over them (``iterations`` is not used).

2. **A light head.** The adapted encoder embeds the shots (mean pooling, L2-normalised) and a
   multinomial logistic regression (:mod:`fastpeft.fewshot.head`) is fitted on them. Prediction:
   ``head(normalize(mean_pool(encoder(x)))).argmax(-1)``.

   ``head_prior="label_names"`` (needs ``label_names``) is a zero-shot label-name prior: the head's L2
   penalty pulls it towards ``P = head_prior_scale * (E - E.mean(0))`` instead of zero, ``E[c]`` the
   adapted encoder's normalised embedding of ``template.format(label_names[c])`` (the mean over a list of
   templates): ``W = P`` alone is the
   zero-shot cosine classifier at sentence-transformers' usual similarity scale 20 (temperature 0.05)
   (:meth:`LogisticHead.fit` with ``prior=P``).

3. **Optional end-to-end phase** (SetFit's ``end_to_end=True``; ``end_to_end_epochs`` > 0): the head from
   stage 2 and the LoRA weights are then trained jointly with cross-entropy on the shots (templated
   examples included), ``body_lr`` for LoRA, ``head_lr`` for the head (AdamW, no weight decay, constant
   rate), keeping the head's own penalty. One step::

       logits = head(normalize(mean_pool(encoder(x_batch))))
       loss = F.cross_entropy(logits, y_batch) + ((head.weight - P) ** 2).sum() / (2 * head_C * N)
       # (P = 0 without a prior)

Everything random (LoRA initialisation, pair generation, batch order) flows from ``seed``; the global
torch RNG is restored after :meth:`SetFitClassifier.fit`, so runs are deterministic on CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from .encoder import Tokenized, embed_texts, embed_tokenized, load_encoder, sentence_embeddings
from .head import LogisticHead

LOSSES = ("cosine", "contrastive")
SAMPLINGS = ("random", "oversampling")
HEAD_PRIORS = ("none", "label_names")
DEFAULT_TEMPLATE = "This sentence is {}"   # SetFit's default (setfit.get_templated_dataset)


@dataclass
class SetFitConfig:
    """Hyper-parameters of :class:`SetFitClassifier` (defaults: SetFit's R=20, batch 16, 1 epoch,
    max length 64; LoRA r=8 on attention and feed-forward linears with a LoRA-sized learning rate)."""

    model: str | None = None             # bundled name ("minilm", default) or a local transformers directory
    iterations: int = 20                 # R: rounds of pair generation
    epochs: int = 1
    lr: float = 2.5e-4                   # LoRA-sized (SetFit full fine-tuning uses 2e-5); chosen on held-out
                                         # SST-2 train (benchmarks/results/fewshot_sst2_tuning.json)
    batch_size: int = 16                 # pairs per step
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 64
    loss: str = "cosine"                 # cosine | contrastive
    margin: float = 0.5                  # contrastive loss margin (cosine distance)
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list | str = field(default_factory=lambda: ["query", "key", "value", "dense"])
    head_C: float = 1.0                  # inverse L2 strength of the logistic head
    head_max_iter: int = 200
    eval_batch_size: int = 64
    label_names: dict | None = None      # {label: name}: add SetFit's templated examples (None: off)
    template: str | list = DEFAULT_TEMPLATE   # one "{}" placeholder for the label name (or a list of such)
    template_samples: int = 8            # copies of each templated sentence (0: off)
    sampling: str = "random"             # random (R rounds) | oversampling (SetFit >= 1.0: all unique pairs)
    head_prior: str = "none"             # none | label_names (zero-shot label-name prior; needs label_names)
    head_prior_scale: float = 20.0       # logit scale of the prior (cosine / 0.05)
    end_to_end_epochs: int = 0           # > 0: joint head + LoRA cross-entropy phase (SetFit end_to_end)
    body_lr: float = 1e-4                # LoRA learning rate of the end-to-end phase
    head_lr: float = 1e-2                # head learning rate of the end-to-end phase (SetFit's)
    augment: list = field(default_factory=list)   # token-level ops making altered copies of the shots ([]: off)
    augment_copies: int = 1              # copies of every shot per op in augment
    augment_rate: float = 0.1            # fraction of a copy's tokens changed (at least one)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SetFitConfig":
        for k in ("iterations", "epochs", "batch_size", "max_length", "r", "lora_alpha", "head_max_iter",
                  "eval_batch_size", "augment_copies"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: expected an int >= 1, got {v!r}")
        for k in ("lr", "head_C", "margin", "body_lr", "head_lr", "head_prior_scale"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{k}: expected a number > 0, got {v!r}")
        check_augment(self.augment)
        for k in ("warmup_ratio", "lora_dropout"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{k}: expected a number in [0, 1), got {v!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {self.sampling!r}")
        if self.head_prior not in HEAD_PRIORS:
            raise ValueError(f"head_prior: expected one of {HEAD_PRIORS}, got {self.head_prior!r}")
        if self.head_prior == "label_names" and self.label_names is None:
            raise ValueError("head_prior: 'label_names' needs label_names={label: name}")
        if isinstance(self.augment_rate, bool) or not isinstance(self.augment_rate, (int, float)) \
                or not 0 < self.augment_rate <= 1:
            raise ValueError(f"augment_rate: expected a number in (0, 1], got {self.augment_rate!r}")
        for k in ("end_to_end_epochs", "template_samples"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k}: expected an int >= 0 (0 disables), got {v!r}")
        check_template(self.template)
        if self.label_names is not None:
            check_label_names(self.label_names)
        return self


def check_template(template) -> str | list:
    """``template`` must be a string with exactly one ``{}`` placeholder (and no other format fields), or
    a non-empty list of distinct such strings."""
    if isinstance(template, (list, tuple)):
        if not template or len(set(map(str, template))) != len(template):
            raise ValueError(f"template: expected a non-empty list of distinct templates, got {template!r}")
        return [check_template(t) for t in template]
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template: expected a string with exactly one '{{}}' placeholder, got {template!r}")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"template: expected a string with exactly one '{{}}' placeholder and no other "
                         f"format fields (write braces as '{{{{' / '}}}}'), got {template!r}") from None
    return template


def check_augment(augment) -> list:
    """``augment`` must be a list of distinct token-level op names of :mod:`fastpeft.augment.text`."""
    from ..augment.text import TEXT_OPS
    if not isinstance(augment, (list, tuple)) or any(not isinstance(a, str) for a in augment) \
            or len(set(augment)) != len(augment):
        raise ValueError(f"augment: expected a list of distinct names from {sorted(TEXT_OPS)}, got {augment!r}")
    unknown = [a for a in augment if a not in TEXT_OPS]
    if unknown:
        raise ValueError(f"augment: unknown operation(s) {unknown}; known {sorted(TEXT_OPS)}")
    return list(augment)


def augmented_copies(tk: Tokenized, idx: Sequence[int], ops: Sequence, copies: int) -> list[list[int]]:
    """Token-id rows of altered copies of the rows ``idx`` of ``tk``: for each op of ``ops`` (token-level
    :mod:`fastpeft.augment.text` operations, e.g. with ``p=1``), ``copies`` calls on the padded rows; the
    result is ordered op, copy, row (so row ``t`` copies ``idx[t % len(idx)]``). Padding is stripped."""
    idx = list(idx)
    if not idx:
        return []
    batch = tk.batch(idx)
    rows = []
    for op in ops:
        for _ in range(copies):
            out = op(dict(batch))
            keep = out["attention_mask"].bool()
            rows += [out["input_ids"][b][keep[b]].tolist() for b in range(len(idx))]
    return rows


def check_label_names(label_names) -> dict:
    """``label_names`` must be a non-empty mapping ``{label: non-empty name}``."""
    if not isinstance(label_names, dict) or not label_names:
        raise ValueError(f"label_names: expected a non-empty mapping {{label: name}}, got {label_names!r}")
    for k, v in label_names.items():
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"label_names: expected a non-empty string name for label {k!r}, got {v!r}")
    return label_names


def templated_examples(classes: Sequence[Hashable], label_names: dict, template: str | list = DEFAULT_TEMPLATE,
                       sample_size: int = 8) -> tuple[list[str], list]:
    """SetFit's templated examples (``setfit.get_templated_dataset``): for each class ``c`` of ``classes``
    (in order), ``sample_size`` copies of ``template.format(label_names[c])`` labelled ``c`` (for a list
    of templates: ``sample_size`` copies of each, templates in list order).

    ``label_names`` keys match a class when equal to it or equal as strings (``{0: "negative"}`` names the
    label ``"0"`` read from a TSV). Raises ValueError naming ``label_names`` when a class has no name or a
    name's label is not among ``classes``, ``template`` / ``sample_size`` when malformed. Equivalent::

        texts = [template.format(label_names[c]) for c in classes for _ in range(sample_size)]
        labels = [c for c in classes for _ in range(sample_size)]
    """
    templates = check_template(template)
    templates = templates if isinstance(templates, list) else [templates]
    check_label_names(label_names)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 0:
        raise ValueError(f"sample_size: expected an int >= 0, got {sample_size!r}")
    classes = list(classes)
    by_str = {}
    for k, v in label_names.items():
        if str(k) in by_str and by_str[str(k)] != v:
            raise ValueError(f"label_names: label {k!r} is given two names ({by_str[str(k)]!r}, {v!r})")
        by_str[str(k)] = v
    missing = [c for c in classes if str(c) not in by_str]
    if missing:
        raise ValueError(f"label_names: no name for label(s) {missing}; names given for {list(label_names)}")
    unknown = sorted(set(by_str) - {str(c) for c in classes})
    if unknown:
        raise ValueError(f"label_names: label(s) {unknown} are not among the training labels {classes}")
    texts, labels = [], []
    for c in classes:
        for t in templates:
            texts += [t.format(by_str[str(c)])] * sample_size
            labels += [c] * sample_size
    return texts, labels


def generate_pairs(labels: Sequence[int], iterations: int, seed: int = 0) -> list[tuple[int, int, float]]:
    """SetFit pair generation: ``iterations`` rounds; in each, every index ``i`` gets one positive
    ``(i, j, 1.0)`` with ``labels[j] == labels[i]`` (``j != i`` when the class has another member) and one
    negative ``(i, j, 0.0)`` with ``labels[j] != labels[i]``; the ``2 * iterations * N`` pairs are
    returned shuffled. Pure function of its arguments."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
    labels = list(labels)
    if len(set(labels)) < 2:
        raise ValueError(f"labels: pairs need at least 2 classes, got {sorted(set(map(str, labels)))}")
    by_class: dict = {}
    for i, l in enumerate(labels):
        by_class.setdefault(l, []).append(i)
    g = torch.Generator()
    g.manual_seed(seed)

    def pick(cands):
        return cands[int(torch.randint(len(cands), (1,), generator=g))]

    pairs = []
    for _ in range(iterations):
        for i, l in enumerate(labels):
            same = [j for j in by_class[l] if j != i] or [i]
            other = [j for j in range(len(labels)) if labels[j] != l]
            pairs.append((i, pick(same), 1.0))
            pairs.append((i, pick(other), 0.0))
    order = torch.randperm(len(pairs), generator=g).tolist()
    return [pairs[j] for j in order]


def oversampled_pairs(labels: Sequence[int], seed: int = 0) -> list[tuple[int, int, float]]:
    """SetFit >= 1.0's ``"oversampling"`` pairs: every unordered pair ``(i, j)`` with ``i <= j`` (an example
    with itself included, like ``setfit.sampler.shuffle_combinations``), target 1.0 when the labels agree;
    the positives and the negatives are each shuffled, and the smaller set is cycled until both have
    ``max(#positives, #negatives)`` pairs; the result is shuffled. Pure function of its arguments::

        pos = [(i, j, 1.) for i in range(N) for j in range(i, N) if y[i] == y[j]]       # shuffled
        neg = [(i, j, 0.) for i in range(N) for j in range(i, N) if y[i] != y[j]]       # shuffled
        n = max(len(pos), len(neg))
        pairs = [pos[t % len(pos)] for t in range(n)] + [neg[t % len(neg)] for t in range(n)]  # shuffled
    """
    labels = list(labels)
    if len(set(labels)) < 2:
        raise ValueError(f"labels: pairs need at least 2 classes, got {sorted(set(map(str, labels)))}")
    g = torch.Generator()
    g.manual_seed(seed)
    n = len(labels)
    pos = [(i, j, 1.0) for i in range(n) for j in range(i, n) if labels[i] == labels[j]]
    neg = [(i, j, 0.0) for i in range(n) for j in range(i, n) if labels[i] != labels[j]]
    pos = [pos[t] for t in torch.randperm(len(pos), generator=g).tolist()]
    neg = [neg[t] for t in torch.randperm(len(neg), generator=g).tolist()]
    m = max(len(pos), len(neg))
    pairs = [pos[t % len(pos)] for t in range(m)] + [neg[t % len(neg)] for t in range(m)]
    return [pairs[t] for t in torch.randperm(len(pairs), generator=g).tolist()]


def label_name_prior(embed, classes: Sequence[Hashable], label_names: dict,
                     template: str | list = DEFAULT_TEMPLATE, scale: float = 20.0) -> torch.Tensor:
    """The zero-shot label-name prior ``P`` [C, D] of the head: ``E[c] = embed([template.format(name_c)])``
    (normalised embeddings, one per class in ``classes`` order; for a list of templates the mean over them),
    centred over the classes and scaled: ``P = scale * (E - E.mean(0))`` (centring changes no softmax).
    ``embed`` maps a list of texts to [n, D]."""
    texts, _ = templated_examples(classes, label_names, template, 1)
    E = embed(texts).float()
    E = E.reshape(len(list(classes)), -1, E.shape[-1]).mean(1)       # [C, T, D] -> [C, D]
    return scale * (E - E.mean(0, keepdim=True))


def pair_loss(ea: torch.Tensor, eb: torch.Tensor, target: torch.Tensor, kind: str = "cosine",
              margin: float = 0.5) -> torch.Tensor:
    """Loss of embedding pairs ``ea``, ``eb`` [B, D] with targets [B] in {0, 1} (module docstring)."""
    cos = F.cosine_similarity(ea, eb, dim=-1)
    if kind == "cosine":
        return F.mse_loss(cos, target.to(cos.dtype))
    if kind == "contrastive":
        d = 1 - cos
        t = target.to(cos.dtype)
        return 0.5 * (t * d ** 2 + (1 - t) * F.relu(margin - d) ** 2).mean()
    raise ValueError(f"loss: expected one of {LOSSES}, got {kind!r}")


def _label_ids(labels: Sequence[Hashable], classes: list | None = None):
    from .sampling import _sort_key
    labels = list(labels)
    if classes is None:
        classes = sorted(set(labels), key=_sort_key)
    idx = {c: i for i, c in enumerate(classes)}
    try:
        return classes, [idx[l] for l in labels]
    except KeyError as e:
        raise ValueError(f"labels: unknown label {e.args[0]!r}; known classes {classes}") from None


def _check_texts_labels(texts, labels):
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise ValueError(f"labels: expected one label per text ({len(texts)}), got {len(labels)}")
    if len(set(labels)) < 2:
        raise ValueError(f"labels: a classifier needs at least 2 classes, got {sorted(set(map(str, labels)))}")
    return texts, labels


class SetFitClassifier:
    """``SetFitClassifier(**SetFitConfig fields).fit(texts, labels, seed).predict(texts) -> labels``."""

    name = "setfit"

    def __init__(self, config: SetFitConfig | None = None, **overrides):
        base = dataclasses.asdict(config) if config is not None else {}
        base.update(overrides)
        try:
            self.config = SetFitConfig(**base)
        except TypeError as e:
            raise ValueError(f"SetFitClassifier: {e}") from None
        self.encoder = self.tokenizer = self.head = None
        self.classes_: list | None = None
        self.history: list[float] = []
        self.templated_ = 0                  # templated examples added to the shots by the last fit()
        self.augmented_ = 0                  # altered copies of the shots added by the last fit() (augment)
        self.train_tokens_: Tokenized | None = None  # the last fit's examples (shots, templated, altered copies)
        self.train_y_: list[int] = []               # ... and their class ids (indices into classes_)
        self.prior_: torch.Tensor | None = None      # label-name prior P [C, D] of the last fit (head_prior)
        self.end_to_end_history: list[float] = []

    def _build_encoder(self):
        import fastpeft
        enc, tok = load_encoder(self.config.model)
        c = self.config
        lcfg = fastpeft.LoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                   target_modules=c.target_modules)
        return fastpeft.get_peft_model(enc, lcfg), tok

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable], seed: int = 0) -> "SetFitClassifier":
        texts, labels = _check_texts_labels(texts, labels)
        c = self.config
        self.templated_ = 0
        if c.label_names is not None and c.template_samples:
            from .sampling import _sort_key
            classes = sorted(set(labels), key=_sort_key)
            extra_t, extra_l = templated_examples(classes, c.label_names, c.template, c.template_samples)
            texts, labels = texts + extra_t, labels + extra_l
            self.templated_ = len(extra_t)
        self.classes_, y = _label_ids(labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder, self.tokenizer = self._build_encoder()
            tk = Tokenized(self.tokenizer, texts, c.max_length)
            self.augmented_ = 0
            if c.augment:
                shots = len(texts) - self.templated_             # the real shots come first
                rows = augmented_copies(tk, range(shots), self._augment_ops(seed), c.augment_copies)
                tk.extend(rows)
                y = y + [y[t % shots] for t in range(len(rows))]
                self.augmented_ = len(rows)
            pairs = (oversampled_pairs(y, seed) if c.sampling == "oversampling"
                     else generate_pairs(y, c.iterations, seed))
            self.train_tokens_, self.train_y_ = tk, y
            self.history = self._contrastive_train(tk, pairs, seed)
            self.head = self._fit_head(tk, y)
            self.end_to_end_history = self._end_to_end_train(tk, y, seed) if c.end_to_end_epochs else []
        return self

    def _augment_ops(self, seed: int) -> list:
        """The ``augment`` operations, each with its own seed derived from ``seed``."""
        from ..augment.text import TEXT_OPS
        c = self.config
        ops = []
        for k, name in enumerate(c.augment):
            kw = dict(p=1.0, rate=c.augment_rate, seed=seed * 1009 + k, tokenizer=self.tokenizer,
                      max_length=c.max_length)
            if name == "embedding_substitution":
                kw["model"] = self.encoder
            ops.append(TEXT_OPS[name](**kw))
        return ops

    def _prior(self):
        c = self.config
        if c.head_prior != "label_names":
            return None
        return label_name_prior(self.embed, self.classes_, c.label_names, c.template, c.head_prior_scale)

    def _fit_head(self, tk: Tokenized, y) -> LogisticHead:
        """Stage 2: the logistic head on the adapted encoder's normalised embeddings of the examples."""
        c = self.config
        X = embed_tokenized(self.encoder, tk, batch_size=c.eval_batch_size)
        self.prior_ = self._prior()
        return LogisticHead(X.shape[1], len(self.classes_)).fit(X, torch.tensor(y), C=c.head_C,
                                                                  max_iter=c.head_max_iter, prior=self.prior_)

    def _end_to_end_train(self, tk: Tokenized, y: list[int], seed: int) -> list[float]:
        """Stage 3 (module docstring): head + LoRA trained jointly with cross-entropy on the shots."""
        c = self.config
        model, head = self.encoder, self.head
        dev = next(model.parameters()).device
        head.to(dev)
        ref = torch.zeros_like(head.weight) if self.prior_ is None else self.prior_.to(dev, head.weight.dtype)
        body = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": body, "lr": c.body_lr},
                                 {"params": list(head.parameters()), "lr": c.head_lr}], weight_decay=0.0)
        g = torch.Generator()
        g.manual_seed(seed + 2)
        yt = torch.tensor(y, device=dev)
        n = len(y)
        losses = []
        model.train()
        for _ in range(c.end_to_end_epochs):
            order = torch.randperm(n, generator=g).tolist()
            for s in range(0, n, c.batch_size):
                idx = order[s:s + c.batch_size]
                emb = sentence_embeddings(model, tk.batch(idx, dev), normalize=True)
                loss = F.cross_entropy(head(emb.to(head.weight.dtype)), yt[idx]) + head.penalty(ref, c.head_C, n)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        model.eval()
        return losses

    def _contrastive_train(self, tk: Tokenized, pairs, seed: int) -> list[float]:
        c = self.config
        model = self.encoder
        dev = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        steps_per_epoch = math.ceil(len(pairs) / c.batch_size)
        total = steps_per_epoch * c.epochs
        warm = int(c.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        g = torch.Generator()
        g.manual_seed(seed + 1)
        losses = []
        model.train()
        for epoch in range(c.epochs):
            order = torch.randperm(len(pairs), generator=g).tolist() if epoch else list(range(len(pairs)))
            for s in range(0, len(order), c.batch_size):
                chunk = [pairs[j] for j in order[s:s + c.batch_size]]
                # each distinct shot of the batch is encoded once (a k-shot set is small, so a batch of
                # 16 pairs touches at most N texts): the loss of encoding both sides of every pair, except
                # that with dropout on a text shares one mask across its pairs in the step
                uniq = sorted({i for a, b, _ in chunk for i in (a, b)})
                pos = {i: j for j, i in enumerate(uniq)}
                emb = sentence_embeddings(model, tk.batch(uniq, dev))
                ia = torch.tensor([pos[a] for a, _, _ in chunk], device=dev)
                ib = torch.tensor([pos[b] for _, b, _ in chunk], device=dev)
                target = torch.tensor([t for _, _, t in chunk], device=dev)
                loss = pair_loss(emb[ia], emb[ib], target, c.loss, c.margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
        model.eval()
        return losses

    def _check_fitted(self):
        if self.head is None:
            raise RuntimeError("SetFitClassifier: call fit() before predict()")

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings [N, D] from the adapted encoder."""
        if self.encoder is None:
            raise RuntimeError("SetFitClassifier: call fit() first")
        return embed_texts(self.encoder, self.tokenizer, texts, batch_size=self.config.eval_batch_size,
                           max_length=self.config.max_length)

    def predict_ids(self, texts: Sequence[str]) -> torch.Tensor:
        self._check_fitted()
        return self.head.predict(self.embed(texts))

    def predict(self, texts: Sequence[str]) -> list:
        return [self.classes_[i] for i in self.predict_ids(texts).tolist()]

    # ---- saving ----------------------------------------------------------------------------------
    CONFIG_FILE = "setfit_config.json"
    HEAD_FILE = "head.safetensors"

    def save_pretrained(self, directory: str) -> str:
        """Write the fitted classifier to ``directory``: ``encoder/`` (the LoRA adapter in PEFT format,
        loadable by HF PEFT too), ``head.safetensors`` (logistic head ``weight`` [C, D], ``bias`` [C]) and
        ``setfit_config.json`` (the config and the class labels). Every file is written atomically."""
        import json
        import os

        from ..checkpoint import atomic_write_bytes, save_safetensors
        self._check_fitted()
        bad = [c for c in self.classes_ if not isinstance(c, (str, int, float, bool))]
        if bad:
            raise ValueError(f"classes_: only str / int / float / bool labels can be saved, got {bad[:3]!r}")
        os.makedirs(directory, exist_ok=True)
        self.encoder.save_pretrained(os.path.join(directory, "encoder"))
        save_safetensors({"weight": self.head.weight.detach().contiguous(),
                          "bias": self.head.bias.detach().contiguous()}, os.path.join(directory, self.HEAD_FILE))
        meta = {"config": dataclasses.asdict(self.config), "classes": list(self.classes_),
                "templated": self.templated_}
        atomic_write_bytes(os.path.join(directory, self.CONFIG_FILE), json.dumps(meta, indent=1).encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str) -> "SetFitClassifier":
        """A classifier written by :meth:`save_pretrained`: the base encoder named in its config (loaded
        offline) with the saved LoRA adapter, and the saved head; ready to ``predict``."""
        import json
        import os

        import fastpeft
        from ..checkpoint import load_safetensors
        path = os.path.join(directory, cls.CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"directory: {directory!r} has no {cls.CONFIG_FILE} "
                                    f"(not written by SetFitClassifier.save_pretrained)")
        with open(path) as f:
            meta = json.load(f)
        self = cls(SetFitConfig(**meta["config"]))
        enc, self.tokenizer = load_encoder(self.config.model)
        self.encoder = fastpeft.PeftModel.from_pretrained(enc, os.path.join(directory, "encoder"))
        self.encoder.eval()
        w = load_safetensors(os.path.join(directory, cls.HEAD_FILE))
        if set(w) != {"weight", "bias"} or w["weight"].shape[0] != len(meta["classes"]):
            raise ValueError(f"{cls.HEAD_FILE}: expected weight [{len(meta['classes'])}, D] and bias, got "
                             f"{ {k: tuple(v.shape) for k, v in w.items()} }")
        self.head = LogisticHead(w["weight"].shape[1], w["weight"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(w["weight"])
            self.head.bias.copy_(w["bias"])
        self.classes_ = list(meta["classes"])
        self.templated_ = meta.get("templated", 0)
        return self
