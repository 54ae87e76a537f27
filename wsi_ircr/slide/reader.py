"""Whole-slide readers (OpenSlide; a numpy array for tests) and resampling to a target mpp.

Coordinates. Level-0 slide coordinates are continuous ``(x, y)`` with the pixel-corner
convention: level-0 pixel ``(i, j)`` (column ``i``, row ``j``) covers ``[i, i+1) x [j, j+1)``
and its centre is ``(i + 0.5, j + 0.5)``. A pixel ``k`` of pyramid level ``L`` (downsample
``d``) covers level-0 ``[k*d, (k+1)*d)`` (OpenSlide's model). An image resampled to
``target_mpp`` whose top-left corner is at level-0 ``origin_xy = (x0, y0)`` has pixel
``(r, c)`` covering level-0 ``[x0 + c*s, x0 + (c+1)*s) x [y0 + r*s, y0 + (r+1)*s)`` with
``s = target_mpp / slide_mpp`` (level-0 pixels per output pixel).

Slides whose OpenSlide properties give a bounding box (``openslide.bounds-x/-y/-width/
-height``: MIRAX, Leica, Ventana, ...) are read as QuPath reads them: level-0 ``(0, 0)`` is
OpenSlide's ``(bounds-x, bounds-y)`` and the size is the box's, so exported coordinates
land on the same pixels in QuPath (``bounds_offset_xy`` records the shift).

Broken tiles. A slide may hold a few tiles that cannot be decoded (a damaged copy, a scanner
fault). A read of OpenSlide that fails is read again piece by piece along the level's tile
grid; the pieces that still fail are left white (background) and their level-0 boxes are
recorded in ``reader.unreadable_xywh`` (``unreadable_boxes``), so callers can leave them out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_ircr.errors import UserError

log = logging.getLogger(__name__)

# Level-0 mpp outside this range is a placeholder, not a scan: TIFF defaults of 72, 300 and
# 600 dpi are 352.8, 84.7 and 42.3 um/px, while a 1x scan is about 10 um/px.
PLAUSIBLE_MPP = (0.01, 10.0)
BOUNDS_KEYS = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")
# Largest level window (pixels per side) read at once by read_scaled; bigger reads are split.
MAX_READ_PX = 4096
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_TILE_PX = 256  # the read grid of levels whose tile size OpenSlide does not report


@runtime_checkable
class SlideReader(Protocol):
    """A multi-resolution RGB slide. Sizes are ``(width, height)``; locations level-0 ``(x, y)``."""

    path: Path
    dimensions_xy: tuple[int, int]
    mpp: float | None
    mpp_source: str
    level_dimensions_xy: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    vendor: str | None
    objective_power: float | None
    associated_images: tuple[str, ...]
    properties: Mapping[str, str]
    bounds_offset_xy: tuple[int, int]

    def read_region(
        self, location_xy: tuple[int, int], level: int, size_xy: tuple[int, int]
    ) -> np.ndarray:
        """uint8 (h, w, 3) RGB of ``level`` whose top-left is level-0 ``location_xy``.

        Transparent pixels are composited onto white; pixels outside the slide are white.
        """

    def thumbnail(self, max_size_px: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the whole slide, longer side ``max_size_px`` (never upscaled)."""

    def fingerprint(self) -> str:
        """Stable hex digest of the slide content (independent of the file's name and folder)."""

    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> SlideReader: ...

    def __exit__(self, *exc) -> None: ...


def require_mpp(reader: SlideReader) -> float:
    """The slide's level-0 mpp, or a ``UserError`` telling the user to pass ``--mpp``."""
    if reader.mpp is not None:
        return reader.mpp
    detail = f" ({reader.mpp_source[6:]})" if reader.mpp_source.startswith("none: ") else ""
    raise UserError(
        f"{reader.path.name} has no mpp metadata{detail}; "
        "pass --mpp 0.25 (microns per pixel at level 0)"
    )


