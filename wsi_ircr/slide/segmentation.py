"""The per-tile algorithm, callable without Dask: tile image -> model maps -> post-processing
-> ownership -> measurements and outlines.

``segment_tile`` is what every tile task of a slide runs; ``segment_array`` runs the same
grid and ownership rule over an image held in memory and stitches one instance map.
Both take a ``wsi_ircr.model.inference.Predictor`` (its ``predict_maps``, ``instances`` and
``mpp``); images are uint8 RGB at the predictor's mpp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from wsi_ircr.slide.crop import Box, full_box, paste
from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.stitch import TileInstances, inside_image, owned_instances, stitch_label_image, tile_instances

if TYPE_CHECKING:
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.slide.tissue import TissueMask

Maps = tuple[np.ndarray, np.ndarray | None]


def drop_touching(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``labels`` (int (h, w)) without the instances on or next to ``mask`` (bool (h, w)):
    nuclei cut by an unreadable part of the slide are left out, not kept in half."""
    from scipy.ndimage import binary_dilation

    touching = np.unique(labels[binary_dilation(mask)])
    return np.where(np.isin(labels, touching[touching > 0]), 0, labels)


def _owned(image: np.ndarray, predictor: Predictor, grid: TileGrid, tile: Tile, maps: Maps | None,
           on_truncated: Literal["raise", "drop"], labels: np.ndarray | None = None,
           unreadable: np.ndarray | None = None, box: Box | None = None) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(owned int32 (tile_px, tile_px), probability float32 (tile_px, tile_px), dropped count,
    every instance of the window int (tile_px, tile_px))."""
    if image.shape != (grid.tile_px, grid.tile_px, 3) or image.dtype != np.uint8:
        raise ValueError(f"tile {tuple(tile)}: expected uint8 ({grid.tile_px}, {grid.tile_px}, 3), "
                         f"got {image.dtype} {image.shape}")
    box = full_box(grid) if box is None else tuple(box)
    if maps is None:
        crop = image[None, box[0]:box[2], box[1]:box[3]]
        probs, hvs = predictor.predict_maps(crop) if crop.size else (np.zeros((1, 0, 0)), np.zeros((1, 2, 0, 0)))
        maps = probs[0], hvs[0]
    prob, hv = maps
    if labels is None:
        labels = predictor.instances(prob, hv)
    if box != full_box(grid):
        prob, labels = paste(prob, box, grid.tile_px), paste(labels.astype(np.int32, copy=False), box, grid.tile_px)
    if unreadable is not None:
        labels = drop_touching(labels, unreadable)
    owned, dropped = owned_instances(labels, grid, tile, on_truncated=on_truncated)
    return owned, prob, dropped, labels


def segment_tile(image: np.ndarray, predictor: Predictor, grid: TileGrid, tile: Tile, *, maps: Maps | None = None,
                 labels: np.ndarray | None = None, on_truncated: Literal["raise", "drop"] = "drop",
                 unreadable: np.ndarray | None = None, cell_px: float = 0.0, box: Box | None = None) -> TileInstances:
    """Segment one tile of ``grid`` into the nuclei it owns.

    Args:
        image: uint8 (tile_px, tile_px, 3) RGB of the tile's read window (core + halo) at
            ``grid.mpp`` (= ``predictor.mpp``).
        predictor: the model and its post-processing.
        grid: the tile grid; ``tile`` = (row, col) in it.
        maps: the tile's (probability (tile_px, tile_px), HV (2, tile_px, tile_px)) when a
            batched forward pass already computed them; None = run the network here.
        labels: int (tile_px, tile_px) instances already post-processed (the torch backend,
            on the network's device; HV may then be None); None = the predictor's
            post-processing of ``maps`` runs here.
        on_truncated: a nucleus cut by the window (halo too small): "drop" it (counted in
            ``TileInstances.dropped``) or "raise" a UserError.
        unreadable: bool (tile_px, tile_px), pixels where the slide could not be read (left
            white); nuclei on or next to them are left out. None = all read.
        cell_px: > 0 grows a cell of up to this many pixels around every owned nucleus
            (``wsi_ircr.slide.cells``; the halo must exceed ``cells.cell_halo_px``).
        box: (r0, c0, r1, c1) of the window where the network runs (``crop.tissue_box``;
            None = all of it): ``maps`` and ``labels`` then cover only the box, and no
            nucleus lies outside it.

    Returns:
        The owned nuclei in target-image coordinates (centroids, boxes, features, outlines).
    """
    owned, prob, dropped, labels = _owned(image, predictor, grid, tile, maps, on_truncated, labels, unreadable, box)
    cells = None
    if cell_px > 0:
        from wsi_ircr.slide.cells import grow_cells

        cells = grow_cells(labels, owned, cell_px)
        rows, cols = inside_image(grid, tile)
        inside = np.zeros(cells.shape, bool)
        inside[rows, cols] = True
        cells[~inside] = 0  # no cell grows into the padding beyond the slide's edge
    instances = tile_instances(owned, grid, tile, image=image, np_prob=prob, cells=cells)
    instances.dropped = dropped
    return instances


def segment_array(image: np.ndarray, predictor: Predictor, core_px: int = 896, halo_px: int = 64,
                  tissue: TissueMask | None = None) -> np.ndarray:
    """Segment an image held in memory tile by tile, with the slide pipeline's ownership rule.

    Args:
        image: uint8 (H, W, 3) RGB at ``predictor.mpp``.
        core_px, halo_px: tile core and halo in pixels (the halo must exceed the largest nucleus).
        tissue: the image's tissue mask: only its tiles are segmented, each on its box
            around the tissue (``crop.tissue_box``), as the slide pipeline does; None = all.

    Returns:
        int32 (H, W) instance map, 0 = background; ids 1..n in row-major tile order.
    """
    from wsi_ircr.slide.crop import tissue_box

    h, w = image.shape[:2]
    grid = TileGrid((w, h), predictor.mpp, predictor.mpp, core_px, halo_px)
    n = grid.tile_px
    owned = {}
    for tile in grid.all_tiles() if tissue is None else grid.tissue_tiles(tissue):
        r0, c0 = grid.read_origin_rc(tile)
        window = np.full((n, n, 3), 255, np.uint8)
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + n, h), min(c0 + n, w)
        window[rs - r0:re - r0, cs - c0:ce - c0] = image[rs:re, cs:ce]
        box = None if tissue is None else tissue_box(grid, tissue, tile)
        owned[tile] = _owned(window, predictor, grid, tile, None, "drop", box=box)[0]
    return stitch_label_image(grid, owned)
