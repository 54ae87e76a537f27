"""The tile grid at the model's resolution: cores that partition the slide, plus a halo.

Target pixels are pixels of the slide resampled to ``mpp`` (the model's resolution). In
continuous coordinates (pixel-corner convention, as in :mod:`wsi_ircr.slide.reader`) target
pixel ``(r, c)`` covers ``[r, r+1) x [c, c+1)`` and level-0 ``[c*s, (c+1)*s) x [r*s, (r+1)*s)``
with ``s = mpp / slide_mpp``; target ``(0, 0)`` is level-0 ``(0, 0)``.

Tile ``(row, col)`` owns the core ``[row*core_px, (row+1)*core_px) x [col*core_px, ...)``
(clipped to the image; the last row/column may be partial) and is read as a
``tile_px = core_px + 2*halo_px`` square starting ``halo_px`` above and left of its core,
so every tile has the same shape; pixels beyond the slide are white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsi_ircr.errors import UserError

if TYPE_CHECKING:
    from wsi_ircr.slide.tissue import TissueMask

Tile = tuple[int, int]


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``core_px`` (+ ``halo_px`` each side) target pixels at ``mpp`` over a slide of
    ``slide_dimensions_xy`` level-0 pixels (width, height) at ``slide_mpp``."""

    slide_dimensions_xy: tuple[int, int]
    slide_mpp: float
    mpp: float
    core_px: int
    halo_px: int

    def __post_init__(self) -> None:
        dims = self.slide_dimensions_xy
        if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
            raise UserError(f"slide_dimensions_xy={dims!r}: expected two positive integers (width, height)")
        object.__setattr__(self, "slide_dimensions_xy", (int(dims[0]), int(dims[1])))
        for name in ("slide_mpp", "mpp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UserError(f"{name}={v!r} must be a positive number of microns per pixel, e.g. 0.25")
            object.__setattr__(self, name, float(v))
        if isinstance(self.core_px, bool) or not isinstance(self.core_px, (int, np.integer)) or self.core_px < 1:
            raise UserError(f"core_px={self.core_px!r} must be a positive number of pixels; use e.g. --tile 512")
        if isinstance(self.halo_px, bool) or not isinstance(self.halo_px, (int, np.integer)) or self.halo_px < 0:
            raise UserError(f"halo_px={self.halo_px!r} must be zero or a positive number of pixels; use e.g. --halo 48")
        object.__setattr__(self, "core_px", int(self.core_px))
        object.__setattr__(self, "halo_px", int(self.halo_px))

    @property
    def scale(self) -> float:
        """Level-0 pixels per target pixel (``mpp / slide_mpp``)."""
        return self.mpp / self.slide_mpp

    @property
    def shape_rc(self) -> tuple[int, int]:
        """(rows, cols) of the slide resampled to ``mpp``: round(level-0 size * slide_mpp / mpp)."""
        w, h = self.slide_dimensions_xy
        return max(1, _round_half_up(h / self.scale)), max(1, _round_half_up(w / self.scale))

    @property
    def n_rows(self) -> int:
        return -(-self.shape_rc[0] // self.core_px)

    @property
    def n_cols(self) -> int:
        return -(-self.shape_rc[1] // self.core_px)

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def tile_px(self) -> int:
        """Side of every tile as read (core + 2 * halo), target pixels."""
        return self.core_px + 2 * self.halo_px

    def _check_tile(self, tile: Tile) -> tuple[int, int]:
        row, col = int(tile[0]), int(tile[1])
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise ValueError(f"tile {tile} outside the {self.n_rows}x{self.n_cols} grid")
        return row, col

    def core_box_rc(self, tile: Tile) -> tuple[int, int, int, int]:
        """(r0, c0, r1, c1) target pixels of the tile's core, end-exclusive, clipped to the image."""
        row, col = self._check_tile(tile)
        h, w = self.shape_rc
        r0, c0 = row * self.core_px, col * self.core_px
        return r0, c0, min(r0 + self.core_px, h), min(c0 + self.core_px, w)

    def read_origin_rc(self, tile: Tile) -> tuple[int, int]:
        """(r, c) target pixels of the read window's top-left (core origin - halo; may be < 0)."""
        row, col = self._check_tile(tile)
        return row * self.core_px - self.halo_px, col * self.core_px - self.halo_px

    def origin_xy(self, tile: Tile) -> tuple[float, float]:
        """Level-0 (x, y) of the read window's top-left corner (for ``read_at_mpp``)."""
        r, c = self.read_origin_rc(tile)
        return c * self.scale, r * self.scale

    def target_to_level0_xy(self, points_rc: np.ndarray) -> np.ndarray:
        """float (..., 2) target (row, col) -> float64 (..., 2) level-0 (x, y), pixel-corner convention.

        Coordinates from tools that put pixel centres at integers (e.g. ``find_contours``)
        need ``+ 0.5`` first.
        """
        pts = np.asarray(points_rc, dtype=np.float64)
        if pts.shape[-1] != 2:
            raise ValueError(f"points_rc must have shape (..., 2), got {pts.shape}")
        return pts[..., ::-1] * self.scale

    def all_tiles(self) -> list[Tile]:
        """Every (row, col), row-major."""
        return [(r, c) for r in range(self.n_rows) for c in range(self.n_cols)]

    def tissue_tiles(self, mask: TissueMask) -> list[Tile]:
        """Tiles (row-major) whose core overlaps at least one tissue pixel of ``mask``."""
        k = self.mpp / mask.mpp  # mask pixels per target pixel
        mh, mw = mask.mask.shape
        h, w = self.shape_rc

        def edges(n: int, size: int, m: int) -> tuple[np.ndarray, np.ndarray]:
            start = np.arange(n) * self.core_px
            stop = np.minimum(start + self.core_px, size)
            lo = np.clip(np.floor(start * k + 1e-9).astype(np.int64), 0, m)
            hi = np.clip(np.ceil(stop * k - 1e-9).astype(np.int64), 0, m)
            return lo, np.maximum(hi, lo)

        r0, r1 = edges(self.n_rows, h, mh)
        c0, c1 = edges(self.n_cols, w, mw)
        sat = np.zeros((mh + 1, mw + 1), np.int64)
        sat[1:, 1:] = mask.mask.astype(np.int64).cumsum(0).cumsum(1)
        counts = (
            sat[r1[:, None], c1[None, :]] - sat[r0[:, None], c1[None, :]]
            - sat[r1[:, None], c0[None, :]] + sat[r0[:, None], c0[None, :]]
        )
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(counts > 0))]

    def check_halo(self, max_nucleus_diameter_px: float) -> None:
        """UserError unless ``halo_px`` >= the largest nucleus diameter (target pixels)."""
        if self.halo_px < max_nucleus_diameter_px:
            d = math.ceil(max_nucleus_diameter_px)
            suggest = (d // 16 + 1) * 16
            raise UserError(
                f"halo_px={self.halo_px} is smaller than the largest nucleus ({d} px at {self.mpp:g} mpp); "
                f"use --halo {suggest} or more"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (zarr attributes)."""
        return {
            "slide_dimensions_xy": list(self.slide_dimensions_xy),
            "slide_mpp": self.slide_mpp,
            "mpp": self.mpp,
            "core_px": self.core_px,
            "halo_px": self.halo_px,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "grid") -> TileGrid:
        """Inverse of ``to_dict``; unknown or missing keys are UserErrors naming ``where``."""
        from wsi_ircr.config import from_dict

        missing = sorted({"slide_dimensions_xy", "slide_mpp", "mpp", "core_px", "halo_px"} - set(data))
        if missing:
            raise UserError(f"{where}: missing key {missing[0]!r}")
        return from_dict(cls, data, where)
