"""Glass skipped inside tissue tiles (``wsi_ircr.slide.crop``): the boxes the network runs on,
and the nuclei they give against whole tiles."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_slides import synthetic_he

from wsi_ircr.metrics import aji
from wsi_ircr.slide.crop import box_area, full_box, paste, predict_in_boxes, tissue_box, tissue_boxes
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.tissue import TissueMask


def grid_and_mask(mask: np.ndarray, mask_mpp: float = 2.0, shape_rc=(768, 768), core_px: int = 256, halo_px: int = 32):
    """A grid of the model's 0.25 um/px over ``shape_rc`` and a tissue mask at ``mask_mpp``."""
    return TileGrid((shape_rc[1], shape_rc[0]), 0.25, 0.25, core_px, halo_px), TissueMask(mask, mask_mpp)


def test_the_box_holds_the_tissue_plus_context_on_the_stride():
    mask = np.zeros((96, 96), bool)  # 2 um/px: 8 model px per mask px
    mask[10:14, 20:22] = True  # model rows 80..112, cols 160..176
    grid, tissue = grid_and_mask(mask)
    box = tissue_box(grid, tissue, (0, 0), context_px=40, stride_px=16)
    # the window starts at -32: rows 112..144 of the window, -40 / +40, outwards to 16
    assert box == (64, 144, 192, 256)
    assert all(v % 16 == 0 for v in box)
    assert tissue_box(grid, tissue, (2, 2)) == (0, 0, 0, 0)  # no tissue in that window
    mask[:] = True
    assert tissue_box(grid, tissue, (1, 1)) == full_box(grid)


def test_boxes_stop_at_the_slide_edge_plus_context():
    """A window reaching past the slide is cropped to the slide and its context even where all of it is tissue."""
    grid, tissue = grid_and_mask(np.ones((96, 96), bool))
    r0, c0, r1, c1 = tissue_box(grid, tissue, (0, 0), context_px=0)
    assert (r0, c0) == (32, 32) and (r1, c1) == (grid.tile_px, grid.tile_px)  # the halo above / left is off the slide
    corner = tissue_box(grid, tissue, (2, 2), context_px=0)
    assert corner == (0, 0, 32 + 256, 32 + 256)
    assert tissue_boxes(grid, tissue, [(0, 0), (2, 2)]) == [(0, 0, 320, 320), (0, 0, 320, 320)]  # context 64
    assert tissue_box(grid, tissue, (2, 2), context_px=16) == (0, 0, 304, 304)
    assert box_area(corner) == 288 * 288


def test_paste_puts_a_crop_in_its_place():
    crop = np.arange(6, dtype=np.int32).reshape(2, 3) + 1
    out = paste(crop, (4, 5, 6, 8), 10)
    assert out.shape == (10, 10) and out.dtype == np.int32
    assert (out[4:6, 5:8] == crop).all() and out.sum() == crop.sum()


class ShapePredictor:
    """Records the batches it is given; probability = red channel / 255, HV zero."""

    def __init__(self):
        self.batches = []

    def predict_batch(self, tiles):
        self.batches.append(tiles.shape)
        prob = tiles[..., 0].astype(np.float32) / 255
        return prob, np.zeros((len(tiles), 2, *tiles.shape[1:3]), np.float32), None


def test_tiles_with_one_box_shape_share_a_batch():
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    predictor = ShapePredictor()
    boxes = [(0, 0, 64, 64), (16, 16, 48, 64), (0, 0, 64, 64)]
    out = predict_in_boxes(predictor, images, boxes)
    assert sorted(predictor.batches) == [(1, 32, 48, 3), (2, 64, 64, 3)]
    assert np.allclose(out[1][0], images[1, 16:48, 16:64, 0] / 255)
    assert np.allclose(out[2][0], images[2, :, :, 0] / 255)
    empty = predict_in_boxes(predictor, images[:1], [(0, 0, 0, 0)])
    assert empty[0][0].size == 0 and len(predictor.batches) == 2  # an empty box runs nothing


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    """An 896 x 896 image at 0.25 um/px: glass, with a 512 x 512 synthetic H&E patch (half
    of it tissue, 60 nuclei) in its top-left corner."""
    image = np.full((896, 896, 3), 242, np.uint8)
    image[:512, :512] = synthetic_he((512, 512), n_nuclei=60, seed=5, tissue_fraction=0.5)[0]
    return image


def test_nuclei_of_cropped_tiles_agree_with_whole_tiles(slide):
    """The bundled model over the image tile by tile, whole tiles against each tissue tile's
    box only (``segment_array(..., tissue=)``, the slide pipeline's boxes): the same nuclei,
    AJI >= 0.98, with part of the area not forwarded."""
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.slide.reader import ArrayReader
    from wsi_ircr.slide.segmentation import segment_array
    from wsi_ircr.slide.tissue import detect_tissue

    image = slide
    tissue = detect_tissue(ArrayReader(image, mpp=0.25), 2.0, min_object_mm2=0.001, dilation_um=16)
    grid = TileGrid((896, 896), 0.25, 0.25, 384, 32)
    tiles = grid.tissue_tiles(tissue)
    boxes = tissue_boxes(grid, tissue, tiles)
    assert sum(map(box_area, boxes)) < 0.7 * len(tiles) * grid.tile_px**2  # glass inside tissue tiles is skipped
    predictor = Predictor(load_checkpoint(None), device="cpu", precision="fp32", engine="torch")
    whole = segment_array(image, predictor, core_px=384, halo_px=32)
    cropped = segment_array(image, predictor, core_px=256, halo_px=32, tissue=tissue)
    assert whole.max() > 40
    assert aji(whole, cropped) >= 0.98


@pytest.mark.slow
def test_a_slide_segmented_without_its_glass_keeps_its_nuclei(tmp_path):
    """``wsi-ircr segment`` of a slide file with glass around its tissue (1536 px square, a
    1024 px H&E patch in a corner), by default (boxes) and with ``skip_glass=false`` (whole
    tiles): the same nuclei."""
    import gzip
    import json

    from qupath_geojson import raster_features
    from synthetic_slides import write_pyramidal_tiff

    from wsi_ircr.cli import main

    slide = np.full((1536, 1536, 3), 242, np.uint8)
    slide[:1024, :1024] = synthetic_he((1024, 1024), n_nuclei=200, seed=6, tissue_fraction=0.5)[0]
    path = write_pyramidal_tiff(tmp_path / "he.tiff", slide, mpp=0.25, compression="deflate")
    features = {}
    for skip in ("true", "false"):
        out = tmp_path / skip
        try:
            main(["segment", str(path), "-o", str(out), "--core-px", "384", "--halo", "32", "--device", "cpu",
                  "--quiet", "--precision", "fp32", "--set", "engine=torch", "--set", "max_nucleus_um=8",
                  "--set", "tissue_mpp=2", "--set", f"skip_glass={skip}"])
        except SystemExit as e:
            assert e.code in (0, None)
        summary = json.loads((out / "he" / "summary.json").read_text())
        assert summary["tiles"]["segmented"] < summary["tiles"]["total"]
        [geojson] = (out / "he").glob("*.geojson.gz")
        features[skip] = json.loads(gzip.decompress(geojson.read_bytes()))["features"]
    ref, got = (raster_features(features[k], slide.shape[:2]) for k in ("false", "true"))
    assert ref.max() > 100 and aji(ref, got) >= 0.98