def level_mpp(reader: SlideReader, level: int) -> float | None:
    """Microns per pixel of pyramid ``level`` (None when the slide has no mpp)."""
    return None if reader.mpp is None else reader.mpp * reader.level_downsamples[level]


def _check_override_mpp(mpp: float | None, path: Path) -> float | None:
    if mpp is None:
        return None
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise UserError(
            f"{path.name}: --mpp {mpp!r} is not a positive number; "
            "pass the level-0 microns per pixel, e.g. --mpp 0.25"
        )
    return float(mpp)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 4) straight-alpha RGBA -> uint8 (h, w, 3) RGB over white."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _mpp_from_properties(props: Mapping[str, str], name: str) -> tuple[float | None, str]:
    """Level-0 mpp and its source from OpenSlide properties (OpenSlide keys, then TIFF tags)."""
    mpp, source, key = None, "none", None
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        mx = my = None
    if mx and my and mx > 0 and my > 0:
        if abs(mx - my) > 0.01 * max(mx, my):
            log.warning("%s: mpp-x %.5g differs from mpp-y %.5g; using their mean", name, mx, my)
        mpp, source, key = (mx + my) / 2, "metadata: openslide.mpp-x", "openslide.mpp-x"
    else:
        unit = props.get("tiff.ResolutionUnit", "").lower()
        um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        try:
            rx, ry = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
        except (KeyError, ValueError):
            rx = ry = 0.0
        if um_per_unit and rx > 0 and ry > 0:
            mpp = um_per_unit * (1 / rx + 1 / ry) / 2
            source, key = "tiff resolution", "tiff.XResolution"
    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        log.info("%s: ignoring implausible level-0 mpp %.4g from %s", name, mpp, key)  # mpp_source says it
        return None, f"none: ignored implausible {key} = {mpp:.4g} um/px, a placeholder resolution"
    return mpp, source


def _bounds_xywh(props: Mapping[str, str]) -> tuple[int, int, int, int] | None:
    """OpenSlide's bounding box (x, y, width, height) when all four properties are integers
    (QuPath's rule for applying it), else None."""
    try:
        x, y, w, h = (int(props[k]) for k in BOUNDS_KEYS)
    except (KeyError, ValueError):
        return None
    return (x, y, w, h) if w > 0 and h > 0 else None


def _check_slide_path(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file; check the slide path")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a slide file; pass the slide file itself (e.g. {path}/slide.svs)")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied; make the slide file readable (chmod +r) or copy it")


