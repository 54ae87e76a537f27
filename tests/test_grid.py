"""TileGrid geometry: cores partition the image, reads line up with one whole-image read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthetic_slides import synthetic_he
from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.reader import ArrayReader, read_at_mpp
from wsi_ircr.slide.tissue import TissueMask


def test_shape_and_counts():
    g = TileGrid((1001, 650), slide_mpp=0.5, mpp=0.25, core_px=256, halo_px=32)
    assert g.scale == 0.5 and g.shape_rc == (1300, 2002)
    assert (g.n_rows, g.n_cols, g.n_tiles, g.tile_px) == (6, 8, 48, 320)
    assert g.core_box_rc((5, 7)) == (1280, 1792, 1300, 2002)
    assert g.read_origin_rc((0, 0)) == (-32, -32)
    assert g.origin_xy((1, 2)) == ((2 * 256 - 32) * 0.5, (256 - 32) * 0.5)
    assert len(g.all_tiles()) == 48 and g.all_tiles()[:2] == [(0, 0), (0, 1)]
    with pytest.raises(ValueError, match="outside"):
        g.core_box_rc((6, 0))


@pytest.mark.parametrize(
    ("dims_xy", "slide_mpp", "mpp", "core", "halo"),
    [((300, 210), 0.5, 0.5, 64, 8), ((301, 209), 0.25, 0.5, 50, 0), ((97, 131), 0.5, 0.3, 40, 13), ((20, 12), 0.5, 0.5, 64, 16)],
)
def test_cores_partition_the_image(dims_xy, slide_mpp, mpp, core, halo):
    g = TileGrid(dims_xy, slide_mpp, mpp, core, halo)
    count = np.zeros(g.shape_rc, np.int32)
    for t in g.all_tiles():
        r0, c0, r1, c1 = g.core_box_rc(t)
        assert r1 > r0 and c1 > c0
        count[r0:r1, c0:c1] += 1
        assert g.read_origin_rc(t) == (r0 - halo, c0 - halo)
    assert (count == 1).all()


def test_slide_smaller_than_one_tile():
    g = TileGrid((20, 12), 0.5, 0.5, 512, 32)
    assert g.all_tiles() == [(0, 0)] and g.core_box_rc((0, 0)) == (0, 0, 12, 20)


@pytest.mark.parametrize(("slide_mpp", "mpp", "atol"), [(0.5, 0.5, 0), (0.5, 0.25, 0), (0.25, 0.5, 0), (0.5, 0.37, 1)])
def test_tile_reads_equal_crops_of_one_whole_read(slide_mpp, mpp, atol):
    image = synthetic_he((150, 190), 15, seed=2)[0]
    reader = ArrayReader(image, mpp=slide_mpp, n_levels=2)
    g = TileGrid(reader.dimensions_xy, slide_mpp, mpp, core_px=48, halo_px=10)
    h, w = g.shape_rc
    pad = g.halo_px + g.core_px
    whole = read_at_mpp(reader, (-g.halo_px * g.scale, -g.halo_px * g.scale), (h + 2 * pad, w + 2 * pad), mpp)
    for t in g.all_tiles():
        tile = read_at_mpp(reader, g.origin_xy(t), (g.tile_px, g.tile_px), mpp)
        r, c = np.array(g.read_origin_rc(t)) + g.halo_px
        crop = whole[r : r + g.tile_px, c : c + g.tile_px]
        assert np.abs(tile.astype(int) - crop).max() <= atol


def test_coordinate_transforms():
    g = TileGrid((1000, 800), slide_mpp=0.5, mpp=0.25, core_px=100, halo_px=20)
    pts = np.array([[0.0, 0.0], [10.0, 4.0], [3.5, 7.25]])
    np.testing.assert_allclose(g.target_to_level0_xy(pts), [[0, 0], [2, 5], [3.625, 1.75]])
    tile_origin_rc = np.add(g.read_origin_rc((1, 2)), [20.0, 20.0])  # a point inside tile (1, 2)
    np.testing.assert_allclose(g.target_to_level0_xy(tile_origin_rc[None]), [[100.0, 50.0]])
    assert g.target_to_level0_xy(np.zeros((3, 4, 2))).shape == (3, 4, 2)


def _tissue_tiles_brute_force(g: TileGrid, mask: TissueMask) -> list[tuple[int, int]]:
    """A tile keeps tissue if any tissue mask pixel's micron box overlaps its core's micron box."""
    rows, cols = np.nonzero(mask.mask)
    out = []
    for t in g.all_tiles():
        r0, c0, r1, c1 = (v * g.mpp for v in g.core_box_rc(t))
        hit = (rows * mask.mpp < r1) & ((rows + 1) * mask.mpp > r0) & (cols * mask.mpp < c1) & ((cols + 1) * mask.mpp > c0)
        if hit.any():
            out.append(t)
    return out


@pytest.mark.parametrize(("mask_mpp", "core"), [(8.0, 64), (6.0, 50), (2.0, 30)])
def test_tissue_tiles_match_brute_force(mask_mpp, core):
    g = TileGrid((1500, 1100), slide_mpp=0.5, mpp=0.5, core_px=core, halo_px=8)
    rng = np.random.default_rng(int(mask_mpp))
    shape = (round(1100 * 0.5 / mask_mpp), round(1500 * 0.5 / mask_mpp))
    mask = TissueMask(rng.random(shape) < 0.02, mask_mpp)
    kept = g.tissue_tiles(mask)
    assert kept == _tissue_tiles_brute_force(g, mask)
    assert 0 < len(kept) < g.n_tiles
    assert g.tissue_tiles(TissueMask(np.zeros(shape, bool), mask_mpp)) == []
    assert g.tissue_tiles(TissueMask(np.ones(shape, bool), mask_mpp)) == g.all_tiles()


def test_check_halo_message():
    g = TileGrid((100, 100), 0.25, 0.25, core_px=64, halo_px=8)
    with pytest.raises(UserError, match=r"^halo_px=8 is smaller than the largest nucleus \(40 px at 0.25 mpp\); use --halo 48 or more$"):
        g.check_halo(40)
    TileGrid((100, 100), 0.25, 0.25, core_px=64, halo_px=40).check_halo(40)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"core_px": 0}, "core_px=0 must be a positive"),
        ({"halo_px": -1}, "halo_px=-1 must be zero or a positive"),
        ({"mpp": 0.0}, "mpp=0.0 must be a positive"),
        ({"slide_dimensions_xy": (0, 5)}, "slide_dimensions_xy"),
    ],
)
def test_validation(kwargs, message):
    args = {"slide_dimensions_xy": (10, 10), "slide_mpp": 0.5, "mpp": 0.5, "core_px": 8, "halo_px": 2} | kwargs
    with pytest.raises(UserError, match=message):
        TileGrid(**args)


def test_dict_round_trip():
    g = TileGrid((1001, 650), slide_mpp=0.499, mpp=0.25, core_px=256, halo_px=32)
    assert TileGrid.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(UserError, match="unknown key 'tile'"):
        TileGrid.from_dict(g.to_dict() | {"tile": 3})
    with pytest.raises(UserError, match="missing key 'halo_px'"):
        TileGrid.from_dict({k: v for k, v in g.to_dict().items() if k != "halo_px"})
