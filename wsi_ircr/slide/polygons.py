"""Instance map -> one valid polygon per nucleus, and target pixels -> level-0 (x, y).

Coordinates are pixel-EDGE coordinates: pixel (r, c) covers [c, c+1] x [r, r+1] in
(x, y), so scaling by an mpp ratio maps pixel boundaries onto pixel boundaries with no
half-pixel shift. Outlines follow marching squares at level 0.5 on the padded mask: they
pass through the midpoints of the boundary pixel edges, within 0.36 px of the exact
pixel outline (a 1-pixel nucleus is the diamond inscribed in its unit square; a simply
connected nucleus of N pixels has area N - 0.5 before simplification).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage.measure import find_contours

if TYPE_CHECKING:
    from wsi_ircr.slide.grid import TileGrid

SIMPLIFY_TOLERANCE_PX = 0.25


def _ring_area(ring_rc: np.ndarray) -> float:
    r, c = ring_rc[:, 0], ring_rc[:, 1]
    return 0.5 * abs(float(np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1))))


def _largest_polygon(geom) -> Polygon | None:
    """The exterior of the largest polygon in ``make_valid(geom)``; None if it has none."""
    valid = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    parts = [p for p in shapely.get_parts(valid) if isinstance(p, Polygon) and p.area > 0]
    if not parts:
        return None
    return Polygon(max(parts, key=lambda p: p.area).exterior)


def _outline_xy(mask: np.ndarray, offset_rc: tuple[float, float]) -> np.ndarray:
    """float64 (n, 2) closed (x, y) ring of the largest outline of a non-empty bool mask."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    rings = find_contours(padded, 0.5, fully_connected="high")
    ring_rc = rings[0] if len(rings) == 1 else max(rings, key=_ring_area)
    # find_contours works in pixel-centre coordinates of the padded array: subtract the
    # pad (1) and add 0.5 to land on pixel edges.
    return np.stack([ring_rc[:, 1] + (offset_rc[1] - 0.5), ring_rc[:, 0] + (offset_rc[0] - 0.5)], axis=1)


def _finish(polygons: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Simplify and repair an object array of raw outline polygons (vectorised)."""
    if tolerance_px > 0:
        simple = shapely.simplify(polygons, tolerance_px, preserve_topology=False)
        keep = shapely.is_valid(simple) & (shapely.area(simple) > 0)
        polygons = np.where(keep, simple, polygons)
    for i in np.flatnonzero(~shapely.is_valid(polygons)):
        polygons[i] = _largest_polygon(polygons[i])
    return polygons


def mask_polygon(mask: np.ndarray, offset_rc: tuple[float, float] = (0.0, 0.0),
                 tolerance_px: float = SIMPLIFY_TOLERANCE_PX) -> Polygon | None:
    """Outline of the largest connected part of a boolean mask as one valid polygon.

    Args:
        mask: bool (h, w).
        offset_rc: added to (row, col) of the outline, in pixels.
        tolerance_px: Douglas-Peucker tolerance in pixels; the default 0.25 removes only
            collinear points of the marching-squares outline (<= 0.5 keeps it on its pixels).

    Returns:
        A valid, non-empty, hole-free Polygon in (x, y) = (col, row) pixel-edge
        coordinates with a counter-clockwise exterior (positive signed area), or None
        when the mask is empty.
    """
    if not mask.any():
        return None
    [(_, polygon)] = instance_polygons(mask.astype(np.int32), offset_rc, tolerance_px)
    return polygon


def instance_polygons(labels: np.ndarray, offset_rc: tuple[float, float] = (0.0, 0.0),
                      tolerance_px: float = SIMPLIFY_TOLERANCE_PX) -> list[tuple[int, Polygon]]:
    """One polygon per instance, in (x, y) pixel-edge coordinates.

    Args:
        labels: int (h, w) instance map, 0 = background.
        offset_rc: (row, col) of ``labels[0, 0]`` in the output frame, e.g. a tile's
            read origin in the target image.
        tolerance_px: simplification tolerance in pixels (see ``mask_polygon``).

    Returns:
        ``[(label, Polygon), ...]`` ordered by label; each polygon valid, non-empty,
        hole-free, counter-clockwise. An instance made of several pieces keeps its largest.
    """
    labels = np.asarray(labels)
    ids, raw = [], []
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        origin_rc = (offset_rc[0] + box[0].start, offset_rc[1] + box[1].start)
        ids.append(index + 1)
        raw.append(Polygon(_outline_xy(labels[box] == index + 1, origin_rc)))
    if not raw:
        return []
    polygons = np.empty(len(raw), dtype=object)
    polygons[:] = raw
    polygons = shapely.orient_polygons(_finish(polygons, tolerance_px), exterior_cw=False)
    return [(label, p) for label, p in zip(ids, polygons) if p is not None and not p.is_empty]


def to_level0(polygon: Polygon, transform: TileGrid | tuple[float, tuple[float, float]]) -> Polygon:
    """Map a target-image polygon (x, y pixel edges) to level-0 slide pixels.

    Args:
        polygon: in target-image pixel-edge coordinates (model ``mpp``).
        transform: the ``TileGrid`` (``grid.target_to_level0_xy``: scale
            ``mpp / slide_mpp``, target edge (0, 0) = level-0 (0, 0)), or
            ``(scale, offset_xy)`` giving ``x0 = x * scale + offset_x`` (level-0 px per
            target px, and the level-0 position of target pixel edge (0, 0)).

    Returns:
        The polygon in level-0 (x, y) pixel-edge coordinates.
    """
    if isinstance(transform, tuple):
        scale, offset_xy = float(transform[0]), np.asarray(transform[1], dtype=np.float64)
        return shapely.transform(polygon, lambda xy: xy * scale + offset_xy)
    return shapely.transform(polygon, lambda xy: transform.target_to_level0_xy(xy[:, ::-1]))
