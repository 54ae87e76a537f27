"""Zarr tile store: write, reopen, resume after interruption, mismatch errors, parallel writes."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import zarr

from synthetic_slides import synthetic_he
from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.reader import ArrayReader, open_slide, read_at_mpp
from wsi_ircr.slide.store import FORMAT_VERSION, TileStore, create_tile_store, write_tile


class CountingReader:
    """Wraps a reader and counts read_region calls."""

    def __init__(self, inner):
        self.inner = inner
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_region(self, location_xy, level, size_xy):
        self.reads += 1
        return self.inner.read_region(location_xy, level, size_xy)


@pytest.fixture(scope="module")
def reader() -> ArrayReader:
    return ArrayReader(synthetic_he((200, 260), 20, seed=4)[0], mpp=0.5, n_levels=2, path="synthetic.tiff")


def write_tile_store(reader, grid, tiles, path, *, fingerprint=None, progress=None, overwrite=False) -> TileStore:
    """Create (or resume) the store and write its pending tiles in this process, as the
    Dask tasks do; ``progress(1)`` after each tile written."""
    store = create_tile_store(path, grid, tiles, fingerprint=fingerprint or reader.fingerprint(),
                              slide_name=reader.path.name, overwrite=overwrite)
    for i in store.pending():
        write_tile(path, i, reader)
        if progress is not None:
            progress(1)
    return store


@pytest.fixture(scope="module")
def grid(reader) -> TileGrid:
    return TileGrid(reader.dimensions_xy, reader.mpp, mpp=0.25, core_px=96, halo_px=16)


def test_write_and_reopen(tmp_path, reader, grid):
    tiles = grid.all_tiles()[1:]
    calls = []
    store = write_tile_store(reader, grid, tiles, tmp_path / "t.zarr", progress=calls.append)
    assert store.complete and store.n_done == len(tiles) == len(calls) == sum(calls)
    reopened = TileStore.open(tmp_path / "t.zarr")
    assert reopened.grid == grid and reopened.tiles == tiles and reopened.mpp == 0.25
    assert reopened.fingerprint == reader.fingerprint() and reopened.slide_name == "synthetic.tiff"
    assert reopened.attrs["format_version"] == FORMAT_VERSION
    arr = zarr.open_array(tmp_path / "t.zarr" / "tiles", mode="r")
    assert arr.shape == (len(tiles), 128, 128, 3) and arr.chunks == (1, 128, 128, 3) and arr.dtype == np.uint8
    for i, t in enumerate(tiles):
        expected = read_at_mpp(reader, grid.origin_xy(t), (grid.tile_px, grid.tile_px), grid.mpp)
        np.testing.assert_array_equal(reopened.read(i), expected)
        assert reopened.index_of(t) == i
    assert (reopened.read(0)[:15] == 255).all()  # halo above the slide is white


def test_resume_writes_only_unfinished_tiles(tmp_path, reader, grid):
    path = tmp_path / "t.zarr"
    tiles = grid.all_tiles()
    store = create_tile_store(path, grid, tiles, fingerprint=reader.fingerprint(), slide_name="synthetic.tiff")
    for i in (0, 2, 3):
        store.write(i, reader)
    store._tiles[1] = np.zeros((grid.tile_px,) * 2 + (3,), np.uint8)  # chunk written, flag not: interrupted
    assert store.n_done == 3 and not store.complete and store.pending()[:2] == [1, 4]
    assert [store.is_done(i) for i in range(4)] == [True, False, True, True]
    with pytest.raises(UserError, match="tile 1 .* not written yet"):
        store.read(1)
    counting = CountingReader(reader)
    resumed = write_tile_store(counting, grid, tiles, path)
    assert resumed.complete and counting.reads == len(tiles) - 3
    expected = read_at_mpp(reader, grid.origin_xy(tiles[1]), (grid.tile_px, grid.tile_px), grid.mpp)
    np.testing.assert_array_equal(resumed.read(1), expected)
    counting.reads = 0
    write_tile_store(counting, grid, tiles, path)
    assert counting.reads == 0


def test_mismatch_needs_overwrite(tmp_path, reader, grid):
    path = tmp_path / "t.zarr"
    tiles = grid.all_tiles()[:2]
    write_tile_store(reader, grid, tiles, path)
    other_grid = TileGrid(grid.slide_dimensions_xy, grid.slide_mpp, grid.mpp, core_px=64, halo_px=16)
    cases = [
        ({"fingerprint": "0" * 32}, grid, tiles, "another slide"),
        ({}, other_grid, other_grid.all_tiles()[:2], "tile grid differs \\(core_px\\)"),
        ({}, grid, grid.all_tiles()[:3], "tile list differs"),
    ]
    for kwargs, g, t, why in cases:
        with pytest.raises(UserError, match=f"t.zarr: cannot resume: .*{why}.*; pass --overwrite or choose another output folder"):
            write_tile_store(reader, g, t, path, **kwargs)
    store = write_tile_store(reader, other_grid, other_grid.all_tiles(), path, overwrite=True)
    assert store.grid == other_grid and store.complete and TileStore.open(path).tile_px == 96


def test_overwrite_keeps_a_matching_store(tmp_path, reader, grid):
    """``--overwrite`` recomputes a run but reuses its tile store when slide, grid and tiles match."""
    path = tmp_path / "t.zarr"
    tiles = grid.all_tiles()[:3]
    write_tile_store(reader, grid, tiles, path)
    chunks = {p: p.stat().st_mtime_ns for p in (path / "tiles").rglob("*") if p.is_file()}
    counting = CountingReader(reader)
    store = write_tile_store(counting, grid, tiles, path, overwrite=True)
    assert store.complete and counting.reads == 0
    assert chunks == {p: p.stat().st_mtime_ns for p in (path / "tiles").rglob("*") if p.is_file()}


def test_foreign_and_missing_folders(tmp_path, reader, grid):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a wsi-ircr tile store; choose another output folder"):
        write_tile_store(reader, grid, grid.all_tiles(), tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "a.txt").exists()
    with pytest.raises(UserError, match="no tile store here"):
        TileStore.open(tmp_path / "missing.zarr")
    with pytest.raises(UserError, match="not a wsi-ircr tile store"):
        TileStore.open(tmp_path / "notes")
    (tmp_path / "empty").mkdir()
    assert write_tile_store(reader, grid, grid.all_tiles()[:1], tmp_path / "empty").complete


def test_write_tile_in_other_processes(tmp_path, reader, grid):
    path = tmp_path / "t.zarr"
    tiles = grid.all_tiles()
    create_tile_store(path, grid, tiles, fingerprint=reader.fingerprint(), slide_name="synthetic.tiff")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(write_tile, [path] * len(tiles), range(len(tiles)), [reader] * len(tiles)))
    store = TileStore.open(path)
    assert store.complete
    np.testing.assert_array_equal(
        store.read(len(tiles) - 1),
        read_at_mpp(reader, grid.origin_xy(tiles[-1]), (grid.tile_px, grid.tile_px), grid.mpp),
    )
    assert sorted(os.listdir(path / "done" / "c"), key=int) == [str(i) for i in range(len(tiles))]


@pytest.mark.openslide
@pytest.mark.shared
def test_real_slide_tiles(tmp_path, shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        g = TileGrid(slide.dimensions_xy, slide.mpp, mpp=0.5, core_px=200, halo_px=24)
        tiles = [(0, 0), (5, 3)]
        store = write_tile_store(slide, g, tiles, tmp_path / "cmu.zarr")
        for i, t in enumerate(tiles):
            np.testing.assert_array_equal(store.read(i), read_at_mpp(slide, g.origin_xy(t), (248, 248), 0.5))
