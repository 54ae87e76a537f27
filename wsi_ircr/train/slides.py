"""Unlabelled training tiles from whole slides, read the way ``wsi-ircr segment`` reads them.

Each slide goes through the same reader (OpenSlide; level-0 mpp from its metadata or the
``--mpp`` override, refused without either), tissue mask and zarr tile store as ``segment``:
the tissue tiles of a grid of ``tile_px`` squares at the model's mpp, of which at most
``max_tiles`` (drawn with ``seed``) are written to ``<store_root>/<slide stem>/tiles.zarr`` and
loaded as unlabelled tiles. A later run of the same settings (``--resume``) reopens the
store and reads no tile from the slide again (only its tissue mask).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import Tile
from wsi_ircr.train.data import TileSet


def sample_tiles(tiles: list[Tile], max_tiles: int, seed: int) -> list[Tile]:
    """At most ``max_tiles`` of ``tiles``, drawn without replacement with ``seed``, row-major."""
    if len(tiles) <= max_tiles:
        return list(tiles)
    keep = np.random.default_rng(seed).choice(len(tiles), size=max_tiles, replace=False)
    return [tiles[i] for i in sorted(keep)]


def slide_tile_store(slide_path: str | Path, store_root: str | Path, model_mpp: float, *, slide_mpp: float | None = None,
                     tile_px: int = 512, max_tiles: int = 64, seed: int = 0):
    """The tile store of one slide's sampled tissue tiles at ``model_mpp``, written if needed.

    Args:
        slide_path: a slide file OpenSlide reads.
        store_root: folder of the stores (``<store_root>/<stem>/tiles.zarr``).
        model_mpp: resolution of the tiles (um/px), the network's.
        slide_mpp: level-0 um/px overriding (or replacing missing) slide metadata.
        tile_px: tile side at ``model_mpp`` (no halo: crops are cut inside tiles).
        max_tiles: most tissue tiles kept per slide.
        seed: which tissue tiles are kept when there are more.

    Returns:
        The complete ``TileStore``. Missing file, non-slide, no mpp, no tissue: UserError.
    """
    from wsi_ircr.slide.grid import TileGrid
    from wsi_ircr.slide.reader import open_slide, require_mpp
    from wsi_ircr.slide.run_folder import STORE_DIR, run_stem
    from wsi_ircr.slide.store import create_tile_store
    from wsi_ircr.slide.tissue import detect_tissue

    slide_path = Path(slide_path)
    with open_slide(slide_path, mpp=slide_mpp) as reader:
        grid = TileGrid(reader.dimensions_xy, require_mpp(reader), model_mpp, tile_px, 0)
        tissue = detect_tissue(reader)
        tiles = grid.tissue_tiles(tissue)
        if not tiles:
            raise UserError(f"{slide_path}: no tissue found (its tissue mask at {tissue.mpp:g} um/px is empty); "
                            "pass a slide with tissue or leave this one out of --unlabelled-slides")
        store = create_tile_store(Path(store_root) / run_stem(slide_path) / STORE_DIR, grid,
                                  sample_tiles(tiles, max_tiles, seed), fingerprint=reader.fingerprint(),
                                  slide_name=slide_path.name, overwrite=True)
        for i in store.pending():
            store.write(i, reader)
    return store


def load_slide_tiles(paths: Iterable[str | Path], store_root: str | Path, model_mpp: float, *,
                     slide_mpp: float | None = None, tile_px: int = 512, max_tiles: int = 64, seed: int = 0) -> TileSet:
    """Unlabelled tiles (uint8 (tile_px, tile_px, 3) at ``model_mpp``) of every slide in ``paths``
    (files or folders of slides), stems ``<slide stem>@r<row>c<col>``; see ``slide_tile_store``."""
    from wsi_ircr.slide.inputs import collect_slides
    from wsi_ircr.slide.run_folder import run_stem

    tiles = TileSet()
    for slide in collect_slides(paths):
        store = slide_tile_store(slide, store_root, model_mpp, slide_mpp=slide_mpp, tile_px=tile_px,
                                 max_tiles=max_tiles, seed=seed)
        for i, (r, c) in enumerate(store.tiles):
            tiles.stems.append(f"{run_stem(slide)}@r{r}c{c}")
            tiles.images.append(store.read(i))
    return tiles
