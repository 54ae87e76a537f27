"""A resumable zarr v3 store of the tiles to segment, read once from the slide at the model mpp.

Layout of the store folder (a zarr v3 group):

- ``tiles``: uint8 (n_tiles, tile_px, tile_px, 3) RGB, one zstd-compressed chunk per tile;
  tile ``i`` is the read window of grid tile ``attrs["tiles"][i]`` (white beyond the slide).
- ``done``: uint8 (n_tiles,), one chunk per flag, set to 1 only after tile ``i``'s chunk was
  written (zarr writes each chunk file atomically), so an interrupted run never leaves a tile
  that looks complete, and concurrent writers never share a chunk.
- ``unreadable/<i>.json``: only for a tile whose read met broken slide tiles: the level-0
  ``[x, y, width, height]`` boxes that could not be decoded (left white in the tile), written
  before the tile's ``done`` flag.
- attributes: ``format``, ``format_version``, ``grid`` (``TileGrid.to_dict()``), ``mpp``,
  ``slide_name``, ``slide_fingerprint``, ``tiles`` (list of [row, col], in store order).

Writing is parallel-friendly: ``write_tile(store_path, i, reader)`` can run in any process.
A store is reused by any later run of the same slide, grid and tile list (``--overwrite``
included): only the tiles not written yet are read from the slide.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open, atomic_path
from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.reader import SlideReader, read_at_mpp, unreadable_boxes, unreadable_mask

log = logging.getLogger(__name__)

FORMAT = "wsi-ircr-tiles"
FORMAT_VERSION = 1
_ZSTD_LEVEL = 1
UNREADABLE_DIR = "unreadable"


def _metadata_path(path: Path) -> Path:
    return path / "zarr.json"


def _read_attributes(path: Path) -> dict | None:
    """The group's attributes if ``path`` is a wsi-ircr tile store, else None."""
    try:
        meta = json.loads(_metadata_path(path).read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    return attrs if attrs.get("format") == FORMAT else None


class TileStore:
    """An open tile store (see the module docstring). Use ``TileStore.open`` or ``write_tile_store``."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        attrs = _read_attributes(self.path)
        if attrs is None:
            if not self.path.exists():
                raise UserError(f"{self.path}: no tile store here; run `wsi-ircr tile` to write one")
            raise UserError(f"{self.path} is not a wsi-ircr tile store; pass the folder written by `wsi-ircr tile`")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(
                f"{self.path}: tile store format version {version}, this wsi-ircr reads {FORMAT_VERSION}; "
                "rewrite it with --overwrite"
            )
        self.attrs = attrs
        self.grid = TileGrid.from_dict(attrs["grid"], where=f"{self.path} grid")
        self.tiles: list[Tile] = [(int(r), int(c)) for r, c in attrs["tiles"]]
        self.fingerprint: str = attrs["slide_fingerprint"]
        self.slide_name: str = attrs["slide_name"]
        self.mpp: float = float(attrs["mpp"])
        group = zarr.open_group(self.path, mode="r+")
        self._tiles = group["tiles"]
        self._done = group["done"]

    @classmethod
    def open(cls, path: str | os.PathLike) -> TileStore:
        """Open an existing store; a missing or foreign folder is a UserError."""
        return cls(path)

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def tile_px(self) -> int:
        return self.grid.tile_px

    def index_of(self, tile: Tile) -> int:
        """Store index of grid tile (row, col); KeyError if the store does not hold it."""
        return self._index[tuple(tile)]

    @functools.cached_property
    def _index(self) -> dict[Tile, int]:
        return {t: i for i, t in enumerate(self.tiles)}

    def done_flags(self) -> np.ndarray:
        """bool (n_tiles,): which tiles are completely written.

        Lists the ``done`` chunk files (default zarr v3 chunk keys ``done/c/<i>``; only flags
        set to 1 are ever written) instead of reading one chunk per tile.
        """
        flags = np.zeros(self.n_tiles, bool)
        try:
            names = [e.name for e in os.scandir(self.path / "done" / "c")]
        except FileNotFoundError:
            return flags
        idx = np.array([int(n) for n in names if n.isdigit()], np.int64)
        flags[idx[idx < self.n_tiles]] = True
        return flags

    def is_done(self, i: int) -> bool:
        """Whether tile ``i`` is completely written (its ``done`` chunk file exists)."""
        return (self.path / "done" / "c" / str(int(i))).exists()

    @property
    def n_done(self) -> int:
        return int(self.done_flags().sum())

    @property
    def complete(self) -> bool:
        return bool(self.done_flags().all())

    def pending(self) -> list[int]:
        """Store indices of tiles not written yet."""
        return np.flatnonzero(~self.done_flags()).tolist()

    def read(self, i: int) -> np.ndarray:
        """uint8 (tile_px, tile_px, 3) RGB of tile ``i``; UserError if it is not written yet."""
        if not 0 <= i < self.n_tiles:
            raise IndexError(f"tile index {i} outside 0..{self.n_tiles - 1}")
        if not self._done[i]:
            raise UserError(
                f"{self.path}: tile {i} {self.tiles[i]} is not written yet; rerun `wsi-ircr tile` to finish the store"
            )
        return np.asarray(self._tiles[i])

    def unreadable(self, i: int) -> list[list[int]]:
        """Level-0 ``[x, y, width, height]`` boxes of the slide that tile ``i``'s read could not decode."""
        try:
            return json.loads((self.path / UNREADABLE_DIR / f"{int(i)}.json").read_text())
        except FileNotFoundError:
            return []

    def unreadable_mask(self, i: int, boxes=None) -> np.ndarray | None:
        """bool (tile_px, tile_px): pixels of tile ``i`` left white where the slide was unreadable
        (None: all read); ``boxes``: ``unreadable(i)`` if already read."""
        boxes = self.unreadable(i) if boxes is None else boxes
        if not boxes:
            return None
        return unreadable_mask(boxes, self.grid.origin_xy(self.tiles[i]), (self.tile_px, self.tile_px), self.grid.scale)

    def write(self, i: int, reader: SlideReader) -> np.ndarray:
        """Read tile ``i`` from ``reader`` at the grid's mpp, write its chunk, then its done flag;
        returns the uint8 (tile_px, tile_px, 3) pixels written. Pixels near unreadable slide
        tiles are white; their boxes go to ``unreadable/<i>.json`` first."""
        tile = self.tiles[i]
        origin, size_rc = self.grid.origin_xy(tile), (self.tile_px, self.tile_px)
        pixels = read_at_mpp(reader, origin, size_rc, self.grid.mpp)
        boxes = [b for b in sorted(unreadable_boxes(reader))
                 if unreadable_mask([b], origin, size_rc, self.grid.scale) is not None]
        if not _metadata_path(self.path).exists():  # removed while the tile was read: leave no half store
            raise UserError(f"{self.path}: the tile store was removed while tile {i} was read")
        if boxes:
            pixels[unreadable_mask(boxes, origin, size_rc, self.grid.scale)] = 255
            (self.path / UNREADABLE_DIR).mkdir(exist_ok=True)
            with atomic_open(self.path / UNREADABLE_DIR / f"{int(i)}.json") as f:
                json.dump([list(b) for b in boxes], f)
        self._tiles[i] = pixels
        self._done[i] = 1
        return pixels

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, {self.n_tiles} tiles of {self.tile_px} px at {self.mpp:g} mpp)"


