"""``segment_tile`` / ``segment_array``: the per-tile algorithm called without Dask."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from synthetic_slides import synthetic_he

from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.segmentation import segment_array, segment_tile
from wsi_ircr.slide.stitch import owned_instances, tile_instances


class DarkPredictor:
    """A stand-in for ``Predictor``: 'probability' = darkness, instances = connected dark
    components, so the synthetic nuclei (dark, separated by background) are found exactly."""

    mpp = 0.25

    def __init__(self):
        self.calls = 0

    def predict_maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        prob = 1.0 - tiles.mean(axis=3, dtype=np.float32) / 255.0
        return prob, np.zeros((len(tiles), 2, *tiles.shape[1:3]), np.float32)

    def instances(self, prob: np.ndarray, hv: np.ndarray) -> np.ndarray:
        return ndi.label(prob > 0.55)[0].astype(np.int32)


def _same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> None:
    assert ((a > 0) == (b > 0)).all()
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("shape_rc, core_px", [((300, 340), 96), ((257, 129), 64)])
def test_segment_array_finds_every_nucleus_once_across_seams(shape_rc, core_px):
    image, labels = synthetic_he(shape_rc, n_nuclei=40, seed=2, radius_px=(4, 7))
    expected = DarkPredictor().instances(1.0 - image.mean(axis=2) / 255.0, None)
    _same_up_to_relabelling(expected, segment_array(image, DarkPredictor(), core_px=core_px, halo_px=16))
    assert expected.max() >= 35


def test_segment_tile_is_the_maps_postprocessing_ownership_and_measurements():
    image, _ = synthetic_he((200, 200), n_nuclei=25, seed=5, radius_px=(4, 7))
    grid = TileGrid((200, 200), 0.25, 0.25, 96, 16)
    tile = (1, 1)
    window = np.full((grid.tile_px,) * 2 + (3,), 255, np.uint8)
    r0, c0 = grid.read_origin_rc(tile)
    window[: 200 - r0, : 200 - c0] = image[r0:, c0:]
    predictor = DarkPredictor()
    got = segment_tile(window, predictor, grid, tile)
    assert predictor.calls == 1
    prob, hv = (m[0] for m in predictor.predict_maps(window[None]))
    owned, dropped = owned_instances(predictor.instances(prob, hv), grid, tile, on_truncated="drop")
    want = tile_instances(owned, grid, tile, image=window, np_prob=prob)
    assert got.count == want.count > 3 and got.dropped == dropped == 0
    np.testing.assert_array_equal(got.centroid_rc, want.centroid_rc)
    assert [p.wkt for p in got.polygons] == [p.wkt for p in want.polygons]
    again = segment_tile(window, predictor, grid, tile, maps=(prob, hv))  # maps of a batched pass
    assert predictor.calls == 2 and again.count == got.count


def test_nuclei_larger_than_the_halo_are_counted_or_refused():
    grid = TileGrid((128, 128), 0.25, 0.25, 64, 4)
    image = np.full((128, 128, 3), 240, np.uint8)
    image[40:80, 50:90] = 40  # 40 px across the seam at 64, halo 4
    window = np.full((grid.tile_px,) * 2 + (3,), 255, np.uint8)
    window[4:, 4:] = image[:grid.tile_px - 4, :grid.tile_px - 4]
    assert segment_tile(window, DarkPredictor(), grid, (0, 0)).dropped == 1
    with pytest.raises(UserError, match="halo too small"):
        segment_tile(window, DarkPredictor(), grid, (0, 0), on_truncated="raise")
    with pytest.raises(ValueError, match="expected uint8"):
        segment_tile(window[:10], DarkPredictor(), grid, (0, 0))


def test_readme_python_example_with_the_bundled_model():
    from wsi_ircr.model.checkpoint import bundled_model_path, load_checkpoint
    from wsi_ircr.model.inference import Predictor

    if not bundled_model_path().exists():
        pytest.skip("the bundled model is not in wsi_ircr/weights")
    image, truth = synthetic_he((300, 320), n_nuclei=30, seed=8, radius_px=(8, 12), tissue_fraction=0.8)
    labels = segment_array(image, Predictor(load_checkpoint(None), device="cpu"), core_px=128, halo_px=64)
    assert labels.shape == (300, 320) and labels.dtype == np.int32
    assert 0.7 * truth.max() < labels.max() < 1.5 * truth.max()
