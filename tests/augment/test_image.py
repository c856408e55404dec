"""Image ops on NCHW batches: shapes, exact values, probability p, seeding, errors."""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.augment import Cutout, GaussianNoise, HorizontalFlip, ImageAugment, RandomCrop


def _x(B=6, C=3, H=7, W=5):
    return torch.arange(B * C * H * W, dtype=torch.float32).reshape(B, C, H, W) + 1


def test_flip_exact():
    x = _x()
    assert torch.equal(HorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(HorizontalFlip(p=0.0)(x), x)
    y = HorizontalFlip(p=0.5, seed=1)(_x(B=64))
    xx = _x(B=64)
    flipped = [bool(torch.equal(y[i], xx[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(y[i], xx[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_window_of_the_padded_image(mode):
    x = _x()
    op = RandomCrop(padding=2, padding_mode=mode, fill=-1.0, seed=0)
    y = op(x)
    assert y.shape == x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode=mode, **({"value": -1.0} if mode == "constant" else {}))
    offsets = set()
    for i in range(x.shape[0]):
        hits = [(a, c) for a in range(5) for c in range(5) if torch.equal(xp[i, :, a:a + 7, c:c + 5], y[i])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 1                                    # random offsets per example
    assert torch.equal(RandomCrop(padding=0)(x), x)            # no padding, same size: identity
    small = RandomCrop(padding=0, size=(3, 4), seed=2)(x)
    assert small.shape == (6, 3, 3, 4)
    assert torch.equal(RandomCrop(padding=3, p=0.0)(x), x)     # not selected: centred window = original


def test_cutout_square_and_fill():
    x = torch.ones(8, 2, 12, 12)
    y = Cutout(size=4, p=1.0, fill=0.0, seed=0)(x)
    assert y.shape == x.shape
    for i in range(8):
        hole = y[i, 0] == 0
        assert torch.equal(hole, y[i, 1] == 0)                 # same hole on every channel
        rows, cols = hole.any(1).nonzero().squeeze(1), hole.any(0).nonzero().squeeze(1)
        assert int(hole.sum()) == len(rows) * len(cols)        # a (clipped) rectangle
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert rows.tolist() == list(range(rows[0], rows[-1] + 1))
    assert torch.equal(Cutout(size=4, p=0.0)(x), x)
    two = Cutout(size=3, holes=2, p=1.0, seed=1)(torch.ones(4, 1, 20, 20))
    assert bool(((two == 0).sum((1, 2, 3)) > 9).any())


def test_noise_statistics_and_clip():
    x = torch.zeros(16, 3, 32, 32)
    y = GaussianNoise(std=0.5, p=1.0, seed=0)(x)
    assert abs(float(y.std()) - 0.5) < 0.02 and abs(float(y.mean())) < 0.02
    z = GaussianNoise(std=0.5, p=1.0, clip=(0.0, 1.0), seed=0)(x)
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    assert torch.equal(GaussianNoise(std=0.5, p=0.0)(x), x)


def test_seeded_and_callback():
    x = torch.randn(5, 3, 9, 9)
    chain = lambda s: ImageAugment([RandomCrop(2), HorizontalFlip(), GaussianNoise(0.1), Cutout(3)], seed=s,
                                   key="images")
    a, b, c = chain(0), chain(0), chain(1)
    ya = [a.on_batch(None, {"images": x, "labels": torch.zeros(5)})["images"] for _ in range(2)]
    yb = [b.on_batch(None, {"images": x, "labels": torch.zeros(5)})["images"] for _ in range(2)]
    assert torch.equal(ya[0], yb[0]) and torch.equal(ya[1], yb[1]) and not torch.equal(ya[0], ya[1])
    assert not torch.equal(ya[0], c.on_batch(None, {"images": x})["images"])
    with pytest.raises(ValueError, match="^key: the batch has no 'images'"):
        a.on_batch(None, {"pixel_values": x})
    assert torch.equal(HorizontalFlip(p=1.0).on_batch(None, {"pixel_values": x})["pixel_values"], x.flip(-1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="^p:"):
        HorizontalFlip(p=-0.1)
    with pytest.raises(ValueError, match="^padding:"):
        RandomCrop(padding=-1)
    with pytest.raises(ValueError, match="^padding_mode:"):
        RandomCrop(padding_mode="wrap")
    with pytest.raises(ValueError, match="^size:"):
        Cutout(size=0)
    with pytest.raises(ValueError, match="^std:"):
        GaussianNoise(std=-1)
    with pytest.raises(ValueError, match="NCHW"):
        HorizontalFlip()(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        HorizontalFlip()(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="^size: crop"):
        RandomCrop(padding=0, size=10)(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="^ops\\[1\\]"):
        ImageAugment([HorizontalFlip(), "flip"])
