"""Unlabelled training crops from whole slides: ``wsi-ircr train --unlabelled-slides``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_slides import synthetic_he, write_aperio_svs
from test_train import IRCR, dataset, run_cli, train_argv  # noqa: F401 (dataset: the labelled tiles fixture)

from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.reader import open_slide, read_at_mpp
from wsi_ircr.slide.store import TileStore
from wsi_ircr.train.slides import load_slide_tiles, sample_tiles, slide_tile_store

MT = ["--set", "mt_weight=1", "--set", "rampup_steps=0"]


@pytest.fixture
def he_slide(tmp_path) -> Path:
    """A synthetic H&E Aperio slide, 400 x 360 px at 0.5 um/px, tissue on about 60 % of it."""
    image, _ = synthetic_he((360, 400), n_nuclei=40, seed=3, radius_px=(4, 6))
    folder = tmp_path / "slides"
    folder.mkdir()
    return write_aperio_svs(folder / "he.svs", image, mpp=0.5)


def test_sample_tiles_is_bounded_deterministic_and_row_major():
    tiles = [(r, c) for r in range(5) for c in range(6)]
    picked = sample_tiles(tiles, 7, seed=1)
    assert len(picked) == 7 and picked == sorted(picked) and set(picked) <= set(tiles)
    assert picked == sample_tiles(tiles, 7, seed=1) and picked != sample_tiles(tiles, 7, seed=2)
    assert sample_tiles(tiles[:3], 7, seed=1) == tiles[:3]


def test_slide_tiles_are_the_readers_pixels_at_the_model_mpp_and_the_store_is_reused(he_slide, tmp_path, monkeypatch):
    store = slide_tile_store(he_slide, tmp_path / "stores", 0.25, tile_px=128, max_tiles=5, seed=0)
    assert store.path == tmp_path / "stores" / "he" / "tiles.zarr" and store.complete
    assert store.n_tiles == 5 and store.mpp == 0.25 and store.tile_px == 128
    grid = TileGrid((400, 360), 0.5, 0.25, 128, 0)
    assert store.grid == grid and len(grid.all_tiles()) == 42  # 800 x 720 px at 0.25: 7 x 6 tiles
    with open_slide(he_slide) as reader:
        for i, tile in enumerate(store.tiles):
            expected = read_at_mpp(reader, grid.origin_xy(tile), (128, 128), 0.25)
            np.testing.assert_array_equal(store.read(i), expected)

    def no_reads(*args):
        raise AssertionError("a reused store reads nothing from the slide")

    monkeypatch.setattr(TileStore, "write", no_reads)
    tiles = load_slide_tiles([he_slide.parent], tmp_path / "stores", 0.25, tile_px=128, max_tiles=5, seed=0)
    assert tiles.stems == [f"he@r{r}c{c}" for r, c in store.tiles] and tiles.labels is None
    assert all(im.shape == (128, 128, 3) and im.dtype == np.uint8 for im in tiles.images)


def test_slide_mpp_override_changes_the_grid(he_slide, tmp_path):
    store = slide_tile_store(he_slide, tmp_path / "stores", 0.25, slide_mpp=1.0, tile_px=128, max_tiles=2)
    assert store.grid.slide_mpp == 1.0 and store.grid.shape_rc == (1440, 1600) and store.n_tiles == 2


def test_train_with_unlabelled_slides_end_to_end(dataset, he_slide, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 3, "--unlabelled-slides", str(he_slide.parent), "--set", "tune_postprocess=false",
                      "--set", "data.labelled=2", "--set", "data.slide_tile_px=64", "--set", "data.slide_tiles=3", *IRCR)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (out / "slides" / "he" / "tiles.zarr").is_dir()
    model = load_checkpoint(out / "model.pt")
    unlabelled = model.meta["data"]["unlabelled"]
    assert len([s for s in unlabelled if s.startswith("he@")]) == 3 and len(unlabelled) == 3 + 3
    assert model.meta["config"]["data"]["unlabelled_slides"] == [he_slide.parent.name]  # model.pt holds no absolute path
    slides = [s for s in model.meta["sources"] if "slides" in s]  # sources: the slide folder, no licence stated there
    assert slides == [{"role": "unlabelled", "dataset": "/".join(he_slide.parent.parts[-2:]), "slides": he_slide.parent.name,
                       "licence": None}]
    assert "miac=" in err and "data: 2 labelled, 6 unlabelled" in err


def test_real_sample_slide_feeds_tissue_tiles(shared_slides, tmp_path):
    slide = shared_slides / "cmu-1-small-region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} is absent")
    tiles = load_slide_tiles([slide], tmp_path, 0.5, tile_px=256, max_tiles=4, seed=0)
    assert len(tiles) == 4 and all(t.shape == (256, 256, 3) for t in tiles.images)
    assert all(float(t.mean()) < 235 for t in tiles.images)  # tissue, not white glass


def _blank_slide(path: Path) -> Path:
    return write_aperio_svs(path, np.full((300, 300, 3), 244, np.uint8), mpp=0.5)


def _tiff_without_mpp(path: Path) -> Path:
    import tifffile

    tifffile.imwrite(path, synthetic_he((260, 300), n_nuclei=20, seed=1, radius_px=(4, 6))[0], tile=(256, 256),
                     photometric="rgb", compression="zlib")
    return path


@pytest.mark.parametrize("case, words", [
    ("missing", ["absent.svs", "no such file"]),
    ("not_a_slide", ["notes.svs", "not a whole-slide image"]),
    ("no_mpp", ["nompp.tiff", "no mpp", "--mpp"]),
    ("no_tissue", ["blank.svs", "no tissue", "--unlabelled-slides"]),
    ("no_unsupervised_term", ["--unlabelled-slides", "no unsupervised term"]),
    ("mpp_without_slides", ["--mpp 0.5", "none are given"]),
])
def test_unlabelled_slides_bad_input_is_one_line(dataset, tmp_path, capsys, case, words):
    extra = MT
    if case == "missing":
        slide = tmp_path / "absent.svs"
    elif case == "not_a_slide":
        slide = tmp_path / "notes.svs"
        slide.write_text("not a slide\n")
    elif case == "no_mpp":
        slide = _tiff_without_mpp(tmp_path / "nompp.tiff")
    elif case == "no_tissue":
        slide = _blank_slide(tmp_path / "blank.svs")
    elif case == "no_unsupervised_term":
        slide, extra = _blank_slide(tmp_path / "blank.svs"), []
    out = tmp_path / "run"
    slides = ["--mpp", "0.5"] if case == "mpp_without_slides" else ["--unlabelled-slides", str(slide)]
    code, _, err = run_cli(train_argv(dataset, out, 2, *slides, *extra), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (out / "last.pt").exists()


def test_slide_without_mpp_trains_with_the_mpp_option(dataset, tmp_path, capsys):
    slide = _tiff_without_mpp(tmp_path / "nompp.tiff")
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 1, "--unlabelled-slides", str(slide), "--mpp", "0.5", *MT, "--set", "tune_postprocess=false",
                      "--set", "data.slide_tile_px=64", "--set", "data.slide_tiles=2")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert load_checkpoint(out / "model.pt").meta["config"]["data"]["slide_mpp"] == 0.5


def test_slide_tile_store_errors_name_the_slide(tmp_path):
    with pytest.raises(UserError, match="blank.svs: no tissue"):
        slide_tile_store(_blank_slide(tmp_path / "blank.svs"), tmp_path / "stores", 0.25)


@pytest.mark.openslide
@pytest.mark.parametrize("name, words", [
    ("small.svs", ["small.svs: no tissue found"]),  # 16 x 16 px
    ("boxes.tiff", ["boxes.tiff has no mpp metadata", "--mpp"]),  # placeholder resolution only
    ("small_dicom.dcm", ["small_dicom.dcm", "cannot open it"]),  # OpenSlide rejects this DICOM variant
])
def test_real_slides_that_cannot_feed_training_are_one_line(dataset, shared_slides, tmp_path, capsys, name, words):
    slide = shared_slides / name
    if not slide.exists():
        pytest.skip(f"{slide} is absent")
    code, _, err = run_cli(train_argv(dataset, tmp_path / "run", 2, "--unlabelled-slides", str(slide), *MT), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
