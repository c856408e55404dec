"""Which adapters are loaded, on which base model, and where they may be loaded from.

One base model is loaded per *group*: the task family of its head (``sequence_classification``,
``token_classification``, ``causal_lm``) and, for classifiers, the number of labels (the head's shape).
Every adapter of a group is one more LoRA adapter on that group's ``PeftModel`` (``load_adapter``, no copy
of the base), and ``delete_adapter`` unloads it.  A group's model is touched under its lock only, so
loading, unloading and inference never interleave on one model.

Adapter directories are those of ``save_pretrained`` / ``fastpeft finetune``: ``adapter_config.json``,
``adapter_model.safetensors`` and, for the task and the label names, ``fastpeft_task.json``
(``{"task": ..., "labels": [...], "max_length": ...}``).  Without a task file the task comes from the
adapter config's ``task_type`` (or ``--task``); a classifier needs the task file for its labels.

Paths: an adapter may be loaded only from inside a directory given at start (``--adapter-dir``) or from
exactly a path given with ``--adapter`` at start; symlinks and ``..`` are resolved first.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field

from ..adapter_io import check_adapter_name

TASK_FILE = "fastpeft_task.json"  # fastpeft.workflow.pipeline.TASK_FILE
BASE = "base"                      # the name (besides the --model value) that addresses the base model
KINDS = ("sequence_classification", "token_classification", "causal_lm")
_TASK_TYPES = {"SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification",
               "CAUSAL_LM": "causal_lm"}
_ALIASES = {"seq_cls": "sequence_classification", "classification": "sequence_classification",
            "token_cls": "token_classification", "ner": "token_classification", "lm": "causal_lm",
            "clm": "causal_lm", "generation": "causal_lm"}


class AdapterError(Exception):
    """An adapter request that cannot be honoured; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def canonical_kind(task: str | None) -> str | None:
    if task is None:
        return None
    t = str(task).lower()
    t = _ALIASES.get(t, t)
    if t not in KINDS:
        raise AdapterError(f"task: expected one of {list(KINDS)}, got {task!r}")
    return t


@dataclass
class Adapter:
    name: str
    path: str
    kind: str
    labels: list | None
    max_length: int | None
    rank: int | None
    target_modules: object

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "owned_by": "fastpeft", "path": self.path, "task": self.kind,
                "labels": self.labels, "r": self.rank, "target_modules": self.target_modules}


@dataclass
class Group:
    """One base model with its adapters (same head shape)."""
    kind: str
    num_labels: int
    model: object                     # the transformers model, a fastpeft PeftModel once it has an adapter
    tokenizer: object
    task: object                      # the workflow task (encoding, collation)
    max_positions: int
    adapters: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    multi_forward: bool | None = None   # does model(..., adapter_names=) work here? None: not tried yet
    multi_generate: bool | None = None  # does model.generate(..., adapter_names=) work here?

    @property
    def key(self):
        return (self.kind, self.num_labels)


