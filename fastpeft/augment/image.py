"""Image / tensor augmentation on NCHW batches without torchvision: random crop with padding, horizontal
flip, Gaussian noise, cutout. Vectorised over the batch (one random draw per example), seedable, usable
standalone (``op(x)``) or as a Trainer callback on ``batch[key]`` (default ``"pixel_values"``).

===================================  ======================================================================
operation (config name)              plain PyTorch for one example ``x`` [C, H, W]
===================================  ======================================================================
``RandomCrop(padding, size)``        ``xp = F.pad(x, (padding,)*4, mode)``; ``i ~ U{0..Hp-h}``,
(``random_crop``)                    ``j ~ U{0..Wp-w}``; ``x = xp[:, i:i+h, j:j+w]`` (``size`` default H, W)
``HorizontalFlip()``                 ``x = x.flip(-1)``
(``horizontal_flip``)
``GaussianNoise(std, clip)``         ``x = x + std * torch.randn_like(x)`` (then ``clamp(*clip)``)
(``gaussian_noise``)
``Cutout(size, holes, fill)``        for each hole: centre ``(cy, cx)`` uniform over the image,
(``cutout``)                         ``x[:, cy-s//2 : cy-s//2+s, cx-s//2 : cx-s//2+s] = fill`` (clipped at the
                                     border, DeVries & Taylor 2017)
===================================  ======================================================================

Every op applies to each example with probability ``p`` (``RandomCrop`` default 1, the others 0.5).
Labels are untouched (all four are label-preserving for classification). :class:`ImageAugment` chains
ops with one generator. Randomness: an op's (or the chain's) own ``torch.Generator`` re-seeded per batch
from ``(seed, batch counter)``, like the text ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ImageOp", "RandomCrop", "HorizontalFlip", "GaussianNoise", "Cutout", "ImageAugment", "IMAGE_OPS"]

PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _prob(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _nonneg_int(name, value, minimum=0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_nchw(x, key="x") -> None:
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"{key}: expected an NCHW tensor [B, C, H, W], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"{key}: expected a floating-point image tensor, got {x.dtype}")


class ImageOp:
    """Base: ``p``, ``seed``, ``key``; ``transform(x, generator) -> x`` is the op itself."""

    name = "image_op"

    def __init__(self, *, p: float = 0.5, seed: int = 0, key: str = "pixel_values"):
        self.p = _prob("p", p)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key: expected the batch key of the images (a string), got {key!r}")
        self.seed, self.key = seed, key
        self.generator = torch.Generator()
        self._calls = 0

    def _rows(self, B: int, g: torch.Generator, device) -> torch.Tensor:
        return (torch.rand(B, generator=g) < self.p).to(device)

    def transform(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _reseed(self) -> torch.Generator:
        self.generator.manual_seed((self.seed * 1_000_003 + self._calls) % (2 ** 63))
        self._calls += 1
        return self.generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x)
        return self.transform(x, self._reseed())

    def on_train_begin(self, trainer) -> None:
        step = getattr(getattr(trainer, "state", None), "step", 0)
        accum = getattr(getattr(trainer, "config", None), "grad_accum", 1) or 1
        self._calls = int(step) * int(accum)

    def on_batch(self, trainer, batch: dict) -> dict:
        if self.key not in batch:
            raise ValueError(f"key: the batch has no {self.key!r} (keys: {sorted(batch)}); set key= to the "
                             f"images' batch key")
        _check_nchw(batch[self.key], f"batch[{self.key!r}]")
        out = dict(batch)
        out[self.key] = self.transform(batch[self.key], self._reseed())
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, seed={self.seed})"


class RandomCrop(ImageOp):
    """Pad by ``padding`` on every side (``padding_mode``: constant (with ``fill``) | reflect | replicate
    | circular), then crop a random ``size`` window (default: the input's H, W)."""

    name = "random_crop"

    def __init__(self, padding: int = 4, size: int | tuple | None = None, *, padding_mode: str = "constant",
                 fill: float = 0.0, p: float = 1.0, **kw):
        super().__init__(p=p, **kw)
        self.padding = _nonneg_int("padding", padding)
        if size is not None:
            size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
            if len(size) != 2:
                raise ValueError(f"size: expected an int or (height, width), got {size!r}")
            for s in size:
                _nonneg_int("size", s, 1)
        self.size = size
        if padding_mode not in PAD_MODES:
            raise ValueError(f"padding_mode: expected one of {PAD_MODES}, got {padding_mode!r}")
        self.padding_mode, self.fill = padding_mode, float(fill)

    def transform(self, x, g):
        B, C, H, W = x.shape
        h, w = self.size or (H, W)
        P = self.padding
        if h > H + 2 * P or w > W + 2 * P:
            raise ValueError(f"size: crop {h}x{w} is larger than the padded image {H + 2 * P}x{W + 2 * P}")
        if B == 0:
            return x.new_empty(0, C, h, w)
        if P:
            kw = {"value": self.fill} if self.padding_mode == "constant" else {}
            xp = F.pad(x, (P, P, P, P), mode=self.padding_mode, **kw)
        else:
            xp = x
        Hp, Wp = xp.shape[-2:]
        oy = (torch.rand(B, generator=g) * (Hp - h + 1)).long().clamp(max=Hp - h)
        ox = (torch.rand(B, generator=g) * (Wp - w + 1)).long().clamp(max=Wp - w)
        rows = self._rows(B, g, "cpu")
        # examples not selected: the centred window (the original image when size == (H, W))
        oy = torch.where(rows, oy, torch.full_like(oy, (Hp - h) // 2))
        ox = torch.where(rows, ox, torch.full_like(ox, (Wp - w) // 2))
        dev = x.device
        r = (oy[:, None] + torch.arange(h)).to(dev)            # [B, h]
        c = (ox[:, None] + torch.arange(w)).to(dev)            # [B, w]
        b = torch.arange(B, device=dev)[:, None, None, None]
        ch = torch.arange(C, device=dev)[None, :, None, None]
        return xp[b, ch, r[:, None, :, None], c[:, None, None, :]]


class HorizontalFlip(ImageOp):
    """Mirror left-right (``x.flip(-1)``) with probability ``p``."""

    name = "horizontal_flip"

    def transform(self, x, g):
        rows = self._rows(x.shape[0], g, x.device)
        return torch.where(rows[:, None, None, None], x.flip(-1), x)


class GaussianNoise(ImageOp):
    """``x + std * N(0, 1)`` with probability ``p``; ``clip=(lo, hi)`` clamps the result."""

    name = "gaussian_noise"

    def __init__(self, std: float = 0.1, *, clip: tuple | None = None, p: float = 0.5, **kw):
        super().__init__(p=p, **kw)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
            raise ValueError(f"std: expected a number >= 0, got {std!r}")
        if clip is not None and (len(clip) != 2 or not clip[0] <= clip[1]):
            raise ValueError(f"clip: expected (low, high) with low <= high, got {clip!r}")
        self.std, self.clip = float(std), clip

    def transform(self, x, g):
        rows = self._rows(x.shape[0], g, x.device)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        out = torch.where(rows[:, None, None, None], x + self.std * noise, x)
        return out.clamp(*self.clip) if self.clip is not None else out


class Cutout(ImageOp):
    """Fill ``holes`` squares of side ``size`` (centres uniform over the image, clipped at the border)
    with ``fill``, on all channels, with probability ``p``."""

    name = "cutout"

    def __init__(self, size: int = 8, *, holes: int = 1, fill: float = 0.0, p: float = 0.5, **kw):
        super().__init__(p=p, **kw)
        self.size = _nonneg_int("size", size, 1)
        self.holes = _nonneg_int("holes", holes, 1)
        self.fill = float(fill)

    def transform(self, x, g):
        B, C, H, W = x.shape
        rows = self._rows(B, g, "cpu")
        cy = (torch.rand(B, self.holes, generator=g) * H).long().clamp(max=H - 1)
        cx = (torch.rand(B, self.holes, generator=g) * W).long().clamp(max=W - 1)
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        yy = torch.arange(H)[None, None, :]
        xx = torch.arange(W)[None, None, :]
        in_y = (yy >= y0[..., None]) & (yy < y0[..., None] + self.size)     # [B, holes, H]
        in_x = (xx >= x0[..., None]) & (xx < x0[..., None] + self.size)     # [B, holes, W]
        hole = (in_y[..., :, None] & in_x[..., None, :]).any(1) & rows[:, None, None]   # [B, H, W]
        return x.masked_fill(hole[:, None].to(x.device), self.fill)


class ImageAugment(ImageOp):
    """Apply ``ops`` in order with one generator (the ops' own ``seed`` is ignored)."""

    name = "image_augment"

    def __init__(self, ops, *, seed: int = 0, key: str = "pixel_values"):
        super().__init__(p=1.0, seed=seed, key=key)
        ops = list(ops)
        for i, op in enumerate(ops):
            if not isinstance(op, ImageOp):
                raise ValueError(f"ops[{i}]: expected an image op (RandomCrop, HorizontalFlip, GaussianNoise, "
                                 f"Cutout), got {type(op).__name__}")
        self.ops = ops

    def transform(self, x, g):
        for op in self.ops:
            x = op.transform(x, g)
        return x

    def __repr__(self) -> str:
        return f"ImageAugment({self.ops!r}, seed={self.seed})"


IMAGE_OPS = {c.name: c for c in (RandomCrop, HorizontalFlip, GaussianNoise, Cutout)}
