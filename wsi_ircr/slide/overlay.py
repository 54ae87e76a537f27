"""Quick-look PNGs: slide thumbnail with tissue and nuclei outlines, plus full-resolution crops.

The overlay shows the thumbnail (tissue outline green, nuclei yellow, crop windows blue)
with the crops in a row below it (nuclei outlined red), so a user can check a run at a
glance without opening QuPath. Every PNG is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from shapely.geometry import Polygon, box

from wsi_ircr.io.atomic import atomic_open

TISSUE_COLOR = (0, 200, 0)
NUCLEUS_COLOR = (255, 230, 0)
CROP_NUCLEUS_COLOR = (255, 30, 30)
WINDOW_COLOR = (40, 90, 255)
GAP_PX = 8

WindowXY = tuple[int, int, int, int]


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (h, w) or (h, w, 3) array as a PNG, atomically; returns the path. zlib level
    3: the sample slide's overlay in half the time of the default 6, 6 % larger."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG", compress_level=3)
    return path


def render_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a bool (h, w) mask as a black (0) / white (255) PNG, atomically."""
    return save_png(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8), path)


def _draw_outlines(draw: ImageDraw.ImageDraw, polygons: Iterable[Polygon], scale: float,
                   offset_xy: tuple[float, float], color: tuple[int, int, int]) -> None:
    for polygon in polygons:
        xy = shapely.get_coordinates(polygon.exterior) * scale - np.asarray(offset_xy)
        if np.ptp(xy[:, 0]) < 1.5 and np.ptp(xy[:, 1]) < 1.5:
            draw.point(tuple(xy.mean(axis=0)), fill=color)  # smaller than a pixel: a dot
        else:
            draw.line([tuple(p) for p in xy], fill=color, width=1)


def _mask_outline(mask: np.ndarray, shape_rc: tuple[int, int]) -> np.ndarray:
    """bool (h, w) boundary pixels of ``mask`` resized (nearest) to ``shape_rc``."""
    resized = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(
        (shape_rc[1], shape_rc[0]), Image.Resampling.NEAREST)) > 0
    return resized & ~ndi.binary_erosion(resized, border_value=0)


class OverlayCanvas:
    """The overlay, drawn as the nuclei come (one tile at a time), then finished with the crops.

    Args:
        thumbnail: uint8 (h, w, 3) RGB of the whole slide.
        tissue_mask: bool mask of the whole slide at any resolution (resized to the
            thumbnail), or None.
        thumb_scale: thumbnail pixels per level-0 pixel (e.g. thumbnail width / slide width).
    """

    def __init__(self, thumbnail: np.ndarray, tissue_mask: np.ndarray | None, thumb_scale: float):
        thumb = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
        if tissue_mask is not None:
            outline = _mask_outline(tissue_mask, (thumb.height, thumb.width))
            pixels = np.asarray(thumb).copy()
            pixels[outline] = TISSUE_COLOR
            thumb = Image.fromarray(pixels)
        self.thumb, self.scale = thumb, thumb_scale
        self._draw = ImageDraw.Draw(thumb)

    def draw_nuclei(self, polygons_xy: Iterable[Polygon]) -> None:
        """Outline nuclei given in level-0 (x, y) on the thumbnail."""
        _draw_outlines(self._draw, polygons_xy, self.scale, (0.0, 0.0), NUCLEUS_COLOR)

    def finish(self, crops: Sequence[tuple[np.ndarray, Iterable[Polygon]]] = (),
               windows_xy: Sequence[WindowXY] = ()) -> np.ndarray:
        """uint8 (H, W, 3): the thumbnail (crop windows outlined) on top, the crops in a row
        below on white; ``crops`` / ``windows_xy`` as in ``overlay_image``."""
        s = self.scale
        for x0, y0, x1, y1 in windows_xy:
            self._draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], outline=WINDOW_COLOR, width=2)
        tiles = []
        for image, polygons in crops:
            crop = Image.fromarray(np.ascontiguousarray(image[..., :3]))
            _draw_outlines(ImageDraw.Draw(crop), polygons, 1.0, (0.0, 0.0), CROP_NUCLEUS_COLOR)
            tiles.append(crop)
        row_w = sum(t.width for t in tiles) + GAP_PX * max(len(tiles) - 1, 0)
        row_h = max((t.height for t in tiles), default=0)
        width = max(self.thumb.width, row_w)
        height = self.thumb.height + (GAP_PX + row_h if tiles else 0)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(self.thumb, (0, 0))
        x = 0
        for tile in tiles:
            canvas.paste(tile, (x, self.thumb.height + GAP_PX))
            x += tile.width + GAP_PX
        return np.asarray(canvas)


