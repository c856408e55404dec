"""CNN bases for image classification: LeNet-5 (written here; torchvision has none) and torchvision's
ResNet / VGG / AlexNet, each as an :class:`ImageClassifier` = ``backbone`` (images -> features) +
``classifier`` (``nn.Linear``, the task head that fine-tuning trains in full), and the preprocessing that
turns an image array into the base's input.

A base is named by an architecture (``lenet5``, ``resnet18``, ``vgg11``, ``alexnet``, ...: random init) or by
a directory written by :func:`save_image_model` (``config.json`` with ``"arch"``, ``model.safetensors``):
a pretrained base.  Loading a directory keeps the backbone and the preprocessing; the classifier is kept
only when the new task has exactly the saved labels, else a fresh head sized for the new labels is made
(transfer learning).

torchvision is optional: only its architectures import it, lazily, and without it they fail with one line
naming what to install.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LENET_ARCHS = ("lenet5",)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13",
                     "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "alexnet")
ARCHS = LENET_ARCHS + TORCHVISION_ARCHS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageClassifierOutput:
    """What :class:`ImageClassifier` returns: ``logits`` [N, num_classes]; ``loss`` (mean cross-entropy) when
    labels were given, else None."""
    loss: Optional[torch.Tensor]
    logits: torch.Tensor

    def __getitem__(self, key):
        return getattr(self, key)


class LeNet5Backbone(nn.Module):
    """LeNet-5 (LeCun et al. 1998) up to its 84-unit layer: images [N, C, 32, 32] -> features [N, 84].

    ``conv1`` 5×5 C->6, pool 2, ``conv2`` 5×5 6->16 (all 6 input maps, not the paper's sparse table),
    pool 2, ``fc1`` 400->120 (the paper's C5), ``fc2`` 120->84 (F6).  ``activation`` "relu" (default) or
    "tanh" (the paper's), ``pool`` "max" (default) or "avg" (the paper's subsampling, without its trainable
    coefficients).  The paper's RBF output layer is the ``classifier`` of :class:`ImageClassifier`."""

    out_features = 84

    def __init__(self, in_channels: int = 1, activation: str = "relu", pool: str = "max"):
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"lenet5 activation: expected 'relu' or 'tanh', got {activation!r}")
        if pool not in ("max", "avg"):
            raise ValueError(f"lenet5 pool: expected 'max' or 'avg', got {pool!r}")
        self.activation, self.pool = activation, pool
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh
        pool = F.max_pool2d if self.pool == "max" else F.avg_pool2d
        x = pool(act(self.conv1(x)), 2)
        x = pool(act(self.conv2(x)), 2)
        x = act(self.fc1(x.flatten(1)))
        return act(self.fc2(x))


def _torchvision():
    try:
        import torchvision.models as tvm
    except Exception as e:  # not installed, or a build that does not match this torch
        raise ImportError(f"image_classification: torchvision bases (resnet / vgg / alexnet) need torchvision built "
                          f"for torch {torch.__version__}: pip install torchvision (the matching release); "
                          f"lenet5 needs nothing ({type(e).__name__}: {e})") from None
    return tvm


def _torchvision_backbone(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    """(backbone with its final classification layer replaced by Identity, feature size)."""
    tvm = _torchvision()
    net = getattr(tvm, arch)(weights=None)
    if arch.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
        first = "conv1"
    else:  # vgg*, alexnet: classifier = Sequential(..., Linear(4096, 1000))
        dim = net.classifier[-1].in_features
        net.classifier[-1] = nn.Identity()
        first = "features.0"
    if in_channels != 3:
        parent = net if "." not in first else net.get_submodule(first.rsplit(".", 1)[0])
        old = net.get_submodule(first)
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
        setattr(parent, first.rsplit(".", 1)[-1], new)
    return net, dim


def default_image_size(arch: str) -> int:
    return 32 if arch in LENET_ARCHS else 224


class ImageClassifier(nn.Module):
    """``backbone`` (images [N, C, S, S] -> features [N, D]) + ``classifier`` (``nn.Linear(D, num_classes)``).

    ``forward(pixel_values, labels=None)`` -> :class:`ImageClassifierOutput`; equivalent PyTorch:
    ``logits = classifier(backbone(pixel_values)); loss = F.cross_entropy(logits, labels)``.
    BatchNorm layers stay in eval mode while training (``frozen_batchnorm``, default): their running
    statistics are part of the frozen base and are not saved with an adapter."""

    def __init__(self, arch: str, num_classes: int, in_channels: int = 1, image_size: Optional[int] = None,
                 frozen_batchnorm: bool = True, **arch_kwargs):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model: unknown image architecture {arch!r}; expected one of {list(ARCHS)} or a "
                             f"directory written by save_image_model")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        self.arch, self.in_channels = arch, int(in_channels)
        self.image_size = int(image_size or default_image_size(arch))
        if arch in LENET_ARCHS and self.image_size != 32:
            raise ValueError(f"lenet5 takes 32x32 images (inputs are resized to it); got image_size={image_size}")
        self.arch_kwargs = dict(arch_kwargs)
        self.frozen_batchnorm = frozen_batchnorm
        if arch in LENET_ARCHS:
            self.backbone, dim = LeNet5Backbone(in_channels, **arch_kwargs), LeNet5Backbone.out_features
        else:
            if arch_kwargs:
                raise ValueError(f"{arch}: unexpected options {sorted(arch_kwargs)}")
            self.backbone, dim = _torchvision_backbone(arch, self.in_channels)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ImageClassifierOutput:
        logits = self.classifier(self.backbone(pixel_values))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss, logits)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_batchnorm:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def to_config(self, labels: Optional[Sequence[str]] = None) -> dict:
        return {"fastpeft_image_model": 1, "arch": self.arch, "num_classes": self.classifier.out_features,
                "labels": list(labels) if labels is not None else None, "in_channels": self.in_channels,
                "image_size": self.image_size, "arch_kwargs": self.arch_kwargs}


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of the backbone's ``nn.Conv2d`` (groups 1, dilation 1) and ``nn.Linear`` layers: LoRA's default
    targets (the head is trained in full instead)."""
    out = []
    for n, m in model.named_modules():
        if not n.startswith("backbone."):
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                        and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros"):
            out.append(n)
    return out


def adapter_sites(model: ImageClassifier) -> list[str]:
    """Where bottleneck adapters go by default: after every LeNet layer; after the last convolution of every
    ResNet block; after every convolution of VGG / AlexNet."""
    if model.arch in LENET_ARCHS:
        return ["backbone.conv1", "backbone.conv2", "backbone.fc1", "backbone.fc2"]
    names = [n for n, m in model.named_modules() if n.startswith("backbone.") and isinstance(m, nn.Conv2d)]
    if model.arch.startswith("resnet"):
        last = {}
        for n in names:
            parts = n.split(".")
            if len(parts) >= 4 and parts[1].startswith("layer") and parts[3].startswith("conv"):
                last[".".join(parts[:3])] = n
        return list(last.values())
    return names


# --------------------------------------------------------------------------- directories

def save_image_model(model: ImageClassifier, directory: str, labels: Optional[Sequence[str]] = None,
                     preprocess: Optional["ImagePreprocessor"] = None) -> str:
    """Write ``model`` as a base other runs can start from: ``config.json`` + ``model.safetensors``
    (atomically, the whole directory)."""
    from safetensors.torch import save_file

    from ...fileio import atomic_dir
    cfg = model.to_config(labels)
    if preprocess is not None:
        cfg.update(mean=list(preprocess.mean), std=list(preprocess.std))
    with atomic_dir(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=1)
    return directory


def read_image_config(name_or_path: str) -> dict:
    """The base's config: ``{"arch": name}`` for an architecture name, the saved ``config.json`` for a
    directory; errors name what is wrong."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected an image architecture {list(ARCHS)} or a directory, got {name_or_path!r}")
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"model: directory {name_or_path!r} has no {CONFIG_FILE}")
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
        if cfg.get("arch") not in ARCHS:
            raise ValueError(f"{path}: not an image model written by save_image_model (\"arch\" is "
                             f"{cfg.get('arch')!r}; expected one of {list(ARCHS)})")
        if not os.path.isfile(os.path.join(name_or_path, MODEL_FILE)):
            raise ValueError(f"model: directory {name_or_path!r} has no {MODEL_FILE}")
        return cfg
    if name_or_path.lower() in ARCHS:
        return {"arch": name_or_path.lower()}
    raise ValueError(f"model: {name_or_path!r} is neither an image architecture {list(ARCHS)} nor an existing "
                     f"directory (models are never downloaded)")


