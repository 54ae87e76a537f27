"""Tissue detection on synthetic and real slides."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from synthetic_slides import synthetic_he, tissue_region
from wsi_ircr.slide.reader import ArrayReader, open_slide
from wsi_ircr.slide.tissue import TissueMask, detect_tissue, full_mask


def _glass(shape_rc, grey: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = grey + rng.normal(0, 4, (*shape_rc, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _block_fraction(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return mask[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def test_synthetic_tissue_blob_is_found():
    image, labels = synthetic_he((512, 768), 60, seed=3, tissue_fraction=0.5)
    reader = ArrayReader(image, mpp=2.0, n_levels=2)
    tm = detect_tissue(reader, mask_mpp=8.0, dilation_um=0.0)
    assert tm.mask.shape == (128, 192) and tm.mpp == 8.0
    truth = _block_fraction(tissue_region((512, 768), seed=3, fraction=0.5), 4) > 0.5
    iou = (tm.mask & truth).sum() / (tm.mask | truth).sum()
    assert iou > 0.9
    centroids = np.array(ndimage.center_of_mass(labels > 0, labels, range(1, labels.max() + 1)))
    assert tm.mask[(centroids[:, 0] // 4).astype(int), (centroids[:, 1] // 4).astype(int)].all()
    assert tm.area_mm2 == pytest.approx(tm.mask.sum() * 0.008**2)
    dilated = detect_tissue(reader, mask_mpp=8.0, dilation_um=40.0)
    assert dilated.mask.sum() > tm.mask.sum() and (dilated.mask >= tm.mask).all()


@pytest.mark.parametrize("grey", [245, 200])
def test_blank_glass_is_all_false(grey):
    reader = ArrayReader(_glass((256, 320), grey, seed=grey), mpp=1.0)
    tm = detect_tissue(reader, mask_mpp=8.0)
    assert tm.mask.shape == (32, 40) and not tm.mask.any()
    assert tm.area_mm2 == 0.0


def test_specks_removed_and_holes_filled():
    image = _glass((400, 400), 240, seed=0)
    rr, cc = np.mgrid[0:400, 0:400]
    blob = np.hypot(rr - 200, cc - 200) < 120
    hole = np.hypot(rr - 200, cc - 200) < 12
    speck = (np.abs(rr - 30) < 3) & (np.abs(cc - 30) < 3)
    image[(blob & ~hole) | speck] = (220, 140, 190)
    tm = detect_tissue(ArrayReader(image, mpp=2.0), mask_mpp=4.0, dilation_um=0.0)
    assert tm.mask.shape == (200, 200)
    assert tm.mask[100, 100]  # hole centre: filled
    assert not tm.mask[15, 15]  # speck (6x6 level-0 px = 0.00014 mm^2): removed
    assert not tm.mask[2, 197] and tm.mask[100, 45]


def test_full_mask_shape():
    reader = ArrayReader(np.zeros((100, 130, 3), np.uint8), mpp=0.5)
    tm = full_mask(reader, mask_mpp=4.0)
    assert tm.mask.shape == (13, 16) and tm.mask.all() and tm.fraction == 1.0


def test_tissue_mask_validates():
    with pytest.raises(ValueError, match="bool"):
        TissueMask(np.zeros((3, 3), np.uint8), 8.0)


@pytest.mark.openslide
@pytest.mark.shared
def test_real_slide_fraction_is_plausible(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as reader:
        tm = detect_tissue(reader)
    assert tm.mask.shape == (185, 138)
    assert 0.2 < tm.fraction < 0.98
    assert not tm.mask[:20, :40].any()  # top-left corner of this slide is glass