def _unreadable_message(path: Path, fmt: str | None, reason: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if fmt is not None:
        return (
            f"{path}: OpenSlide recognises a {fmt} slide but cannot open it ({reason}); "
            "the file may be incomplete or an unsupported variant: re-copy it or convert it to a pyramidal TIFF"
        )
    if head in _TIFF_MAGIC:
        return (
            f"{path}: a TIFF file that OpenSlide cannot read as a slide (truncated, corrupt, or not a tiled pyramid); "
            "re-copy the file or convert it to a tiled pyramidal TIFF/SVS"
        )
    return (
        f"{path}: not a whole-slide image format OpenSlide reads (see openslide.org/formats); "
        "pass a slide file (.svs, .tiff, .ndpi, .mrxs, .scn, .dcm, ...)"
    )


class OpenSlideReader:
    """A slide read with OpenSlide (every format OpenSlide supports).

    ``mpp`` (level-0 microns per pixel) overrides the metadata. Pickles as its path and
    override and reopens the file on unpickling, so it can be shipped to Dask workers.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_override = _check_override_mpp(mpp, self.path)
        _check_slide_path(self.path)
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(self.path))
        self._lock = threading.Lock()
        self.unreadable_xywh: set[tuple[int, int, int, int]] = set()
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as e:
            reason = str(e).removeprefix(f"Reading {self.path}: ")
            raise UserError(_unreadable_message(self.path, fmt, reason)) from None
        props = self._slide.properties
        self.properties: Mapping[str, str] = dict(props)
        self.dimensions_xy = tuple(self._slide.dimensions)
        self.level_dimensions_xy = tuple(tuple(d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.bounds_offset_xy = (0, 0)
        bounds = _bounds_xywh(self.properties)
        if bounds is not None:
            x, y, w, h = bounds
            self.bounds_offset_xy = (x, y)
            self.dimensions_xy = (w, h)
            self.level_dimensions_xy = tuple((max(1, math.ceil(w / d)), max(1, math.ceil(h / d)))
                                             for d in self.level_downsamples)
        self.vendor = props.get("openslide.vendor")
        try:
            self.objective_power = float(props["openslide.objective-power"])
        except (KeyError, ValueError):
            self.objective_power = None
        self.associated_images = tuple(sorted(self._slide.associated_images))
        if self._mpp_override is not None:
            self.mpp, self.mpp_source = self._mpp_override, "override"
        else:
            self.mpp, self.mpp_source = _mpp_from_properties(props, self.path.name)
        # A small read of the coarsest level catches damaged files at open time.
        last = len(self.level_dimensions_xy) - 1
        self.read_region((0, 0), last, (min(8, self.level_dimensions_xy[last][0]), 1))

    def read_region(
        self, location_xy: tuple[int, int], level: int, size_xy: tuple[int, int]
    ) -> np.ndarray:
        """uint8 (h, w, 3) RGB of ``level`` at level-0 ``location_xy`` (within the bounds, if
        any); outside the slide is white."""
        import openslide

        if not 0 <= level < len(self.level_downsamples):
            raise ValueError(f"level {level} out of range 0..{len(self.level_downsamples) - 1}")
        w, h = int(size_xy[0]), int(size_xy[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size_xy must be positive, got {size_xy}")
        x, y = int(location_xy[0]) + self.bounds_offset_xy[0], int(location_xy[1]) + self.bounds_offset_xy[1]
        handle = self._slide
        try:
            rgba = np.asarray(handle.read_region((x, y), level, (w, h)))
        except openslide.OpenSlideError:
            self._replace_handle(handle)
            rgba = self._read_around((x, y), level, (w, h))
        return _composite_on_white(rgba)

    def _replace_handle(self, failed) -> None:
        """Reopen the shared OpenSlide handle after a failed read (OpenSlide leaves a handle in
        an error state after one), unless another thread already did. The failed handle is
        not closed here: other threads may still be reading it; it closes once unreferenced."""
        with self._lock:
            if self._slide is failed:
                self._slide = self._open_handle()

    def _open_handle(self):
        """A new OpenSlide handle of the file; a UserError when it cannot be opened any more."""
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as e:
            raise UserError(f"{self.path}: cannot reopen the slide after a failed read ({e}); "
                            "the file is corrupt or was removed: re-copy or re-export it") from None

    def _tile_px(self, level: int) -> tuple[int, int]:
        """The (width, height) of the stored tiles of ``level`` (``DEFAULT_TILE_PX`` when unknown)."""
        try:
            return (int(self.properties[f"openslide.level[{level}].tile-width"]),
                    int(self.properties[f"openslide.level[{level}].tile-height"]))
        except (KeyError, ValueError):
            return DEFAULT_TILE_PX, DEFAULT_TILE_PX

    def _read_around(self, location_xy: tuple[int, int], level: int, size_xy: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w, 4) RGBA of a region whose read failed, read again on a private handle:
        a region that fails is split at the level's tile grid line nearest its middle, down to
        single tiles; those stay transparent (white) and are added to ``unreadable_xywh``.
        ``location_xy`` is in OpenSlide's level-0 coordinates (bounds offset included)."""
        import openslide

        d = self.level_downsamples[level]
        tile_w, tile_h = self._tile_px(level)
        x0, y0 = location_xy[0] / d, location_xy[1] / d  # the region's corner in level pixels
        w, h = size_xy
        out = np.zeros((h, w, 4), np.uint8)
        handle = self._open_handle()
        pending = [(0, 0, w, h)]  # pieces (c, r, w, h) of the region, in its pixels
        try:
            while pending:
                c, r, pw, ph = pending.pop()
                try:
                    loc = (round((x0 + c) * d), round((y0 + r) * d))
                    out[r:r + ph, c:c + pw] = np.asarray(handle.read_region(loc, level, (pw, ph)))
                    continue
                except openslide.OpenSlideError:
                    handle.close()
                    handle = self._open_handle()
                cut_x = _grid_cut(x0 + c, pw, tile_w)
                cut_y = _grid_cut(y0 + r, ph, tile_h)
                if cut_x is None and cut_y is None:
                    self._record_unreadable(level, math.floor(x0 + c) // tile_w, math.floor(y0 + r) // tile_h)
                elif cut_x is not None and (cut_y is None or pw >= ph):
                    k = int(round(cut_x - (x0 + c)))
                    pending += [(c, r, k, ph), (c + k, r, pw - k, ph)]
                else:
                    k = int(round(cut_y - (y0 + r)))
                    pending += [(c, r, pw, k), (c, r + k, pw, ph - k)]
        finally:
            handle.close()
        return out

    def _record_unreadable(self, level: int, col: int, row: int) -> None:
        """Add stored tile (``col``, ``row``) of ``level`` to ``unreadable_xywh`` as a level-0 box
        of this reader's coordinates (within the bounds), clipped to the slide."""
        d = self.level_downsamples[level]
        tile_w, tile_h = self._tile_px(level)
        x0 = max(0, math.floor(col * tile_w * d) - self.bounds_offset_xy[0])
        y0 = max(0, math.floor(row * tile_h * d) - self.bounds_offset_xy[1])
        x1 = min(self.dimensions_xy[0], math.ceil((col + 1) * tile_w * d) - self.bounds_offset_xy[0])
        y1 = min(self.dimensions_xy[1], math.ceil((row + 1) * tile_h * d) - self.bounds_offset_xy[1])
        if x1 > x0 and y1 > y0:
            with self._lock:
                self.unreadable_xywh.add((x0, y0, x1 - x0, y1 - y0))

    def thumbnail(self, max_size_px: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the whole slide with longer side ``max_size_px`` (area-averaged)."""
        return thumbnail(self, max_size_px)

    def fingerprint(self) -> str:
        """sha256 (32 hex) of file size, vendor, level sizes and OpenSlide's quickhash-1."""
        keys = ("openslide.vendor", "openslide.quickhash-1", "openslide.mpp-x", "openslide.mpp-y",
                "openslide.objective-power")
        data = {
            "size": self.path.stat().st_size,
            "levels": self.level_dimensions_xy,
            "properties": {k: self.properties.get(k) for k in keys},
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "mpp": self._mpp_override}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], mpp=state["mpp"])

    def __repr__(self) -> str:
        return f"OpenSlideReader({str(self.path)!r}, mpp={self.mpp})"


def _grid_cut(start: float, size: int, tile: int) -> float | None:
    """The tile grid line (a multiple of ``tile``, level pixels) at least one pixel inside
    ``(start, start + size)`` nearest its middle; None when the span lies within one tile."""
    lines = [k * tile for k in range(math.floor(start / tile) + 1, math.ceil((start + size) / tile))
             if 1 <= k * tile - start <= size - 1]
    if not lines:
        return None
    return min(lines, key=lambda v: abs(v - (start + size / 2)))


def unreadable_boxes(reader) -> set[tuple[int, int, int, int]]:
    """Level-0 ``(x, y, width, height)`` boxes of ``reader`` found unreadable so far (empty for
    readers that cannot fail)."""
    return set(getattr(reader, "unreadable_xywh", ()))


def unreadable_mask(boxes_xywh, origin_xy: tuple[float, float], size_rc: tuple[int, int], scale: float,
                    margin_px: int = 2) -> np.ndarray | None:
    """bool (h, w) of the output pixels of a read (``read_scaled``'s ``origin_xy``, ``size_rc``,
    ``scale``) within ``margin_px`` of an unreadable box (resampling blends a pixel or two of
    white into its neighbours); None when no box touches the read."""
    h, w = size_rc
    mask = None
    for bx, by, bw, bh in boxes_xywh:
        c0 = math.floor((bx - origin_xy[0]) / scale) - margin_px
        r0 = math.floor((by - origin_xy[1]) / scale) - margin_px
        c1 = math.ceil((bx + bw - origin_xy[0]) / scale) + margin_px
        r1 = math.ceil((by + bh - origin_xy[1]) / scale) + margin_px
        if c1 <= 0 or r1 <= 0 or c0 >= w or r0 >= h:
            continue
        if mask is None:
            mask = np.zeros((h, w), bool)
        mask[max(r0, 0):r1, max(c0, 0):c1] = True
    return mask


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> SlideReader:
    """Open a slide file; ``mpp`` overrides its level-0 microns per pixel. Bad input -> UserError."""
    return OpenSlideReader(path, mpp=mpp)


def downsample_2x(image: np.ndarray) -> np.ndarray:
    """2x2 area mean of uint8 (H, W, 3) -> (ceil(H/2), ceil(W/2), 3); odd edges are replicated."""
    h, w = image.shape[0], image.shape[1]
    padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    blocks = padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2, 3)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


