"""Geometric augmentation (labels follow the image) and the weak / strong photometric views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ircr.train.augment import geometric_augment, strong_view, weak_view


def labelled_crop(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric blocks; the image's red channel encodes the label (30 * id)."""
    labels = np.zeros((size, size), np.int32)
    labels[4:14, 6:20] = 1
    labels[20:40, 30:36] = 2
    labels[30:44, 2:10] = 3
    image = np.full((size, size, 3), 200, np.uint8)
    image[..., 0] = 30 * labels
    image[..., 1] = np.random.default_rng(0).integers(0, 256, (size, size))
    return image, labels


def test_geometric_augment_labels_follow_image():
    image, labels = labelled_crop()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        img, lab = geometric_augment(image, labels, rng)
        assert img.dtype == np.uint8 and lab.dtype == np.int32 and img.shape == image.shape
        np.testing.assert_array_equal(img[..., 0], 30 * lab)
        assert sorted(np.bincount(lab.ravel())) == sorted(np.bincount(labels.ravel()))
        seen.add(img[..., 1].tobytes())
    assert len(seen) == 8


def test_geometric_augment_is_reproducible():
    image, labels = labelled_crop()
    a = geometric_augment(image, labels, np.random.default_rng(5))
    b = geometric_augment(image, labels, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_geometric_augment_rejects_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        geometric_augment(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.int32), np.random.default_rng(0))


def batch(n: int = 4, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = 0.6 + 0.3 * torch.rand(n, 3, size, size, generator=gen)
    x[:, :, 10:18, 12:20] = torch.tensor([0.25, 0.1, 0.35])[:, None, None]
    return x


def test_views_shape_range_and_reproducible():
    x = batch()
    for view in (weak_view, lambda t, g: strong_view(t, g, 1.5)):
        a = view(x, torch.Generator().manual_seed(3))
        b = view(x, torch.Generator().manual_seed(3))
        c = view(x, torch.Generator().manual_seed(4))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_strong_view_changes_each_sample_differently():
    x = batch().expand(4, 3, 32, 32).clone()
    x[:] = x[0]
    out = strong_view(x, torch.Generator().manual_seed(0))
    assert float((out - x).abs().mean()) > 0.01
    assert float((out[0] - out[1]).abs().mean()) > 1e-3


def test_zero_strength_is_identity():
    x = batch()
    torch.testing.assert_close(strong_view(x, torch.Generator().manual_seed(0), 0.0), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(weak_view(x, torch.Generator().manual_seed(0), 0.0), x)


def test_views_keep_geometry():
    x = batch(8)
    for out in (weak_view(x, torch.Generator().manual_seed(1)), strong_view(x, torch.Generator().manual_seed(1), 2.0)):
        grey = out.mean(dim=1)
        inside = grey[:, 12:16, 14:18].mean(dim=(1, 2))
        outside = torch.cat([grey[:, :, :6].flatten(1), grey[:, :, 26:].flatten(1)], dim=1).mean(dim=1)
        assert bool((inside < outside - 0.1).all())
        darkest = grey.flatten(1).argmin(dim=1)
        rows, cols = darkest // 32, darkest % 32
        assert bool(((rows >= 9) & (rows < 19) & (cols >= 11) & (cols < 21)).all())


def test_views_reject_bad_input():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        strong_view(torch.zeros(3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="strength"):
        strong_view(torch.zeros(1, 3, 8, 8), torch.Generator(), -1.0)
