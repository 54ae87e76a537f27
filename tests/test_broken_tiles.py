"""A slide with a broken tile: read around it, segment everything else, say where it could not read."""

from __future__ import annotations

import csv
import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from broken_slides import intact_and_broken
from model_fixtures import synthetic_signal_model
from synthetic_slides import synthetic_he

from wsi_ircr.slide.cluster import local_client
from wsi_ircr.slide.cohort import segment_slides
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.pipeline import model_info
from wsi_ircr.slide.reader import open_slide, read_scaled, unreadable_mask

pytestmark = pytest.mark.openslide
BOX = (256, 256, 256, 256)  # level-0 tile (1, 1) of 256 px tiles
SMALL = {"core_px": 256, "halo_px": 32, "max_nucleus_um": 8.0, "threads_per_worker": 1, "batch_tiles": 1,
         "tissue_mask": False}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """uint8 (768, 1024, 3): 3 x 4 slide tiles of 256 px, 3 x 4 segment tiles (core 256 px)."""
    return synthetic_he((768, 1024), n_nuclei=160, seed=11, radius_px=(4, 6), tissue_fraction=0.9)[0]


@pytest.fixture(scope="module", params=[1, 3], ids=["single-level", "pyramidal"])
def slides(request, image, tmp_path_factory) -> tuple[Path, Path]:
    """(intact, broken) JPEG-tiled TIFFs at 0.25 um/px; the broken one's level-0 tile (1, 1) cannot be decoded."""
    return intact_and_broken(tmp_path_factory.mktemp("broken"), image, 0.25, request.param, (1, 1))


def test_a_broken_tile_is_read_around_white_and_recorded(slides):
    intact, broken = slides
    with open_slide(intact) as a, open_slide(broken) as b:
        whole = b.read_region((0, 0), 0, (1024, 768))
        expected = a.read_region((0, 0), 0, (1024, 768))
        assert b.unreadable_xywh == {BOX}
        x, y, w, h = BOX
        assert (whole[y:y + h, x:x + w] == 255).all()
        whole[y:y + h, x:x + w] = expected[y:y + h, x:x + w]
        np.testing.assert_array_equal(whole, expected)  # every other pixel as decoded from the intact file
        # the handle works after the failure (OpenSlide leaves a failed handle in an error state)
        np.testing.assert_array_equal(b.read_region((600, 700), 0, (300, 200)), a.read_region((600, 700), 0, (300, 200)))


def test_concurrent_reads_blame_only_the_broken_tile(slides):
    intact, broken = slides
    rng = np.random.default_rng(0)
    corners = [(int(x), int(y)) for x, y in rng.integers(0, 768 - 200, (24, 2))]
    with open_slide(intact) as a, open_slide(broken) as b, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda xy: b.read_region(xy, 0, (200, 200)), corners))
        assert b.unreadable_xywh <= {BOX}
        for (x, y), tile in zip(corners, got):
            mask = unreadable_mask(b.unreadable_xywh, (x, y), (200, 200), 1.0, margin_px=0)
            expected = a.read_region((x, y), 0, (200, 200))
            if mask is not None:
                expected[mask] = 255
            np.testing.assert_array_equal(tile, expected)


def test_the_thumbnail_reads_the_level_it_needs(slides):
    _, broken = slides
    with open_slide(broken) as reader:
        thumb = read_scaled(reader, (0.0, 0.0), (96, 128), 8.0)
        levels = len(reader.level_dimensions_xy)
        assert thumb.shape == (96, 128, 3)
        # a pyramid's coarse level is intact; a single-level slide's thumbnail reads level 0 around the tile
        assert reader.unreadable_xywh == (set() if levels > 1 else {BOX})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return synthetic_signal_model(tmp_path_factory.mktemp("model") / "random.pt")


@pytest.fixture(scope="module")
def client():
    with local_client(SegmentConfig(**SMALL)) as c:
        yield c


def _nuclei(out: Path, stem: str) -> tuple[set[tuple[float, float]], list[np.ndarray]]:
    """(centroids (x, y) of nuclei.csv, outlines (n, 2) level-0 x, y of the GeoJSON)."""
    with open(out / stem / "nuclei.csv", newline="") as f:
        centroids = {(float(r["centroid_x"]), float(r["centroid_y"])) for r in csv.DictReader(f)}
    features = json.loads(gzip.decompress((out / stem / f"{stem}.geojson.gz").read_bytes()))["features"]
    return centroids, [np.asarray(feat["geometry"]["coordinates"][0]) for feat in features]