def _max_positions(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10**7 else 2048


class Registry:
    """The loaded adapters and their base models.

    ``model``: the base model (bundled name or local directory), ``adapter_dirs``: the directories adapters
    may be loaded from, ``default_task``: the task of adapters whose files do not say, ``base_task``: the
    task the base itself is served for (``causal_lm`` makes the base addressable for generation)."""

    def __init__(self, model: str, adapter_dirs=(), default_task: str | None = None, device: str = "cpu"):
        from ..workflow.models import resolve_model_path
        self.model_name = model
        self.model_path = resolve_model_path(model)
        self.device = device
        self.default_task = canonical_kind(default_task)
        self.roots = [os.path.realpath(d) for d in adapter_dirs]
        for d in self.roots:
            if not os.path.isdir(d):
                raise AdapterError(f"--adapter-dir: {d!r} is not a directory")
        self.allowed_files: set[str] = set()   # exact adapter paths given at start
        self.groups: dict = {}
        self.adapters: dict[str, Adapter] = {}
        self.errors: list[dict] = []           # adapters that failed to load at start
        self._lock = threading.RLock()         # the adapter table and group creation

    # ---- names
    @property
    def base_names(self) -> set:
        return {BASE, self.model_name}

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def lookup(self, name, kinds=KINDS) -> tuple[Group, str | None]:
        """(group, adapter name or None for the base) for a request's ``model`` field; AdapterError 404 when
        nothing of that name (and of one of ``kinds``) is loaded."""
        with self._lock:
            if name in self.adapters and self.adapters[name].kind in kinds:
                a = self.adapters[name]
                return self.groups[(a.kind, len(a.labels or []))], name
            if name in self.base_names and "causal_lm" in kinds:
                g = self.groups.get(("causal_lm", 0))
                if g is not None:
                    return g, None
            served = [n for n, a in sorted(self.adapters.items()) if a.kind in kinds]
            if "causal_lm" in kinds and ("causal_lm", 0) in self.groups:
                served.append(BASE)
            if name in self.adapters:
                raise AdapterError(f"model: adapter {name!r} is a {self.adapters[name].kind} adapter, not one "
                                   f"this endpoint serves; adapters here: {served}", 400)
            raise AdapterError(f"model: no adapter named {name!r} is loaded; loaded: {served}", 404)

    # ---- paths
    def allow_exact(self, path: str) -> None:
        self.allowed_files.add(os.path.realpath(path))

    def resolve_path(self, path) -> str:
        """The real path of an adapter directory if it lies under an allowed directory, else AdapterError 403."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise AdapterError(f"path: expected a directory path, got {path!r}")
        candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in self.roots] + [path]
        for c in candidates:
            real = os.path.realpath(c)
            inside = any(os.path.commonpath([real, r]) == r for r in self.roots)
            if inside or real in self.allowed_files:
                return real
        where = self.roots or "(none: start the server with --adapter-dir DIR to allow loading)"
        raise AdapterError(f"path: {path!r} is not under a directory the server was started with; allowed: "
                           f"{where}", 403)

    # ---- load / unload
    def read_adapter_info(self, path: str) -> tuple[str, list | None, int | None, dict]:
        cfg_file = os.path.join(path, "adapter_config.json")
        if not os.path.isdir(path):
            raise AdapterError(f"path: {path!r} is not a directory", 400)
        if not os.path.isfile(cfg_file):
            raise AdapterError(f"path: {path!r} has no adapter_config.json", 400)
        try:
            with open(cfg_file) as f:
                cfg = json.load(f)
            info = {}
            if os.path.isfile(os.path.join(path, TASK_FILE)):
                with open(os.path.join(path, TASK_FILE)) as f:
                    info = json.load(f)
        except (OSError, ValueError) as e:
            raise AdapterError(f"path: cannot read {path!r}: {e}", 400) from None
        kind = canonical_kind(info.get("task")) or _TASK_TYPES.get(str(cfg.get("task_type")).upper()) \
            or self.default_task
        if kind is None:
            raise AdapterError(f"path: {path!r} says neither its task ({TASK_FILE}) nor its task_type; start the "
                               f"server with --task", 400)
        labels = info.get("labels")
        if kind != "causal_lm" and not labels:
            raise AdapterError(f"path: {path!r} is a {kind} adapter without label names (its {TASK_FILE} "
                               "has no 'labels')", 400)
        if kind == "causal_lm":
            labels = None
        return kind, (list(map(str, labels)) if labels else None), info.get("max_length"), cfg

    def _group(self, kind: str, labels) -> Group:
        from ..workflow.models import load_tokenizer
        from ..workflow.tasks import get_task
        key = (kind, len(labels or []))
        with self._lock:
            g = self.groups.get(key)
            if g is not None:
                return g
            task = get_task(kind, labels=labels)
            model = task.build_model(self.model_path).to(self.device).eval()
            tok = load_tokenizer(self.model_path)
            if kind == "causal_lm":
                tok.padding_side = "left"
            g = Group(kind, key[1], model, tok, task, _max_positions(model, tok))
            self.groups[key] = g
            return g

    def ensure_base(self, kind: str = "causal_lm") -> Group:
        """Load the base for ``kind`` with no adapter (so ``model: "base"`` can be served)."""
        return self._group(canonical_kind(kind), None)

    def load(self, name: str, path: str, *, checked: bool = False) -> Adapter:
        """Load adapter ``name`` from ``path`` (under an allowed directory unless ``checked``)."""
        from .. import PeftModel
        try:
            check_adapter_name(name, "name")
        except ValueError as e:
            raise AdapterError(str(e), 400) from None
        from .inference import BASE_ROW
        if name in self.base_names or name == BASE_ROW:
            raise AdapterError(f"name: {name!r} is reserved for the base model", 400)
        real = path if checked else self.resolve_path(path)
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"name: an adapter named {name!r} is already loaded (from "
                                   f"{self.adapters[name].path}); DELETE it first", 409)
        kind, labels, max_length, cfg = self.read_adapter_info(real)
        try:
            g = self._group(kind, labels)
        except Exception as e:  # noqa: BLE001 -- e.g. a base without the head this task needs
            raise AdapterError(f"path: cannot load the base model {self.model_name!r} for {kind} adapter {name!r}: "
                               f"{type(e).__name__}: {e}", 400) from None
        with g.lock:
            try:
                if isinstance(g.model, PeftModel):
                    g.model.load_adapter(real, adapter_name=name)
                else:
                    g.model = PeftModel.from_pretrained(g.model, real, adapter_name=name)
                g.model.eval()
            except Exception as e:  # noqa: BLE001 -- any failure of the files is reported, the server goes on
                raise AdapterError(f"path: adapter {name!r} from {real!r} failed to load: {type(e).__name__}: {e}",
                                   400) from None
            a = Adapter(name, real, kind, labels, max_length, cfg.get("r"), cfg.get("target_modules"))
            g.adapters[name] = a
            g.multi_forward = g.multi_generate = None  # what this set of adapters can mix: try again
        with self._lock:
            self.adapters[name] = a
        return a

    def unload(self, name: str) -> Adapter:
        with self._lock:
            a = self.adapters.get(name)
            if a is None:
                raise AdapterError(f"name: no adapter named {name!r} is loaded; loaded: {self.names()}", 404)
            g = self.groups[(a.kind, len(a.labels or []))]
        with g.lock:
            if len(g.model.peft_config) > 1:
                if g.model.active_adapters == [name]:
                    g.model.set_adapter(next(n for n in g.model.peft_config if n != name))
                g.model.delete_adapter(name)
            else:  # its last adapter: keep the base, drop the LoRA layers
                g.model = g.model.unload().eval()
            del g.adapters[name]
            g.multi_forward = g.multi_generate = None
        with self._lock:
            del self.adapters[name]
        return a

    def describe(self) -> list[dict]:
        with self._lock:
            out = [a.describe() for _, a in sorted(self.adapters.items())]
            if ("causal_lm", 0) in self.groups:
                out.append({"id": BASE, "object": "model", "owned_by": "fastpeft", "path": self.model_path,
                            "task": "causal_lm", "labels": None, "r": None, "target_modules": None})
            return out
