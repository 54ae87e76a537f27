"""Stitching by local ownership: round-trip identity, exactly-once seams, order independence."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from skimage.measure import regionprops
from skimage.segmentation import expand_labels

from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.stitch import (
    TileInstances,
    assign_global_ids,
    owned_instances as owned_and_dropped,
    stitch_label_image,
    tile_instances,
)


def owned_instances(*args, **kwargs) -> np.ndarray:
    """The owned labels of :func:`owned_and_dropped` (the dropped count is checked apart)."""
    return owned_and_dropped(*args, **kwargs)[0]


def _grid(shape_rc, core_px, halo_px) -> TileGrid:
    return TileGrid((shape_rc[1], shape_rc[0]), 0.5, 0.5, core_px, halo_px)


def _ground_truth(shape_rc, max_extent_px, seed, ragged=True) -> np.ndarray:
    """Touching blobs (discs cut by Voronoi borders) no wider than ``max_extent_px``;
    ``ragged`` punches random holes (ragged outlines, instances in several pieces)."""
    rng = np.random.default_rng(seed)
    n = max(3, shape_rc[0] * shape_rc[1] // (max_extent_px * max_extent_px // 2 + 1))
    seeds = np.zeros(shape_rc, np.int32)
    seeds[rng.integers(0, shape_rc[0], n), rng.integers(0, shape_rc[1], n)] = rng.permutation(n) + 1
    gt = expand_labels(seeds, (max_extent_px - 1) // 2)
    if ragged:
        gt[rng.random(shape_rc) < 0.03] = 0
    return gt


def _cut(gt: np.ndarray, grid: TileGrid, tile, rng=None) -> np.ndarray:
    """The tile's read window of ``gt`` (0 outside), with tile-local labels scrambled."""
    pad = grid.tile_px
    padded = np.pad(gt, pad)
    r0, c0 = grid.read_origin_rc(tile)
    window = padded[r0 + pad:r0 + pad + grid.tile_px, c0 + pad:c0 + pad + grid.tile_px]
    if rng is None:
        return window.copy()
    lut = np.concatenate([[0], rng.permutation(int(gt.max())) + 1000]).astype(np.int64)
    return lut[window]