class ArrayReader:
    """The ``SlideReader`` interface over an in-memory uint8 (H, W, 3) RGB image.

    Level ``k`` is the image downsampled ``2**k`` times by 2x2 area means. ``mpp`` may be
    None (to test the missing-mpp path).
    """

    def __init__(
        self,
        image_rgb: np.ndarray,
        mpp: float | None,
        n_levels: int = 1,
        path: str | os.PathLike = "array.npy",
    ):
        image = np.asarray(image_rgb)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image_rgb must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        if n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        self.path = Path(path)
        self.mpp = _check_override_mpp(mpp, self.path)
        self.mpp_source = "array" if mpp is not None else "none"
        self._levels = [np.ascontiguousarray(image)]
        for _ in range(1, n_levels):
            self._levels.append(downsample_2x(self._levels[-1]))
        self.dimensions_xy = (image.shape[1], image.shape[0])
        self.level_dimensions_xy = tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)
        self.level_downsamples = tuple(float(2**k) for k in range(n_levels))
        self.vendor = "array"
        self.objective_power = None
        self.associated_images: tuple[str, ...] = ()
        self.properties: Mapping[str, str] = {}
        self.bounds_offset_xy = (0, 0)
        self._fingerprint: str | None = None

    def read_region(
        self, location_xy: tuple[int, int], level: int, size_xy: tuple[int, int]
    ) -> np.ndarray:
        """uint8 (h, w, 3) of ``level`` at level-0 ``location_xy`` (floored to the level's grid)."""
        if not 0 <= level < len(self._levels):
            raise ValueError(f"level {level} out of range 0..{len(self._levels) - 1}")
        w, h = int(size_xy[0]), int(size_xy[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size_xy must be positive, got {size_xy}")
        d = int(self.level_downsamples[level])
        x, y = int(location_xy[0]) // d, int(location_xy[1]) // d
        src = self._levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0 = max(x, 0), max(y, 0)
        sx1, sy1 = min(x + w, src.shape[1]), min(y + h, src.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = src[sy0:sy1, sx0:sx1]
        return out

    def thumbnail(self, max_size_px: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the whole image with longer side ``max_size_px``."""
        return thumbnail(self, max_size_px)

    def fingerprint(self) -> str:
        """sha256 (32 hex) of the pixels, shape, levels and mpp (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([self._levels[0].shape, len(self._levels), self.mpp]).encode())
            h.update(self._levels[0].tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> ArrayReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ArrayReader({self.dimensions_xy[0]}x{self.dimensions_xy[1]}, mpp={self.mpp})"


# ---------------------------------------------------------------------------------------
# Resampling


def _axis_weights(n_out: int, start: float, step: float, n_in: int):
    """Sparse (n_out, n_in) float32 weights mapping input pixels to output pixels on one axis.

    Output pixel ``j`` covers input ``[start + j*step, start + (j+1)*step)`` (input pixel ``p``
    covers ``[p, p+1)``). ``step >= 1``: exact area average; ``step < 1``: bilinear
    interpolation at the output pixel centre. Taps outside the input are clamped to its edge.
    """
    from scipy import sparse

    j = np.arange(n_out, dtype=np.float64)
    if step >= 1:
        lo = start + j * step
        hi = lo + step
        taps = int(math.ceil(step)) + 1
        p = np.floor(lo)[:, None] + np.arange(taps)[None, :]
        w = np.clip(np.minimum(hi[:, None], p + 1) - np.maximum(lo[:, None], p), 0, None) / step
    else:
        t = start + (j + 0.5) * step - 0.5
        p0 = np.floor(t)
        f = t - p0
        p = np.stack([p0, p0 + 1], axis=1)
        w = np.stack([1 - f, f], axis=1)
    rows = np.repeat(np.arange(n_out), p.shape[1])
    cols = np.clip(p, 0, n_in - 1).astype(np.int64).ravel()
    return sparse.csr_matrix(
        (w.ravel().astype(np.float32), (rows, cols)), shape=(n_out, n_in), dtype=np.float32
    )


def _resample(buf: np.ndarray, wy, wx) -> np.ndarray:
    """Apply separable weights: uint8 (h, w, 3) -> uint8 (wy.shape[0], wx.shape[0], 3)."""
    h, w, _ = buf.shape
    oh, ow = wy.shape[0], wx.shape[0]
    tmp = wy @ buf.reshape(h, w * 3).astype(np.float32)  # (oh, w*3)
    tmp = tmp.reshape(oh, w, 3).transpose(1, 0, 2).reshape(w, oh * 3)
    out = (wx @ tmp).reshape(ow, oh, 3).transpose(1, 0, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def best_level_for_scale(reader: SlideReader, scale: float) -> int:
    """The coarsest level whose downsample is <= ``scale * 1.01`` (level 0 if none is)."""
    ok = [i for i, d in enumerate(reader.level_downsamples) if d <= scale * 1.01]
    return max(ok, key=lambda i: reader.level_downsamples[i]) if ok else 0


def _is_integral(v: float) -> bool:
    return abs(v - round(v)) < 1e-6


def _read_scaled_block(
    reader: SlideReader, origin_xy: tuple[float, float], size_rc: tuple[int, int], scale: float, level: int
) -> np.ndarray:
    h, w = size_rc
    d = reader.level_downsamples[level]
    step = scale / d  # level pixels per output pixel
    x0, y0 = float(origin_xy[0]), float(origin_xy[1])
    if abs(step - 1) < 1e-9 and _is_integral(x0) and _is_integral(y0) and _is_integral(x0 / d) and _is_integral(y0 / d):
        return reader.read_region((round(x0), round(y0)), level, (w, h))
    margin = 2
    lx0 = math.floor(x0 / d) - margin
    ly0 = math.floor(y0 / d) - margin
    lw = math.ceil((x0 + w * scale) / d) + margin - lx0 + 1
    lh = math.ceil((y0 + h * scale) / d) + margin - ly0 + 1
    loc_x, loc_y = round(lx0 * d), round(ly0 * d)  # buffer pixel 0 covers level-0 [loc, loc + d)
    buf = reader.read_region((loc_x, loc_y), level, (lw, lh))
    wx = _axis_weights(w, (x0 - loc_x) / d, step, lw)
    wy = _axis_weights(h, (y0 - loc_y) / d, step, lh)
    return _resample(buf, wy, wx)


def read_scaled(
    reader: SlideReader, origin_xy: tuple[float, float], size_rc: tuple[int, int], scale: float
) -> np.ndarray:
    """uint8 (h, w, 3): output pixel (r, c) covers level-0 ``[x0 + c*scale, x0 + (c+1)*scale)``
    x ``[y0 + r*scale, ...)``; ``scale`` is level-0 pixels per output pixel.

    Reads the coarsest level not coarser than ``scale`` (1% tolerance), then area-averages
    (downsampling) or bilinearly interpolates (upsampling). Integer-aligned reads at the
    level's own resolution are plain copies. Large outputs are read in blocks.
    """
    h, w = int(size_rc[0]), int(size_rc[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size_rc must be positive, got {size_rc}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    level = best_level_for_scale(reader, scale)
    step = scale / reader.level_downsamples[level]
    block = max(1, int(MAX_READ_PX / max(step, 1.0)))
    if h <= block and w <= block:
        return _read_scaled_block(reader, origin_xy, (h, w), scale, level)
    out = np.empty((h, w, 3), np.uint8)
    x0, y0 = origin_xy
    for r in range(0, h, block):
        for c in range(0, w, block):
            bh, bw = min(block, h - r), min(block, w - c)
            out[r : r + bh, c : c + bw] = _read_scaled_block(
                reader, (x0 + c * scale, y0 + r * scale), (bh, bw), scale, level
            )
    return out


def read_at_mpp(
    reader: SlideReader, origin_xy: tuple[float, float], size_rc: tuple[int, int], target_mpp: float
) -> np.ndarray:
    """uint8 (size_rc[0], size_rc[1], 3) RGB at ``target_mpp`` whose top-left corner is at
    level-0 ``origin_xy`` (float, pixel-corner convention, see the module docstring).

    Output pixel (r, c) has its centre at level-0 ``(x0 + (c + 0.5)*s, y0 + (r + 0.5)*s)``,
    ``s = target_mpp / slide_mpp``. Reads the pyramid level with the largest mpp <=
    ``target_mpp * 1.01`` and resamples exactly to ``target_mpp`` (area average down,
    bilinear up). Pixels outside the slide are white.
    """
    slide_mpp = require_mpp(reader)
    if not target_mpp > 0:
        raise ValueError(f"target_mpp must be positive, got {target_mpp}")
    return read_scaled(reader, origin_xy, size_rc, target_mpp / slide_mpp)


def thumbnail(reader: SlideReader, max_size_px: int) -> np.ndarray:
    """uint8 RGB of the whole slide, longer side ``max_size_px`` (never larger than level 0)."""
    if max_size_px < 1:
        raise ValueError(f"max_size_px must be >= 1, got {max_size_px}")
    w0, h0 = reader.dimensions_xy
    scale = max(1.0, max(w0, h0) / max_size_px)
    size_rc = (max(1, round(h0 / scale)), max(1, round(w0 / scale)))
    return read_scaled(reader, (0.0, 0.0), size_rc, scale)


def describe_slide(reader: SlideReader) -> dict:
    """JSON-ready summary: vendor, size, mpp and its source, levels (size, downsample, mpp),
    objective power, associated images and fingerprint."""
    w, h = reader.dimensions_xy
    return {
        "path": str(reader.path),
        "name": reader.path.name,
        "vendor": reader.vendor,
        "dimensions_xy": [w, h],
        "bounds_offset_xy": list(reader.bounds_offset_xy),
        "mpp": reader.mpp,
        "mpp_source": reader.mpp_source,
        "size_mm_xy": None if reader.mpp is None else [w * reader.mpp / 1000, h * reader.mpp / 1000],
        "objective_power": reader.objective_power,
        "levels": [
            {"level": i, "dimensions_xy": list(dims), "downsample": ds, "mpp": level_mpp(reader, i)}
            for i, (dims, ds) in enumerate(zip(reader.level_dimensions_xy, reader.level_downsamples))
        ],
        "associated_images": list(reader.associated_images),
        "fingerprint": reader.fingerprint(),
    }