def _mismatch(path: Path, attrs: dict, expected: dict) -> str | None:
    """Why the store at ``path`` cannot be resumed for ``expected`` attributes (None if it can)."""
    if attrs.get("format_version") != expected["format_version"]:
        return f"format version {attrs.get('format_version')} != {expected['format_version']}"
    if attrs.get("slide_fingerprint") != expected["slide_fingerprint"]:
        return f"it holds tiles of another slide ({attrs.get('slide_name')}, fingerprint {attrs.get('slide_fingerprint')})"
    if attrs.get("grid") != expected["grid"]:
        diff = [k for k in expected["grid"] if attrs.get("grid", {}).get(k) != expected["grid"][k]]
        return f"its tile grid differs ({', '.join(diff) or 'grid'})"
    if attrs.get("tiles") != expected["tiles"]:
        return "its tile list differs (other tissue mask settings?)"
    return None


def is_tile_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a tile store (its metadata written: a store is created atomically)."""
    return _read_attributes(Path(path)) is not None


def store_attributes(grid: TileGrid, tiles: Sequence[Tile], *, fingerprint: str, slide_name: str) -> dict:
    """The attributes of the store of ``tiles`` (grid (row, col)) of ``grid``, as JSON values."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "grid": grid.to_dict(),
        "mpp": grid.mpp,
        "slide_name": slide_name,
        "slide_fingerprint": fingerprint,
        "tiles": [[int(r), int(c)] for r, c in tiles],
    }


def create_tile_store(
    path: str | os.PathLike,
    grid: TileGrid,
    tiles: Sequence[Tile],
    *,
    fingerprint: str,
    slide_name: str,
    overwrite: bool = False,
) -> TileStore:
    """Create an empty store, or reopen a matching one to resume (its written tiles are kept).

    An existing store of another slide, grid or tile list is a UserError unless
    ``overwrite`` (which replaces it; folders that are not tile stores are never replaced).
    """
    import zarr
    from zarr.codecs import ZstdCodec

    path = Path(path)
    expected = store_attributes(grid, tiles, fingerprint=fingerprint, slide_name=slide_name)
    if path.exists():
        attrs = _read_attributes(path)
        empty_dir = path.is_dir() and not any(path.iterdir())
        if attrs is None and not empty_dir:
            raise UserError(f"{path} exists and is not a wsi-ircr tile store; choose another output folder")
        if attrs is not None:
            why = _mismatch(path, attrs, expected)
            if why is None:
                return TileStore(path)
            if not overwrite:
                raise UserError(f"{path}: cannot resume: {why}; pass --overwrite or choose another output folder")
    n = len(expected["tiles"])
    tp = grid.tile_px
    with atomic_path(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.create_array(
            "tiles", shape=(n, tp, tp, 3), chunks=(1, tp, tp, 3), dtype="uint8",
            compressors=ZstdCodec(level=_ZSTD_LEVEL), fill_value=255,
        )
        group.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update(expected)
    log.info("%s: new tile store, %d tiles of %d px at %g mpp", path, n, tp, grid.mpp)
    return TileStore(path)


@functools.lru_cache(maxsize=8)
def _open_cached(path: str, mtime_ns: int) -> TileStore:
    return TileStore(path)


def write_tile(store_path: str | os.PathLike, i: int, reader: SlideReader) -> np.ndarray:
    """Write tile ``i`` of the store at ``store_path`` (a pure, idempotent task for any process)
    and return its uint8 (tile_px, tile_px, 3) pixels.

    The opened store is cached per process (keyed by its metadata's modification time).
    """
    path = Path(store_path)
    try:
        mtime_ns = _metadata_path(path).stat().st_mtime_ns
    except FileNotFoundError:
        raise UserError(f"{path}: no tile store here; run `wsi-ircr tile` to write one") from None
    return _open_cached(str(path), mtime_ns).write(i, reader)