@pytest.fixture(scope="module")
def intact_run(image, model, client, tmp_path_factory) -> tuple[Path, Path]:
    """(the intact slide, its run's output folder); its level 0 is that of every slide of ``slides``."""
    intact, _ = intact_and_broken(tmp_path_factory.mktemp("intact"), image, 0.25, 1, (1, 1))
    out = tmp_path_factory.mktemp("intact-run")
    config = SegmentConfig(**SMALL, model=str(model))
    assert segment_slides([intact], out, config, client, model_info(config)).done == [intact]
    return intact, out


def test_segment_leaves_out_the_broken_tile_and_says_where(slides, intact_run, model, client, tmp_path):
    _, broken = slides
    intact, intact_out = intact_run
    config = SegmentConfig(**SMALL, model=str(model), max_unreadable_fraction=0.2)  # 1 slide tile of 12
    lines = []
    report = segment_slides([broken], tmp_path, config, client, model_info(config),
                            echo=lambda line, err: lines.append(line))
    assert report.done == [broken]
    summary = json.loads((tmp_path / broken.stem / "summary.json").read_text())
    assert summary["unreadable"]["regions"] == 1 and summary["unreadable"]["boxes_xywh"] == [list(BOX)]
    assert summary["unreadable"]["area_mm2"] == pytest.approx(256 * 256 * 0.25**2 / 1e6)
    assert json.loads((intact_out / intact.stem / "summary.json").read_text())["unreadable"]["regions"] == 0
    warnings = [line for line in lines if line.startswith("warning:") and "could not be read" in line]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "1 broken tiles could not be read" in warnings[0]
    for out, slide, regions in ((tmp_path, broken, "1"), (intact_out, intact, "0")):
        with open(out / "cohort.csv", newline="") as f:
            (row,) = csv.DictReader(f)
        assert row["slide"] == str(slide) and row["unreadable_regions"] == regions

    full, _ = _nuclei(intact_out, intact.stem)
    kept, outlines = _nuclei(tmp_path, broken.stem)
    far = lambda xy: xy[0] >= 768  # noqa: E731 - owned by the tiles whose windows miss the box
    assert {c for c in kept if far(c)} == {c for c in full if far(c)} != set()
    assert len(kept) > 0.8 * len(full)
    x, y, w, h = BOX
    for xy in outlines:  # no nucleus reaches into the unreadable tile (no half nuclei)
        assert not ((xy[:, 0] > x) & (xy[:, 0] < x + w) & (xy[:, 1] > y) & (xy[:, 1] < y + h)).any()


def test_a_slide_past_the_unreadable_threshold_fails_in_one_line(image, model, client, tmp_path):
    _, broken = intact_and_broken(tmp_path / "slides", image[:512, :512].copy(), 0.25, 1, (1, 1))  # 1 tile of 4
    config = SegmentConfig(**SMALL, model=str(model))
    report = segment_slides([broken], tmp_path / "out", config, client, model_info(config))
    message = report.failed[broken]
    assert "25.0 % of the tissue could not be read (1 broken tiles" in message
    assert "max_unreadable_fraction 0.05" in message
    assert "\n" not in message
    with open(tmp_path / "out" / "cohort.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "failed" and "could not be read" in row["error"]


def test_a_tile_next_to_a_broken_one_is_stored_with_its_edge_left_out(slides, tmp_path):
    """A box found by another read, just outside this tile's window: the read itself succeeds,
    the pixels within the resampling margin are left white and the box is stored with the tile."""
    from wsi_ircr.slide.grid import TileGrid
    from wsi_ircr.slide.store import create_tile_store

    intact, _ = slides
    with open_slide(intact) as reader:
        grid = TileGrid(reader.dimensions_xy, 0.25, 0.25, 256, 32)
        store = create_tile_store(tmp_path / "tiles.zarr", grid, [(0, 0)], fingerprint=reader.fingerprint(),
                                  slide_name=intact.name)
        reader.unreadable_xywh.add((288, 0, 256, 768))  # the window of tile (0, 0) is [-32, 288) x [-32, 288)
        pixels = store.write(0, reader)
    assert store.unreadable(0) == [[288, 0, 256, 768]]
    expected = np.zeros((320, 320), bool)
    expected[30:, 318:] = True  # 2 px of margin: columns 318-319 (x 286-288), rows from y = -2
    np.testing.assert_array_equal(store.unreadable_mask(0), expected)
    assert (pixels[expected] == 255).all() and not (pixels[~expected] == 255).all()
