"""Stitching by local ownership: each tile keeps the instances anchored in its core.

A tile's instance map covers its core plus a halo. An instance belongs to the tile whose
core contains its anchor (its centroid rounded to a target pixel), so every nucleus is
kept exactly once without any state shared between tiles (stardist ``big.py``
``is_responsible``). Global ids are a prefix sum of per-tile counts.

Coordinates: target-image pixels (the slide at the model ``mpp``), pixel-corner
convention as in :mod:`wsi_ircr.slide.grid`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from shapely.geometry import Polygon

from wsi_ircr.errors import UserError
from wsi_ircr.morphology import instance_features
from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.polygons import instance_polygons

log = logging.getLogger(__name__)


def _per_label_sums(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, sum of rows, sum of cols) per label 0..n-1, exact int64."""
    flat = labels.ravel()
    rows, cols = np.indices(labels.shape)
    count = np.bincount(flat, minlength=n)
    sum_r = np.bincount(flat, weights=rows.ravel(), minlength=n).astype(np.int64)
    sum_c = np.bincount(flat, weights=cols.ravel(), minlength=n).astype(np.int64)
    return count, sum_r, sum_c


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(labels, return_inverse=True)`` of a non-negative int map, as (sorted ids,
    int32 index map of the same shape), in linear time when the ids are few for the pixels."""
    if int(labels.max(initial=0)) > 4 * labels.size:
        ids, inverse = np.unique(labels, return_inverse=True)
        return ids, inverse.reshape(labels.shape).astype(np.int32)
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    lut = np.zeros(int(ids[-1]) + 1, np.int32)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    return ids, lut[labels]


def inside_image(grid: TileGrid, tile: Tile) -> tuple[slice, slice]:
    """Rows and columns of the tile window that lie inside the target image."""
    r0, c0 = grid.read_origin_rc(tile)
    h, w = grid.shape_rc
    n = grid.tile_px
    return (slice(max(0, -r0), max(0, min(n, h - r0))), slice(max(0, -c0), max(0, min(n, w - c0))))


def _edge_labels(labels: np.ndarray, grid: TileGrid, tile: Tile) -> np.ndarray:
    """Labels on a tile edge beyond which the image goes on (a truncated nucleus may hide there)."""
    r0, c0 = grid.read_origin_rc(tile)
    h, w = grid.shape_rc
    n = grid.tile_px
    rows, cols = inside_image(grid, tile)
    edges = []
    if r0 > 0:
        edges.append(labels[0, cols])
    if r0 + n < h:
        edges.append(labels[n - 1, cols])
    if c0 > 0:
        edges.append(labels[rows, 0])
    if c0 + n < w:
        edges.append(labels[rows, n - 1])
    return np.unique(np.concatenate(edges)) if edges else np.zeros(0, labels.dtype)


def owned_instances(labels_tile: np.ndarray, grid: TileGrid, tile: Tile,
                    on_truncated: Literal["raise", "drop"] = "raise") -> tuple[np.ndarray, int]:
    """Keep the instances of one tile whose anchor lies in the tile's core.

    The anchor is the centroid of the instance's pixels in the tile window, rounded half
    up to a target pixel (computed with exact integers, so two tiles that see the same
    instance agree). Core boxes are clipped to the image and partition it: an instance
    anchored outside the image (in the white padding) is owned by nobody. Pixels of owned
    instances outside the image are cleared.

    Args:
        labels_tile: int (tile_px, tile_px) instance map of the tile's read window.
        grid: the tile grid.
        tile: (row, col).
        on_truncated: an instance that reaches the core and touches a tile edge beyond
            which the image goes on is cut by the window (the halo is smaller than the
            nucleus): "raise" a UserError, or "drop" it with a warning.

    Returns:
        int32 (tile_px, tile_px): owned instances relabelled 1..n in order of centroid
        (row, col), then original label; 0 elsewhere. And the number of instances dropped
        because the window cuts them (0 unless ``on_truncated="drop"``).
    """
    labels = np.asarray(labels_tile)
    n_px = grid.tile_px
    if on_truncated not in ("raise", "drop"):
        raise ValueError(f"on_truncated must be 'raise' or 'drop', got {on_truncated!r}")
    if labels.shape != (n_px, n_px) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"tile {tile}: expected an integer ({n_px}, {n_px}) instance map, got {labels.dtype} {labels.shape}")
    if labels.min(initial=0) < 0:
        raise ValueError(f"tile {tile}: instance labels must be >= 0")
    ids, labels = _compact(labels)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        labels += 1
    n = len(ids)

    r0, c0 = grid.read_origin_rc(tile)
    count, sum_r, sum_c = _per_label_sums(labels, n)
    safe = np.maximum(count, 1)
    anchor_r = (2 * sum_r + count) // (2 * safe) + r0
    anchor_c = (2 * sum_c + count) // (2 * safe) + c0
    cr0, cc0, cr1, cc1 = grid.core_box_rc(tile)
    owned = (count > 0) & (anchor_r >= cr0) & (anchor_r < cr1) & (anchor_c >= cc0) & (anchor_c < cc1)
    owned[0] = False

    inside = np.zeros((n_px, n_px), bool)
    inside[inside_image(grid, tile)] = True
    labels = np.where(inside, labels, 0)

    in_core = np.zeros(n, bool)
    in_core[np.unique(labels[cr0 - r0:cr1 - r0, cc0 - c0:cc1 - c0])] = True
    cut = np.zeros(n, bool)
    cut[_edge_labels(labels, grid, tile)] = True
    cut[0] = False
    cut &= owned | in_core
    if cut.any():
        worst = np.flatnonzero(cut)[np.argmax(count[cut])]
        rows, cols = np.nonzero(labels == worst)
        extent = int(max(np.ptp(rows), np.ptp(cols))) + 1
        if on_truncated == "raise":
            raise UserError(
                f"halo too small: a nucleus at least {extent} px across (at {grid.mpp:g} mpp) touches the edge of "
                f"tile {tuple(tile)}; increase --halo (now {grid.halo_px} px) above the largest nucleus diameter"
            )
        log.info("tile %s: dropping %d nuclei cut by the tile edge (up to %d px; halo %d px)",
                    tuple(tile), int(cut.sum()), extent, grid.halo_px)
        dropped = int((owned & cut).sum())
        owned &= ~cut
    else:
        dropped = 0

    keep = np.flatnonzero(owned)
    order = np.lexsort((ids[keep], sum_c[keep] / count[keep], sum_r[keep] / count[keep]))
    lut = np.zeros(n, np.int32)
    lut[keep[order]] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[labels], dropped


@dataclass
class TileInstances:
    """The instances one tile owns, in target-image coordinates.

    Instance ``i`` has local id ``i + 1`` (its label in the owned map) and global id
    ``offset + i + 1`` with ``offset`` from :func:`assign_global_ids`.

    Attributes:
        tile: (row, col).
        count: number of instances n.
        centroid_rc: float64 (n, 2) target px, pixel-corner convention (pixel (r, c) has
            centre (r + 0.5, c + 0.5)), ready for ``grid.target_to_level0_xy``.
        bbox_rc: int64 (n, 4) (r0, c0, r1, c1) target px, end-exclusive.
        features: name -> float64 (n,) in target pixel units: the keys of
            :func:`wsi_ircr.morphology.instance_features` ("area" px^2, "perimeter" px,
            "solidity", "circularity", "eccentricity", "extent", "mean_intensity" 0-255)
            plus "score" (mean nucleus probability, NaN without one).
        polygons: n outlines in target pixel-edge (x, y) coordinates.
        dropped: nuclei this tile owned but dropped because its window cut them (the halo
            is smaller than they are).
        cell_polygons / cell_features: with cells (``wsi_ircr.slide.cells``), the n cell
            outlines (target pixel-edge (x, y)) and ``cells.cell_features``; else None / {}.
        unreadable_xywh: level-0 (x, y, width, height) boxes of broken slide tiles the
            tile's read met (left white), recorded with the result for the slide's summary.
    """

    tile: Tile
    count: int
    centroid_rc: np.ndarray
    bbox_rc: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    polygons: list[Polygon] = field(default_factory=list)
    dropped: int = 0
    cell_polygons: list[Polygon] | None = None
    cell_features: dict[str, np.ndarray] = field(default_factory=dict)
    unreadable_xywh: tuple = ()


def tile_instances(owned: np.ndarray, grid: TileGrid, tile: Tile, image: np.ndarray | None = None,
                   np_prob: np.ndarray | None = None, cells: np.ndarray | None = None) -> TileInstances:
    """Measure and outline the owned instances of one tile.

    Args:
        owned: int32 (tile_px, tile_px) from :func:`owned_instances` (labels 1..n).
        grid: the tile grid.
        tile: (row, col).
        image: optional uint8 (tile_px, tile_px, 3) RGB of the tile (for "mean_intensity").
        np_prob: optional float (tile_px, tile_px) nucleus probability (for "score").
        cells: optional int32 (tile_px, tile_px) cells of the owned instances (same ids,
            ``cells.grow_cells``): their outlines and ``cells.cell_features`` are added.

    Returns:
        TileInstances in target-image coordinates.
    """
    origin_rc = np.asarray(grid.read_origin_rc(tile))
    features = instance_features(owned, image)
    labels = features.pop("label")
    n = len(labels)
    if np_prob is not None:
        flat = owned.ravel()
        sums = np.bincount(flat, weights=np.asarray(np_prob, np.float64).ravel(), minlength=n + 1)
        features["score"] = sums[labels] / np.maximum(np.bincount(flat, minlength=n + 1)[labels], 1)
    else:
        features["score"] = np.full(n, np.nan)
    centroid_rc = features.pop("centroid_rc") + origin_rc + 0.5
    bbox_rc = features.pop("bbox_rc") + np.tile(origin_rc, 2)
    outlines = dict(instance_polygons(owned, offset_rc=tuple(origin_rc)))
    cell_outlines = None if cells is None else dict(instance_polygons(cells, offset_rc=tuple(origin_rc)))
    keep = np.array([label in outlines and (cell_outlines is None or label in cell_outlines) for label in labels], bool)
    if not keep.all():
        log.warning("tile %s: %d instances without a valid outline dropped", tuple(tile), int((~keep).sum()))
    cell_features = {}
    if cells is not None:
        from wsi_ircr.slide.cells import cell_features as measure_cells

        cell_features = {k: np.asarray(v, np.float64) for k, v in measure_cells(owned, cells, image, labels[keep]).items()}
    return TileInstances(
        tile=(int(tile[0]), int(tile[1])),
        count=int(keep.sum()),
        centroid_rc=centroid_rc[keep],
        bbox_rc=bbox_rc[keep],
        features={k: np.asarray(v, np.float64)[keep] for k, v in features.items()},
        polygons=[outlines[label] for label in labels[keep]],
        cell_polygons=None if cells is None else [cell_outlines[label] for label in labels[keep]],
        cell_features=cell_features,
    )


def assign_global_ids(counts_per_tile: Mapping[Tile, int], order: Iterable[Tile] | None = None) -> dict[Tile, int]:
    """Offsets such that tile ``t``'s instance ``i`` (1-based) has global id ``offset[t] + i``.

    Args:
        counts_per_tile: number of owned instances per tile.
        order: the tiles in id order; default row-major (sorted (row, col)). Must list
            every tile of ``counts_per_tile`` once.

    Returns:
        tile -> offset; ids run 1..sum(counts) with no gaps, independent of the order in
        which tiles were processed.
    """
    tiles = sorted(counts_per_tile) if order is None else [tuple(t) for t in order]
    if len(set(tiles)) != len(tiles) or set(tiles) != set(map(tuple, counts_per_tile)):
        raise ValueError("order must list every tile of counts_per_tile exactly once")
    counts = np.array([int(counts_per_tile[t]) for t in tiles], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    return {t: int(o) for t, o in zip(tiles, offsets)}


def stitch_label_image(grid: TileGrid, owned_tiles: Mapping[Tile, np.ndarray]) -> np.ndarray:
    """Paste owned instance maps into one target-size instance map (images that fit in memory).

    Args:
        grid: the tile grid.
        owned_tiles: tile -> int32 (tile_px, tile_px) owned labels from :func:`owned_instances`.

    Returns:
        int32 (H, W) = ``grid.shape_rc`` with global ids from :func:`assign_global_ids`;
        where two owned instances overlap (inconsistent tiles) the larger id wins, so the
        result never depends on the order of ``owned_tiles``.
    """
    offsets = assign_global_ids({t: int(np.max(m, initial=0)) for t, m in owned_tiles.items()})
    out = np.zeros(grid.shape_rc, np.int32)
    for tile, owned in owned_tiles.items():
        rows, cols = inside_image(grid, tile)
        r0, c0 = grid.read_origin_rc(tile)
        part = owned[rows, cols]
        target = out[rows.start + r0:rows.stop + r0, cols.start + c0:cols.stop + c0]
        np.maximum(target, np.where(part > 0, part + offsets[tuple(tile)], 0), out=target)
    return out