def overlay_image(thumbnail: np.ndarray, tissue_mask: np.ndarray | None, polygons_xy: Iterable[Polygon],
                  thumb_scale: float, crops: Sequence[tuple[np.ndarray, Iterable[Polygon]]] = (),
                  windows_xy: Sequence[WindowXY] = ()) -> np.ndarray:
    """Compose the overlay as an array.

    Args:
        thumbnail: uint8 (h, w, 3) RGB of the whole slide.
        tissue_mask: bool mask of the whole slide at any resolution (resized to the
            thumbnail), or None.
        polygons_xy: nuclei in level-0 (x, y); may be a generator (drawn as it comes).
        thumb_scale: thumbnail pixels per level-0 pixel (e.g. thumbnail width / slide width).
        crops: ``(image uint8 (hc, wc, 3), polygons in crop pixel coordinates)`` pairs.
        windows_xy: level-0 (x0, y0, x1, y1) of the crops, outlined on the thumbnail.

    Returns:
        uint8 (H, W, 3): the thumbnail on top, the crops in a row below on white.
    """
    canvas = OverlayCanvas(thumbnail, tissue_mask, thumb_scale)
    canvas.draw_nuclei(polygons_xy)
    return canvas.finish(crops, windows_xy)


def render_overlay(path: str | os.PathLike, thumbnail: np.ndarray, tissue_mask: np.ndarray | None,
                   polygons_xy: Iterable[Polygon], thumb_scale: float,
                   crops: Sequence[tuple[np.ndarray, Iterable[Polygon]]] = (),
                   windows_xy: Sequence[WindowXY] = ()) -> Path:
    """``overlay_image`` saved as a PNG at ``path`` (atomically); returns the path."""
    return save_png(overlay_image(thumbnail, tissue_mask, polygons_xy, thumb_scale, crops, windows_xy), path)


def pick_crop_windows(centroids_xy: np.ndarray, window_px: int, n: int,
                      slide_dimensions_xy: tuple[int, int]) -> list[WindowXY]:
    """Up to ``n`` non-overlapping square windows where nuclei are densest, densest first.

    Args:
        centroids_xy: float (N, 2) nucleus centroids, level-0 (x, y).
        window_px: window side, level-0 pixels.
        n: number of windows wanted.
        slide_dimensions_xy: (width, height) of level 0; windows stay inside it.

    Returns:
        Level-0 integer (x0, y0, x1, y1) windows, each holding at least one centroid.
    """
    pts = np.asarray(centroids_xy, np.float64).reshape(-1, 2)
    width, height = (int(v) for v in slide_dimensions_xy)
    window_px = int(min(window_px, width, height))
    if len(pts) == 0 or n < 1 or window_px < 1:
        return []
    cell = max(1, window_px // 4)
    ny, nx = -(-height // cell), -(-width // cell)
    kr, kc = min(window_px // cell, ny), min(window_px // cell, nx)  # cells per window side
    cx = np.clip((pts[:, 0] // cell).astype(np.int64), 0, nx - 1)
    cy = np.clip((pts[:, 1] // cell).astype(np.int64), 0, ny - 1)
    sat = np.zeros((ny + 1, nx + 1), np.int64)
    np.add.at(sat, (cy + 1, cx + 1), 1)
    sat = sat.cumsum(0).cumsum(1)
    # nuclei in the kr x kc cells from each start cell: all inside the window starting there
    sums = sat[kr:, kc:] - sat[:-kr, kc:] - sat[kr:, :-kc] + sat[:-kr, :-kc]
    ys = np.minimum(np.arange(sums.shape[0]) * cell, height - window_px)
    xs = np.minimum(np.arange(sums.shape[1]) * cell, width - window_px)
    windows: list[WindowXY] = []
    for _ in range(n):
        r, c = np.unravel_index(np.argmax(sums), sums.shape)
        if sums[r, c] <= 0:
            break
        x0, y0 = int(xs[c]), int(ys[r])
        windows.append((x0, y0, x0 + window_px, y0 + window_px))
        overlaps = (np.abs(ys - y0) < window_px)[:, None] & (np.abs(xs - x0) < window_px)[None, :]
        sums[overlaps] = -1
    return windows


def polygons_in_window(polygons_xy: Iterable[Polygon], window_xy: WindowXY, px_per_level0: float = 1.0
                       ) -> list[Polygon]:
    """The polygons that intersect a level-0 window, in the window's crop pixel coordinates.

    Args:
        polygons_xy: level-0 (x, y) polygons (e.g. one tile's nuclei as they are exported).
        window_xy: level-0 (x0, y0, x1, y1).
        px_per_level0: crop pixels per level-0 pixel (1 for a level-0 crop).
    """
    x0, y0, x1, y1 = window_xy
    frame = box(x0, y0, x1, y1)
    offset = np.array([x0, y0], np.float64)
    return [shapely.transform(p, lambda xy: (xy - offset) * px_per_level0)
            for p in polygons_xy if p.intersects(frame)]
