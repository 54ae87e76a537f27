"""Where in a tile the network runs: the box around the tissue mask's pixels in the tile's
read window, widened by a context margin and aligned to the network's stride, so the glass
of a tissue tile costs no forward pass and no post-processing.

On the bundled sample slide the boxes hold about 71 % of the pixels of its tissue tiles
(benchmarks/cpu.md). The mask is the dilated tissue mask (or the ``--roi`` regions) that
chose the tiles, so a nucleus the mask covers sees at least ``CONTEXT_PX`` of image around
it; the box's origin lies on the network's stride from the tile's, so the features inside
are the ones the whole tile gives, except near the box's edge (glass).

Boxes are ``(r0, c0, r1, c1)`` tile-window pixels (row-major, end-exclusive); an empty box
(r0 == r1) means no tissue in the window: no forward pass, no nuclei.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.tissue import TissueMask

Box = tuple[int, int, int, int]
CONTEXT_PX = 64  # image kept around the mask's pixels (model pixels)
STRIDE_PX = 16  # box corners lie on this grid of the tile window (the network's total stride)


def full_box(grid: TileGrid) -> Box:
    """The whole read window of a tile."""
    return (0, 0, grid.tile_px, grid.tile_px)


def tissue_box(grid: TileGrid, tissue: TissueMask, tile: Tile, context_px: int = CONTEXT_PX,
               stride_px: int = STRIDE_PX) -> Box:
    """The box of ``tile``'s read window that holds every tissue pixel of ``tissue`` in it,
    widened by ``context_px`` and rounded outwards to multiples of ``stride_px`` (clipped to
    the window); ``(0, 0, 0, 0)`` when the window holds no tissue."""
    n = grid.tile_px
    k = grid.mpp / tissue.mpp  # mask pixels per model pixel
    r0, c0 = grid.read_origin_rc(tile)
    mh, mw = tissue.mask.shape
    m_r0, m_c0 = max(0, math.floor(r0 * k)), max(0, math.floor(c0 * k))
    m_r1, m_c1 = min(mh, math.ceil((r0 + n) * k)), min(mw, math.ceil((c0 + n) * k))
    block = tissue.mask[m_r0:m_r1, m_c0:m_c1] if m_r1 > m_r0 and m_c1 > m_c0 else np.zeros((0, 0), bool)
    rows, cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
    if not len(rows):
        return (0, 0, 0, 0)

    def span(first: int, last: int, origin: int) -> tuple[int, int]:
        """Mask pixels first..last (block index) -> window pixels, widened and aligned."""
        lo = math.floor(first / k) - origin - context_px
        hi = math.ceil((last + 1) / k) - origin + context_px
        return max(0, lo // stride_px * stride_px), min(n, -(-hi // stride_px) * stride_px)

    (br0, br1), (bc0, bc1) = span(rows[0] + m_r0, rows[-1] + m_r0, r0), span(cols[0] + m_c0, cols[-1] + m_c0, c0)
    if br1 <= br0 or bc1 <= bc0:
        return (0, 0, 0, 0)
    return (br0, bc0, br1, bc1)


def tissue_boxes(grid: TileGrid, tissue: TissueMask, tiles: Sequence[Tile]) -> list[Box]:
    """``tissue_box`` of every tile, in the order of ``tiles``."""
    return [tissue_box(grid, tissue, tile) for tile in tiles]


def box_area(box: Box) -> int:
    """Pixels of ``box``."""
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def paste(crop: np.ndarray, box: Box, side_px: int) -> np.ndarray:
    """``crop`` (h, w, ...) placed at ``box`` in zeros of (side_px, side_px, ...), its dtype."""
    out = np.zeros((side_px, side_px, *crop.shape[2:]), crop.dtype)
    out[box[0]:box[2], box[1]:box[3]] = crop
    return out


def predict_in_boxes(predictor, images: np.ndarray, boxes: Sequence[Box]) -> list[tuple]:
    """``predictor.predict_batch`` on each tile's box of uint8 (N, H, W, 3) ``images``; tiles
    whose boxes have one shape share a forward batch.

    Returns, per tile, (probability (h, w), HV (2, h, w) or None, labels (h, w) or None) of
    its box (``Predictor.predict_batch``'s outputs for one tile); empty arrays for an empty box.
    """
    out: list[tuple | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        groups.setdefault((r1 - r0, c1 - c0), []).append(k)
    for (h, w), members in groups.items():
        if h <= 0 or w <= 0:
            for k in members:
                out[k] = (np.zeros((0, 0), np.float32), np.zeros((2, 0, 0), np.float32), None)
            continue
        crops = np.stack([images[k, boxes[k][0]:boxes[k][2], boxes[k][1]:boxes[k][3]] for k in members])
        prob, hv, labels = predictor.predict_batch(crops)
        for j, k in enumerate(members):
            out[k] = (prob[j], None if hv is None else hv[j], None if labels is None else labels[j])
    return out
