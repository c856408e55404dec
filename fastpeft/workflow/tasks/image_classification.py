"""Image classification on CNN bases (LeNet-5, torchvision's ResNet / VGG / AlexNet): transfer learning with
LoRA on Conv2d and Linear, BitFit, bottleneck adapters, linear probing or full fine-tuning.

Data (``data.train`` etc.):

* a directory of class sub-directories, ``root/<label>/<image file>`` (PNG, JPEG, ... read with Pillow);
  for ``predict`` also a flat directory of images;
* an ``.npz`` file with an image array (key ``image_column``, default ``images``: ``[N, H, W]``,
  ``[N, H, W, C]`` or ``[N, C, H, W]``) and a label array (key ``label_column``, default ``labels``; not
  needed for ``predict``).

Errors name the file (and the image index in an ``.npz``).  Images are preprocessed to the base's input by
:class:`~fastpeft.workflow.tasks.image_models.ImagePreprocessor` (the "tokenizer" of this task).
"""
from __future__ import annotations

import os

import torch

from .. import metrics as M
from ..data import DataError, EncodedDataset
from .base import Task, register_task, require_two_classes
from .image_models import (ImagePreprocessor, adaptable_layers, adapter_sites, load_image_model,
                           read_image_config)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


class ImageDataset(EncodedDataset):
    """Preprocessed images: ``features[i] = {"pixel_values": [C, S, S] float32, "labels": int}``."""

    def __init__(self, features: list[dict], records: list[dict] | None = None):
        if not features:
            raise DataError("no images to train or evaluate on")
        self.features = features
        self.records = records
        self.lengths = [1] * len(features)


def image_collator(features: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([f["pixel_values"] for f in features])}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------- readers

def read_image_folder(root: str, with_labels: bool = True, limit: int | None = None) -> list[dict]:
    """``root/<label>/<image>`` -> records ``{"image_path", "label", "_source", "_line"}`` (sorted by label, then
    file name). Without labels, a flat directory of images is accepted too. Hidden files are skipped; any
    other file that is not an image (by extension) is an error naming it."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: directory not found")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    files = [e for e in entries if not os.path.isdir(os.path.join(root, e))]
    recs = []

    def add(path, label):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        rec = {"image_path": path, "_source": path, "_line": len(recs) + 1}
        if label is not None:
            rec["label"] = label
        recs.append(rec)

    if dirs and files and with_labels:
        raise DataError(f"{root}: mixes class sub-directories {dirs[:3]} with files {files[:3]}; expected "
                        f"root/<label>/<image>")
    if dirs:
        for d in dirs:
            for e in sorted(x for x in os.listdir(os.path.join(root, d)) if not x.startswith(".")):
                add(os.path.join(root, d, e), d)
    elif with_labels:
        raise DataError(f"{root}: no class sub-directories (expected root/<label>/<image>)")
    else:
        for e in files:
            add(os.path.join(root, e), None)
    if not recs:
        raise DataError(f"{root}: no images")
    return recs[:limit] if limit is not None else recs


def load_image_file(path: str):
    """Pixels of one image file as a uint8 array ``[H, W]`` or ``[H, W, C]`` (Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image_classification: reading image files needs Pillow: pip install pillow "
                          "(or give the images as an .npz array)") from None
    import numpy as np
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None


def read_npz(path: str, image_key: str = "images", label_key: str = "labels", with_labels: bool = True,
             limit: int | None = None) -> list[dict]:
    """An ``.npz`` with ``image_key`` ([N, ...] images) and ``label_key`` ([N] labels) -> records
    ``{"image", "label", "_source": path, "_line": index}`` (``_line`` is the image index)."""
    import numpy as np
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, a pickled object array, ...
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    with z:
        if image_key not in z.files:
            raise DataError(f"{path}: no array {image_key!r} (image_column); the file has {z.files}")
        images = z[image_key]
        labels = None
        if with_labels:
            if label_key not in z.files:
                raise DataError(f"{path}: no array {label_key!r} (label_column); the file has {z.files}")
            labels = z[label_key]
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: {image_key!r} has shape {images.shape}; expected [N, H, W], [N, H, W, C] or "
                        f"[N, C, H, W]")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise DataError(f"{path}: {label_key!r} has shape {labels.shape}; expected [{len(images)}] (one label "
                        f"per image)")
    if len(images) == 0:
        raise DataError(f"{path}: no images")
    n = len(images) if limit is None else min(limit, len(images))
    recs = []
    for i in range(n):
        r = {"image": images[i], "_source": path, "_line": i}
        if labels is not None:
            lab = labels[i].item() if hasattr(labels[i], "item") else labels[i]
            r["label"] = str(lab)
        recs.append(r)
    return recs