def _same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> None:
    assert np.array_equal(a > 0, b > 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


CASES = [  # (core_px, halo_px, image shape_rc)
    (32, 9, (75, 101)),
    (16, 7, (50, 33)),
    (40, 11, (40, 40)),
    (64, 9, (20, 30)),
    (20, 5, (61, 47)),
]


@pytest.mark.parametrize("core_px,halo_px,shape_rc", CASES)
def test_round_trip_identity(core_px, halo_px, shape_rc):
    gt = _ground_truth(shape_rc, halo_px, seed=core_px + halo_px)
    grid = _grid(shape_rc, core_px, halo_px)
    assert grid.shape_rc == shape_rc
    rng = np.random.default_rng(0)
    owned = {t: owned_instances(_cut(gt, grid, t, rng), grid, t) for t in grid.all_tiles()}
    stitched = stitch_label_image(grid, owned)
    _same_up_to_relabelling(gt, stitched)
    # exactly once: total owned count equals the number of ground-truth nuclei
    assert sum(int(m.max()) for m in owned.values()) == len(np.unique(gt[gt > 0]))
    assert np.array_equal(np.unique(stitched[stitched > 0]), np.arange(1, stitched.max() + 1))


def _split(gt: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    out = np.zeros_like(gt)
    next_id = 1
    for index, box in enumerate(ndi.find_objects(gt)):
        if box is None:
            continue
        parts, n = ndi.label(gt[box] == index + 1, structure=np.ones((3, 3)))
        out[box][parts > 0] = parts[parts > 0] + next_id - 1
        next_id += n
    return out


def test_nuclei_across_seams_come_out_once():
    core_px, halo_px, shape_rc = 32, 9, (75, 101)
    gt = _split(_ground_truth(shape_rc, halo_px, seed=3))
    grid = _grid(shape_rc, core_px, halo_px)
    seam_rows = np.arange(core_px, shape_rc[0], core_px)
    seam_cols = np.arange(core_px, shape_rc[1], core_px)
    straddling = set()
    for r in seam_rows:
        straddling |= set(np.unique(gt[r - 1][(gt[r - 1] > 0) & (gt[r - 1] != gt[r])])) & set(np.unique(gt[r]))
    for c in seam_cols:
        straddling |= set(np.unique(gt[:, c - 1])) & set(np.unique(gt[:, c]))
    straddling.discard(0)
    assert len(straddling) > 5
    stitched = stitch_label_image(grid, {t: owned_instances(_cut(gt, grid, t), grid, t) for t in grid.all_tiles()})
    for label in straddling:
        assert len(np.unique(stitched[gt == label])) == 1
        assert stitched[gt == label].min() > 0


def test_processing_order_does_not_change_the_result():
    core_px, halo_px, shape_rc = 20, 7, (57, 83)
    gt = _split(_ground_truth(shape_rc, halo_px, seed=11))
    grid = _grid(shape_rc, core_px, halo_px)
    tiles = grid.all_tiles()
    reference = stitch_label_image(grid, {t: owned_instances(_cut(gt, grid, t), grid, t) for t in tiles})
    rng = np.random.default_rng(5)
    for _ in range(3):
        shuffled = [tiles[i] for i in rng.permutation(len(tiles))]
        owned = {t: owned_instances(_cut(gt, grid, t), grid, t) for t in shuffled}
        assert np.array_equal(stitch_label_image(grid, owned), reference)


def test_local_order_is_by_centroid_and_independent_of_input_labels():
    grid = _grid((40, 40), 40, 4)
    gt = np.zeros((40, 40), np.int32)
    gt[20:24, 5:9] = 9
    gt[2:5, 30:33] = 4
    gt[2:5, 10:13] = 7
    window = _cut(gt, grid, (0, 0))
    owned = owned_instances(window, grid, (0, 0))
    assert owned[3 + 4, 11 + 4] == 1 and owned[3 + 4, 31 + 4] == 2 and owned[21 + 4, 6 + 4] == 3
    scrambled = owned_instances(_cut(gt, grid, (0, 0), np.random.default_rng(1)), grid, (0, 0))
    assert np.array_equal(owned, scrambled)


def test_instance_in_padding_is_owned_by_nobody():
    grid = _grid((30, 30), 16, 6)  # 2x2 tiles; the last ones reach 8 px past the image
    tile = (1, 1)
    window = np.zeros((grid.tile_px, grid.tile_px), np.int32)
    r0, c0 = grid.read_origin_rc(tile)  # 10, 10: image rows/cols 10..29 -> window 0..19
    window[22:26, 22:26] = 1  # wholly in the padding
    window[17:19, 17:24] = 2  # centroid col 20 -> image col 30: outside, dropped
    window[10:12, 16:22] = 3  # centroid col 18.5 -> image col 29: kept, cut to the image
    owned = owned_instances(window, grid, tile)
    assert owned.max() == 1
    assert np.array_equal(np.nonzero(owned)[0], np.repeat([10, 11], 4))
    assert (owned[:, 20:] == 0).all()


def test_halo_too_small_raises_with_a_fix():
    grid = _grid((64, 64), 32, 3)
    gt = np.zeros((64, 64), np.int32)
    gt[10:22, 26:38] = 1  # 12 px wide across the seam at col 32, halo 3
    with pytest.raises(UserError, match="halo too small.*12 px.*increase --halo"):
        for t in grid.all_tiles():
            owned_instances(_cut(gt, grid, t), grid, t)


def test_truncated_nuclei_can_be_dropped(caplog):
    grid = _grid((64, 64), 32, 3)
    gt = np.zeros((64, 64), np.int32)
    gt[10:22, 26:38] = 1
    gt[50:54, 50:54] = 2
    with caplog.at_level(logging.INFO):
        owned = {t: owned_instances(_cut(gt, grid, t), grid, t, on_truncated="drop") for t in grid.all_tiles()}
    stitched = stitch_label_image(grid, owned)
    assert (stitched[gt == 1] == 0).all() and (stitched[gt == 2] > 0).all()
    assert "cut by the tile edge" in caplog.text
    dropped = {t: owned_and_dropped(_cut(gt, grid, t), grid, t, on_truncated="drop")[1] for t in grid.all_tiles()}
    # each of the two tiles sees a cut piece whose centroid lies in its own core
    assert dropped == {(0, 0): 1, (0, 1): 1, (1, 0): 0, (1, 1): 0}


def test_nucleus_touching_the_image_border_is_not_truncated():
    grid = _grid((40, 40), 18, 4)  # tile row 1 reads image rows 14..39: its bottom edge is the image's
    gt = np.zeros((40, 40), np.int32)
    gt[33:40, 2:6] = 1  # reaches tile row 1's core and its bottom edge, yet nothing is cut
    owned = {t: owned_instances(_cut(gt, grid, t), grid, t) for t in grid.all_tiles()}
    _same_up_to_relabelling(gt, stitch_label_image(grid, owned))


def test_bad_tile_shape():
    grid = _grid((40, 40), 20, 4)
    with pytest.raises(ValueError, match="28, 28"):
        owned_instances(np.zeros((20, 20), np.int32), grid, (0, 0))


def test_assign_global_ids_is_a_row_major_prefix_sum():
    counts = {(1, 0): 4, (0, 1): 2, (0, 0): 3, (1, 1): 0}
    assert assign_global_ids(counts) == {(0, 0): 0, (0, 1): 3, (1, 0): 5, (1, 1): 9}
    assert assign_global_ids(counts, order=[(1, 1), (1, 0), (0, 1), (0, 0)]) == {
        (1, 1): 0, (1, 0): 0, (0, 1): 4, (0, 0): 6}
    assert assign_global_ids({}) == {}
    with pytest.raises(ValueError):
        assign_global_ids(counts, order=[(0, 0), (0, 1)])


def test_tile_instances_in_target_coordinates():
    core_px, halo_px, shape_rc = 24, 8, (50, 70)
    gt = _ground_truth(shape_rc, halo_px, seed=2, ragged=False)
    grid = _grid(shape_rc, core_px, halo_px)
    image = np.full(shape_rc + (3,), 200, np.uint8)
    image[gt > 0] = 60
    pad = grid.tile_px
    padded_image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    per_tile: dict = {}
    owned_maps = {}
    for t in grid.all_tiles():
        r0, c0 = grid.read_origin_rc(t)
        tile_image = padded_image[r0 + pad:r0 + pad + grid.tile_px, c0 + pad:c0 + pad + grid.tile_px]
        owned_maps[t] = owned_instances(_cut(gt, grid, t), grid, t)
        prob = np.full((grid.tile_px, grid.tile_px), 0.75)
        per_tile[t] = tile_instances(owned_maps[t], grid, t, image=tile_image, np_prob=prob)
    stitched = stitch_label_image(grid, owned_maps)
    offsets = assign_global_ids({t: ti.count for t, ti in per_tile.items()})
    props = {p.label: p for p in regionprops(stitched)}
    assert sum(ti.count for ti in per_tile.values()) == len(props)
    for t, ti in per_tile.items():
        assert isinstance(ti, TileInstances) and ti.tile == t
        assert len(ti.polygons) == ti.count == len(ti.centroid_rc) == len(ti.features["area"])
        for i in range(ti.count):
            p = props[offsets[t] + i + 1]
            np.testing.assert_allclose(ti.centroid_rc[i], np.array(p.centroid) + 0.5)
            assert tuple(ti.bbox_rc[i]) == p.bbox
            assert ti.features["area"][i] == p.area
            assert abs(ti.polygons[i].area - p.area) <= 1.0
            minx, miny, maxx, maxy = ti.polygons[i].bounds
            assert (miny, minx, maxy, maxx) == tuple(float(v) for v in p.bbox)
        np.testing.assert_allclose(ti.features["score"], 0.75)
        np.testing.assert_allclose(ti.features["mean_intensity"], 60, atol=0.5)


def test_tile_instances_empty_and_without_maps():
    grid = _grid((40, 40), 20, 4)
    ti = tile_instances(np.zeros((28, 28), np.int32), grid, (1, 1))
    assert ti.count == 0 and ti.polygons == [] and ti.centroid_rc.shape == (0, 2)
    owned = np.zeros((28, 28), np.int32)
    owned[10:14, 10:15] = 1
    ti = tile_instances(owned, grid, (1, 1))
    assert ti.count == 1 and np.isnan(ti.features["score"]).all()
    np.testing.assert_allclose(ti.centroid_rc[0], [16 + 11.5 + 0.5, 16 + 12 + 0.5])