def load_image_model(name_or_path: str, labels: Sequence[str]) -> ImageClassifier:
    """An :class:`ImageClassifier` for ``labels``: for an architecture name a random init that is the same
    every time (seed 0, so an adapter trained on it reloads onto the same base); for a directory the saved
    weights (the saved head only when ``labels`` equal the saved ones). A new head is drawn from the global
    RNG."""
    cfg = read_image_config(name_or_path)
    with torch.random.fork_rng(devices=[]):  # the base's random init is fixed (seed 0): adapters reload onto it
        torch.manual_seed(0)
        model = ImageClassifier(cfg["arch"], len(labels), in_channels=cfg.get("in_channels", 1 if cfg["arch"] in
                                                                                 LENET_ARCHS else 3),
                                image_size=cfg.get("image_size"), **(cfg.get("arch_kwargs") or {}))
    model.classifier.reset_parameters()  # the new head: from the caller's RNG (the trainer's seed)
    if os.path.isdir(name_or_path):
        from safetensors.torch import load_file
        state = load_file(os.path.join(name_or_path, MODEL_FILE))
        keep_head = cfg.get("labels") is not None and list(cfg["labels"]) == list(labels)
        if not keep_head:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if keep_head or not k.startswith("classifier.")]
        if missing or unexpected:
            raise ValueError(f"model: {name_or_path}/{MODEL_FILE} does not match its config ({cfg['arch']}): "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# --------------------------------------------------------------------------- preprocessing

@dataclass
class ImagePreprocessor:
    """Image array -> the base's input ``[C, S, S]`` float32, in the "tokenizer" slot of the workflow.

    Accepts ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C in 1, 3, 4) arrays; uint8 is divided by 255, floats
    are taken as they are.  Channels: gray -> RGB by repetition, RGB -> gray by the mean, an alpha channel is
    dropped.  Size: bilinear resize to ``image_size`` (``F.interpolate(align_corners=False)``) when it
    differs.  Then ``(x - mean) / std`` per channel."""
    in_channels: int = 1
    image_size: int = 32
    mean: Sequence[float] = field(default_factory=lambda: (0.0,))
    std: Sequence[float] = field(default_factory=lambda: (1.0,))

    @classmethod
    def for_model(cls, name_or_path: str) -> "ImagePreprocessor":
        cfg = read_image_config(name_or_path)
        arch = cfg["arch"]
        ch = cfg.get("in_channels", 1 if arch in LENET_ARCHS else 3)
        size = cfg.get("image_size") or default_image_size(arch)
        mean = cfg.get("mean") or ((0.0,) * ch if arch in LENET_ARCHS or ch != 3 else IMAGENET_MEAN)
        std = cfg.get("std") or ((1.0,) * ch if arch in LENET_ARCHS or ch != 3 else IMAGENET_STD)
        return cls(ch, size, tuple(mean), tuple(std))

    def __call__(self, image, where: str = "<image>") -> torch.Tensor:
        x = torch.as_tensor(image)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64):
            x = x.float()
        else:
            raise ValueError(f"{where}: image dtype {x.dtype} not supported (uint8 or float)")
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif x.dim() == 3:
            if x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
                pass
            elif x.shape[-1] in (1, 3, 4):
                x = x.permute(2, 0, 1)
            else:
                raise ValueError(f"{where}: image of shape {tuple(x.shape)}: expected [H, W], [H, W, C] or "
                                 f"[C, H, W] with C in 1, 3, 4")
        else:
            raise ValueError(f"{where}: image of shape {tuple(x.shape)}: expected 2 or 3 dimensions")
        if not torch.isfinite(x).all():
            raise ValueError(f"{where}: image has NaN / inf values")
        if x.shape[0] == 4:
            x = x[:3]
        if x.shape[0] != self.in_channels:
            if self.in_channels == 3 and x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            elif self.in_channels == 1 and x.shape[0] == 3:
                x = x.mean(0, keepdim=True)
            else:
                raise ValueError(f"{where}: {x.shape[0]} channels; the base takes {self.in_channels}")
        if tuple(x.shape[1:]) != (self.image_size, self.image_size):
            x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False).squeeze(0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()
