"""Low-resolution tissue mask: which parts of the slide hold tissue (True) and which are glass.

Mask pixel ``(r, c)`` covers level-0 ``[c*s, (c+1)*s) x [r*s, (r+1)*s)`` with
``s = mask.mpp / slide_mpp`` (the grid convention of :mod:`wsi_ircr.slide.grid`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from wsi_ircr.slide.reader import SlideReader, read_at_mpp, require_mpp

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """bool (H, W) tissue mask at ``mpp`` microns per pixel, anchored at level-0 (0, 0)."""

    mask: np.ndarray
    mpp: float

    def __post_init__(self) -> None:
        if self.mask.dtype != bool or self.mask.ndim != 2:
            raise ValueError(f"mask must be bool (H, W), got {self.mask.dtype} {self.mask.shape}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")

    @property
    def area_mm2(self) -> float:
        """Tissue area in square millimetres."""
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    @property
    def fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean())


def mask_shape_rc(reader: SlideReader, mask_mpp: float) -> tuple[int, int]:
    """(rows, cols) of the slide at ``mask_mpp``: round(level-0 size * slide_mpp / mask_mpp)."""
    scale = mask_mpp / require_mpp(reader)
    w, h = reader.dimensions_xy
    return max(1, math.floor(h / scale + 0.5)), max(1, math.floor(w / scale + 0.5))


def full_mask(reader: SlideReader, mask_mpp: float = 8.0) -> TissueMask:
    """An all-tissue mask (``--no-tissue-mask``): every tile is processed."""
    return TissueMask(np.ones(mask_shape_rc(reader, mask_mpp), bool), float(mask_mpp))


def saturation(image_rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of uint8 (H, W, 3) -> float32 (H, W) in [0, 1]."""
    rgb = image_rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def saturation_threshold(sat: np.ndarray, floor: float, ceiling: float) -> float:
    """Otsu's threshold on ``sat`` clipped to ``[floor, ceiling]`` (``floor`` if ``sat`` is flat)."""
    from skimage.filters import threshold_otsu

    if float(sat.max()) - float(sat.min()) < 1e-6:
        return floor
    return float(np.clip(threshold_otsu(sat), floor, ceiling))


def _remove_small_objects(mask: np.ndarray, min_px: int) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the border."""
    from scipy import ndimage

    holes, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[holes]


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def detect_tissue(
    reader: SlideReader,
    mask_mpp: float = 8.0,
    *,
    min_object_mm2: float = 0.01,
    max_hole_mm2: float = 0.5,
    dilation_um: float = 40.0,
    saturation_floor: float = 0.05,
    saturation_ceiling: float = 0.12,
) -> TissueMask:
    """Tissue mask at ``mask_mpp`` from colour saturation (glass is white or grey: unsaturated).

    Reads the slide at ``mask_mpp`` (from the coarsest pyramid level finer than it), smooths
    the saturation, thresholds it with Otsu clipped to ``[saturation_floor,
    saturation_ceiling]`` (a blank slide falls below the floor: all False), drops tissue
    pieces under ``min_object_mm2``, fills holes under ``max_hole_mm2`` and dilates by
    ``dilation_um`` so nuclei on the tissue edge stay inside.
    """
    from scipy import ndimage

    shape_rc = mask_shape_rc(reader, mask_mpp)
    overview = read_at_mpp(reader, (0.0, 0.0), shape_rc, mask_mpp)
    sat = ndimage.gaussian_filter(saturation(overview), 1.0)
    threshold = saturation_threshold(sat, saturation_floor, saturation_ceiling)
    mask = sat > threshold
    px_per_mm2 = (1000.0 / mask_mpp) ** 2
    mask = _remove_small_objects(mask, max(1, round(min_object_mm2 * px_per_mm2)))
    mask = _fill_small_holes(mask, max(1, round(max_hole_mm2 * px_per_mm2)))
    radius = round(dilation_um / mask_mpp)
    if radius > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=_disk(radius))
    result = TissueMask(mask, float(mask_mpp))
    log.info(
        "%s: tissue %.1f%% of %dx%d px at %g mpp (%.2f mm^2, saturation threshold %.3f)",
        reader.path.name, 100 * result.fraction, shape_rc[1], shape_rc[0], mask_mpp, result.area_mm2, threshold,
    )
    return result
