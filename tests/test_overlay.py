"""Overlay PNGs: outlines land where the polygons are, files are valid PNGs, crop choice."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

from wsi_ircr.slide.overlay import (
    CROP_NUCLEUS_COLOR,
    GAP_PX,
    NUCLEUS_COLOR,
    TISSUE_COLOR,
    WINDOW_COLOR,
    overlay_image,
    pick_crop_windows,
    polygons_in_window,
    render_mask_png,
    render_overlay,
)

GREY = (128, 128, 128)


def _is(pixel, color):
    return tuple(int(v) for v in pixel) == tuple(color)


def _thumbnail():
    return np.full((100, 120, 3), GREY, np.uint8)


def test_outlines_land_on_the_polygons():
    mask = np.zeros((50, 60), bool)  # half the thumbnail's resolution
    mask[5:45, 5:55] = True
    nucleus = box(40, 40, 80, 80)  # level-0; thumb_scale 0.5 -> thumbnail 20..40
    out = overlay_image(_thumbnail(), mask, [nucleus], thumb_scale=0.5)
    assert out.shape == (100, 120, 3) and out.dtype == np.uint8
    assert _is(out[20, 30], NUCLEUS_COLOR) and _is(out[30, 20], NUCLEUS_COLOR) and _is(out[40, 30], NUCLEUS_COLOR)
    assert _is(out[30, 30], GREY)  # inside the nucleus: not filled
    assert _is(out[10, 60], TISSUE_COLOR) and _is(out[60, 10], TISSUE_COLOR)  # mask edge x2
    assert _is(out[50, 60], GREY) and _is(out[2, 2], GREY)
    tiny = overlay_image(_thumbnail(), None, [box(200, 100, 201, 101)], thumb_scale=0.5)
    assert _is(tiny[50, 100], NUCLEUS_COLOR)


def test_crops_go_below_with_their_outlines():
    crops = [(np.full((30, 40, 3), 200, np.uint8), [box(5, 5, 15, 20)]),
             (np.full((20, 100, 3), 50, np.uint8), [])]
    out = overlay_image(_thumbnail(), None, [], 0.5, crops=crops, windows_xy=[(20, 20, 100, 100)])
    assert out.shape == (100 + GAP_PX + 30, 40 + GAP_PX + 100, 3)
    top = 100 + GAP_PX
    assert _is(out[top + 5, 10], CROP_NUCLEUS_COLOR) and _is(out[top + 12, 5], CROP_NUCLEUS_COLOR)
    assert _is(out[top + 12, 10], (200, 200, 200))
    assert _is(out[top + 10, 40 + GAP_PX + 50], (50, 50, 50))
    assert _is(out[top + 25, 40 + GAP_PX + 50], (255, 255, 255))  # padding under the short crop
    assert _is(out[10, 30], WINDOW_COLOR)  # crop window drawn on the thumbnail


def test_render_overlay_writes_a_valid_png(tmp_path):
    path = render_overlay(tmp_path / "overlay.png", _thumbnail(), None, (p for p in [box(40, 40, 80, 80)]), 0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (120, 100) and _is(np.asarray(image)[20, 30], NUCLEUS_COLOR)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]


def test_render_mask_png(tmp_path):
    mask = np.zeros((7, 9), bool)
    mask[2:4, 3:8] = True
    path = render_mask_png(mask, tmp_path / "sub" / "mask.png")
    with Image.open(path) as image:
        assert image.mode == "L"
        assert np.array_equal(np.asarray(image), np.where(mask, 255, 0))


def test_pick_crop_windows_prefers_dense_regions():
    rng = np.random.default_rng(0)
    dense = rng.normal([3000, 2000], 60, (400, 2))
    medium = rng.normal([800, 4000], 60, (150, 2))
    sparse = rng.uniform(0, 5000, (100, 2))
    windows = pick_crop_windows(np.concatenate([sparse, dense, medium]), 512, 3, (5000, 6000))
    assert len(windows) == 3
    (x0, y0, x1, y1), (a0, b0, a1, b1) = windows[:2]
    assert x0 <= 3000 < x1 and y0 <= 2000 < y1
    assert a0 <= 800 < a1 and b0 <= 4000 < b1
    for i, w in enumerate(windows):
        assert w[2] - w[0] == w[3] - w[1] == 512
        assert 0 <= w[0] and 0 <= w[1] and w[2] <= 5000 and w[3] <= 6000
        for v in windows[i + 1:]:
            assert box(*w).intersection(box(*v)).area == 0


@pytest.mark.parametrize("dims", [(600, 400), (300, 200)])
def test_pick_crop_windows_edges(dims):
    assert pick_crop_windows(np.zeros((0, 2)), 256, 3, dims) == []
    pts = np.array([[dims[0] - 1.0, dims[1] - 1.0]] * 5)
    [(x0, y0, x1, y1)] = pick_crop_windows(pts, 256, 3, dims)
    assert x1 == dims[0] and y1 == dims[1] and x1 - x0 == y1 - y0 == min(256, *dims)


def test_polygons_in_window():
    polygons = [box(100, 100, 110, 110), box(500, 500, 510, 510), box(195, 150, 205, 160)]
    inside = polygons_in_window(polygons, (90, 90, 200, 200), px_per_level0=0.5)
    assert [p.bounds for p in inside] == [(5.0, 5.0, 10.0, 10.0), (52.5, 30.0, 57.5, 35.0)]
