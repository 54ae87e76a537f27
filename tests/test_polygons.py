"""Instance outlines: pixel-edge coordinates, validity on nasty shapes, level-0 mapping."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import Point

from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.polygons import instance_polygons, mask_polygon, to_level0


def _disc(shape, centre_rc, radius, stretch=1.0):
    yy, xx = np.indices(shape)
    return ((yy - centre_rc[0]) / radius) ** 2 + ((xx - centre_rc[1]) / (radius * stretch)) ** 2 <= 1


def _check(polygon):
    assert polygon is not None and polygon.is_valid and not polygon.is_empty
    assert polygon.area > 0 and len(polygon.interiors) == 0
    assert polygon.exterior.is_ccw


def test_single_pixel_sits_in_its_unit_square():
    labels = np.zeros((4, 5), np.int32)
    labels[2, 3] = 7
    [(label, polygon)] = instance_polygons(labels, offset_rc=(10, 20))
    assert label == 7
    _check(polygon)
    assert polygon.bounds == (23.0, 12.0, 24.0, 13.0)
    assert polygon.centroid.equals_exact(Point(23.5, 12.5), 1e-12)


@pytest.mark.parametrize("radius,stretch", [(2.5, 1.0), (4, 1.7), (7, 1.0), (11, 1.3)])
def test_area_matches_pixel_count(radius, stretch):
    mask = _disc((40, 48), (19.3, 22.6), radius, stretch)
    polygon = mask_polygon(mask)
    _check(polygon)
    # marching squares at 0.5 cuts each convex corner by 1/8 px^2: N - 0.5 for a simple blob
    assert abs(polygon.area - mask.sum()) <= 1.0
    rows, cols = np.nonzero(mask)
    assert polygon.bounds == (cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0)
    centre_xy = np.array([polygon.centroid.x, polygon.centroid.y])
    np.testing.assert_allclose(centre_xy, [cols.mean() + 0.5, rows.mean() + 0.5], atol=0.05)


def _nasty_shapes():
    shapes = {}
    m = np.zeros((12, 12), bool)
    m[5, 1:11] = True
    shapes["horizontal line"] = m
    shapes["vertical line"] = m.T.copy()
    shapes["diagonal line"] = np.eye(12, dtype=bool)
    shapes["anti-diagonal line"] = np.eye(12, dtype=bool)[::-1].copy()
    shapes["checkerboard"] = np.indices((9, 9)).sum(0) % 2 == 0
    ring = _disc((21, 21), (10, 10), 9) & ~_disc((21, 21), (10, 10), 4)
    shapes["annulus"] = ring
    c = _disc((21, 21), (10, 10), 9) & ~_disc((21, 21), (10, 10), 5)
    c[8:13, 10:] = False
    shapes["C shape"] = c
    two = np.zeros((10, 20), bool)
    two[1:4, 1:4] = True
    two[2:8, 10:18] = True
    shapes["two pieces"] = two
    shapes["bowtie"] = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    shapes["full array"] = np.ones((5, 7), bool)
    return shapes


@pytest.mark.parametrize("name", list(_nasty_shapes()))
def test_nasty_shapes_give_valid_polygons(name):
    mask = _nasty_shapes()[name]
    polygon = mask_polygon(mask, offset_rc=(100, 200))
    _check(polygon)
    rows, cols = np.nonzero(mask)
    minx, miny, maxx, maxy = polygon.bounds
    # the outline never leaves the pixels it outlines
    assert minx >= cols.min() + 200 and miny >= rows.min() + 100
    assert maxx <= cols.max() + 201 and maxy <= rows.max() + 101


def test_holes_are_filled_and_largest_piece_kept():
    shapes = _nasty_shapes()
    annulus = mask_polygon(shapes["annulus"])
    assert annulus.area > shapes["annulus"].sum() + 30
    two = mask_polygon(shapes["two pieces"])
    assert two.bounds == (10.0, 2.0, 18.0, 8.0)


def test_instance_polygons_on_touching_instances():
    labels = np.zeros((20, 30), np.int32)
    labels[2:10, 2:12] = 1
    labels[2:10, 12:20] = 2
    labels[10:18, 5:15] = 3
    labels[15, 25] = 5
    result = instance_polygons(labels)
    assert [label for label, _ in result] == [1, 2, 3, 5]
    for label, polygon in result:
        _check(polygon)
        assert abs(polygon.area - (labels == label).sum()) <= 0.5
    polygons = dict(result)
    # neighbours share at most a thin sliver at cut corners
    assert polygons[1].intersection(polygons[2]).area < 0.5


def test_empty_mask():
    assert mask_polygon(np.zeros((3, 3), bool)) is None
    assert instance_polygons(np.zeros((3, 3), np.int32)) == []


def _rasterise(polygon, shape_rc):
    yy, xx = np.indices(shape_rc)
    return shapely.contains_xy(polygon, xx + 0.5, yy + 0.5)


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_to_level0_lands_on_the_right_pixels(scale):
    """Target mpp / slide mpp = scale: target pixel (r, c) covers level-0 [c*s, (c+1)*s)."""
    target = np.zeros((32, 32), bool)
    target[3:7, 5:10] = True
    polygon = to_level0(mask_polygon(target), (scale, (0.0, 0.0)))
    _check(polygon)
    assert polygon.bounds == (5 * scale, 3 * scale, 10 * scale, 7 * scale)
    assert polygon.centroid.equals_exact(Point(7.5 * scale, 5 * scale), 1e-9)
    level0_shape = (int(32 * scale), int(32 * scale))
    if scale >= 1:
        expected = np.kron(target, np.ones((int(scale), int(scale)), bool))
    else:
        expected = target[::2, ::2] & target[1::2, 1::2]
    drawn = _rasterise(polygon, level0_shape)
    iou = (drawn & expected).sum() / (drawn | expected).sum()
    assert iou > 0.8


@pytest.mark.parametrize("mpp,slide_mpp", [(0.5, 0.25), (0.25, 0.5)])
def test_to_level0_with_grid_matches_tuple(mpp, slide_mpp):
    grid = TileGrid((1000, 800), slide_mpp, mpp, core_px=64, halo_px=16)
    target = np.zeros((12, 12), bool)
    target[2:5, 6:11] = True
    polygon = mask_polygon(target, offset_rc=(30, 40))
    on_grid = to_level0(polygon, grid)
    assert on_grid.equals_exact(to_level0(polygon, (mpp / slide_mpp, (0.0, 0.0))), 1e-9)
    s = mpp / slide_mpp
    assert on_grid.bounds == (46 * s, 32 * s, 51 * s, 35 * s)


def test_to_level0_offset():
    polygon = mask_polygon(np.ones((2, 2), bool))
    moved = to_level0(polygon, (2.0, (100.0, 50.0)))
    assert moved.bounds == (100.0, 50.0, 104.0, 54.0)
