"""Slide metadata a review found mishandled: placeholder resolutions and OpenSlide bounds."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from synthetic_slides import synthetic_he, write_leica_scn

from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import bundled_model_path
from wsi_ircr.slide import reader as reader_mod
from wsi_ircr.slide.reader import open_slide, require_mpp

pytestmark = pytest.mark.openslide


@pytest.mark.parametrize("dpi", [300, 600, 72])
def test_placeholder_dpi_is_no_mpp_with_a_clear_error(dpi, tmp_path):
    import tifffile

    image, _ = synthetic_he((260, 300), n_nuclei=10, seed=1)
    path = tmp_path / f"scan{dpi}.tiff"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", resolution=(dpi, dpi), resolutionunit="INCH")
    with open_slide(path) as r:
        assert r.mpp is None and "implausible" in r.mpp_source
        with pytest.raises(UserError, match=rf"scan{dpi}.tiff has no mpp metadata .*{25400 / dpi:.4g} um/px.*--mpp 0.25"):
            require_mpp(r)
    with open_slide(path, mpp=0.5) as r:
        assert r.mpp == 0.5


def test_low_magnification_scans_keep_their_mpp():
    parse = reader_mod._mpp_from_properties
    assert parse({"openslide.mpp-x": "8.0", "openslide.mpp-y": "8.0"}, "s")[0] == 8.0  # about 1.25x
    assert parse({"openslide.mpp-x": "12", "openslide.mpp-y": "12"}, "s")[0] is None


BOUNDS_XYWH = (64, 48, 480, 400)


@pytest.fixture
def bounded(tmp_path):
    """A synthetic Leica SCN (0.25 mpp) whose 480 x 400 px main image lies at (64, 48) of
    its collection: OpenSlide reports it as openslide.bounds-*; returns (path, image, labels)
    with ``image`` the main image as written, and ``labels`` its nuclei in the full frame."""
    image, labels = synthetic_he((500, 600), n_nuclei=70, seed=8, radius_px=(8, 12), tissue_fraction=0.8)
    x, y, w, h = BOUNDS_XYWH
    path = write_leica_scn(tmp_path / "bounded.scn", image[y:y + h, x:x + w], mpp=0.25, offset_xy=(x, y))
    full = np.full_like(image, 255)
    full[y:y + h, x:x + w] = image[y:y + h, x:x + w]
    return path, full, labels


def test_reader_puts_the_origin_at_the_bounds_as_qupath_does(bounded):
    path, image, _ = bounded
    x, y, w, h = BOUNDS_XYWH
    with open_slide(path) as r:
        assert r.vendor == "leica" and r.properties["openslide.bounds-x"] == str(x)
        assert r.dimensions_xy == (w, h) and r.bounds_offset_xy == (x, y) and r.mpp == pytest.approx(0.25)
        assert r.level_dimensions_xy[1] == (w // 2, h // 2)
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (w, h)), image[y:y + h, x:x + w])
        np.testing.assert_array_equal(r.read_region((10, 20), 0, (5, 5)), image[y + 20:y + 25, x + 10:x + 15])


def test_geojson_of_a_bounded_slide_lands_on_qupath_pixels(bounded, tmp_path):
    """Nuclei inside the bounds are exported once each, at their position relative to the
    bounds' corner (QuPath's level-0 frame for such slides; without the shift they would
    land 64 px right and 48 px down of their pixels)."""
    if not bundled_model_path().exists():
        pytest.skip("the bundled model is not in wsi_ircr/weights")
    from wsi_ircr.slide.cluster import local_client
    from wsi_ircr.slide.cohort import segment_slides
    from wsi_ircr.slide.config import SegmentConfig
    from wsi_ircr.slide.pipeline import model_info

    path, _, labels = bounded
    config = SegmentConfig(core_px=256, halo_px=32, max_nucleus_um=8.0, threads_per_worker=1, tissue_mask=False)
    with local_client(config) as client:
        report = segment_slides([path], tmp_path, config, client, model_info(config))
    assert report.done == [path], report.failed
    assert report.summaries[path]["bounds_offset_xy"] == list(BOUNDS_XYWH[:2])
    with open(tmp_path / "bounded" / "nuclei.csv", newline="") as f:
        found = np.array([[float(r["centroid_x"]), float(r["centroid_y"])] for r in csv.DictReader(f)])
    x, y, w, h = BOUNDS_XYWH
    assert found.min() >= 0 and (found.max(axis=0) <= (w, h)).all()
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    count = np.bincount(lab)[1:]
    truth = np.stack([np.bincount(lab, cols + 0.5)[1:] / count, np.bincount(lab, rows + 0.5)[1:] / count], 1)
    inside = (truth[:, 0] > x + 16) & (truth[:, 0] < x + w - 16) & (truth[:, 1] > y + 16) & (truth[:, 1] < y + h - 16)
    truth = truth[inside] - (x, y)
    near = np.linalg.norm(truth[:, None] - found[None], axis=2) < 2.0
    assert len(truth) > 20 and (near.sum(axis=1) == 1).mean() > 0.8


def test_info_shows_the_bounds(bounded, capsys):
    from wsi_ircr.cli import main

    path, _, _ = bounded
    main(["info", str(path)])
    out = capsys.readouterr().out
    assert "size:        480 x 400 px" in out and "bounds:      level-0 (0, 0) is OpenSlide's (64, 48)" in out