# --------------------------------------------------------------------------- the task

@register_task
class ImageClassification(Task):
    """One label per image, on a CNN base. Metrics: accuracy, macro-F1, loss. ``predict`` gives the label
    and its probability per image."""

    name = "image_classification"
    aliases = ("image_cls", "cnn")
    default_metric = "accuracy"
    default_mode = "max"
    head_modules = ["classifier"]
    peft_task_type = None  # HF PEFT has no image-classification task type (the base is not a transformers model)
    default_target_modules: list[str] | str = []  # set per base by build_model (every conv / linear layer)
    data_keys = ("image_column",)

    # ---- base model and preprocessing
    def resolve_model(self, name_or_path: str) -> str:
        read_image_config(name_or_path)  # raises naming what is wrong
        return name_or_path

    def load_tokenizer(self, model_path: str) -> ImagePreprocessor:
        return ImagePreprocessor.for_model(model_path)

    def build_model(self, model_path: str):
        if not self.labels:
            raise ValueError("labels are unknown: call fit_labels on the training records first")
        model = load_image_model(model_path, self.labels)
        self.default_target_modules = adaptable_layers(model)
        self._adapter_sites = adapter_sites(model)
        return model

    def method_defaults(self, name: str) -> dict:
        if name == "adapter":
            return {"target_modules": list(getattr(self, "_adapter_sites", []) or [])}
        return {}

    # ---- data
    def read(self, path, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        if not isinstance(path, (str, os.PathLike)):
            raise DataError("image_classification reads a directory of class folders or an .npz file, not a dataset "
                            "object")
        path = str(path)
        if os.path.isdir(path):
            return read_image_folder(path, with_labels=with_labels, limit=limit)
        if path.lower().endswith(".npz"):
            return read_npz(path, cfg.get("image_column") or "images", cfg.get("label_column") or "labels",
                            with_labels=with_labels, limit=limit)
        if not os.path.exists(path):
            raise DataError(f"{path}: not found")
        raise DataError(f"{path}: expected a directory of class folders (root/<label>/<image>) or an .npz file")

    def fit_labels(self, records) -> list[str]:
        labels = sorted({r["label"] for r in records})
        require_two_classes(labels, records)
        try:
            labels = sorted(labels, key=float)
        except ValueError:
            pass
        self.labels = labels
        return labels

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> ImageDataset:
        if not isinstance(tokenizer, ImagePreprocessor):
            raise TypeError("image_classification: encode needs the task's ImagePreprocessor "
                            "(task.load_tokenizer(model)), not a text tokenizer")
        if with_labels and not self.labels:
            raise ValueError("labels are unknown: call fit_labels on the training records first")
        l2i = self.label2id
        feats = []
        for r in records:
            where = r["image_path"] if "image_path" in r else f"{r['_source']}[{r['_line']}]"
            pixels = load_image_file(r["image_path"]) if "image_path" in r else r["image"]
            try:
                f = {"pixel_values": tokenizer(pixels, where)}
            except ValueError as e:
                raise DataError(str(e)) from None
            if with_labels:
                if r["label"] not in l2i:
                    raise DataError(f"{where}: unknown label {r['label']!r}; the model knows {self.labels}")
                f["labels"] = l2i[r["label"]]
            feats.append(f)
        return ImageDataset(feats, records)

    def collator(self, tokenizer):
        return image_collator

    def num_examples(self, batch: dict) -> int:
        return len(batch["pixel_values"])

    # ---- metrics and predictions
    @torch.no_grad()
    def _predict(self, model, loader):
        preds, probs, loss_sum, n = [], [], 0.0, 0
        for batch, out in self.outputs(model, loader):
            p = out.logits.float().softmax(-1)
            preds += p.argmax(-1).tolist()
            probs += p.max(-1).values.tolist()
            if out.loss is not None:
                k = len(batch["pixel_values"])
                loss_sum += float(out.loss) * k
                n += k
        return preds, probs, (loss_sum / n if n else None)

    def evaluate(self, model, loader, dataset) -> dict:
        preds, _, loss = self._predict(model, loader)
        gold = [f["labels"] for f in dataset.features]
        return {"accuracy": M.accuracy(preds, gold),
                "macro_f1": M.macro_f1(preds, gold, classes=range(len(self.labels))), "loss": loss}

    def predict(self, model, loader, dataset) -> list[dict]:
        preds, probs, _ = self._predict(model, loader)
        out = []
        for r, p, q in zip(dataset.records, preds, probs):
            where = r["image_path"] if "image_path" in r else f"{r['_source']}[{r['_line']}]"
            out.append({"image": where, "prediction": self.labels[p], "probability": round(q, 4)})
        return out
