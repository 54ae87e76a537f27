"""The watershed post-processing's own fill-holes and 3x3 opening: the same masks as scipy's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_ircr.model.postprocess import fill_holes, open_3x3


def masks(seed: int):
    """Random bool masks: speckle of any density, and smooth blobs with holes and thin parts."""
    rng = np.random.default_rng(seed)
    for shape in ((1, 1), (1, 7), (5, 1), (3, 3), (17, 29), (64, 48)):
        yield rng.random(shape) < rng.random()
    field = ndi.gaussian_filter(rng.standard_normal((160, 140)), 2.5)
    yield field > 0.05
    yield np.abs(field) > 0.1  # rings around holes
    yield np.ones((9, 12), bool)
    yield np.zeros((9, 12), bool)


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_is_scipys(seed):
    for mask in masks(seed):
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


@pytest.mark.parametrize("seed", range(6))
def test_open_3x3_is_scipys(seed):
    for mask in masks(seed):
        np.testing.assert_array_equal(open_3x3(mask), ndi.binary_opening(mask, structure=np.ones((3, 3), bool)))


def test_a_hole_is_filled_and_a_bay_is_not():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # a hole
    mask[4, 0:3] = False  # a bay open to the border
    filled = fill_holes(mask)
    assert filled[4, 4] and not filled[4, 1] and not filled[4, 0]
