"""NP + HV maps -> instance map by marker-controlled watershed (HoVer-Net style).

One implementation, used at every training step (MIAC, PIAC) and at inference.
Unlike HoVer-Net, HV maps are not min-max rescaled per image: the network's tanh output
is already in [-1, 1], so a tile gives the same instances whatever else it contains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed


@dataclass(frozen=True)
class PostProcessConfig:
    """Thresholds of the watershed post-processing, in physical units (stored in every checkpoint).

    One configuration means the same nuclei at any resolution: ``instances_from_maps``
    converts to pixels with the maps' mpp.

    np_threshold: nucleus probability above which a pixel is foreground.
    edge_threshold_per_um: HV "energy" (how fast h or v drops across a pixel, per um)
        above which a foreground pixel is a boundary between two nuclei, not a marker.
        HV runs from -1 to 1 across a nucleus, so a nucleus of diameter d um rises by 2/d per um.
    marker_radius: markers keep only pixels whose normalised distance to their centre
        (sqrt(h^2 + v^2)) is below this, which separates touching nuclei (unitless).
    min_marker_um2, min_area_um2: smaller markers / instances are dropped.
    smooth_sigma_um: Gaussian smoothing of the HV maps before differentiation.
    """

    np_threshold: float = 0.5
    edge_threshold_per_um: float = 1.0
    marker_radius: float = 0.3
    min_marker_um2: float = 0.5
    min_area_um2: float = 1.875
    smooth_sigma_um: float = 0.25

    def __post_init__(self):
        if not 0.0 < self.np_threshold < 1.0:
            raise ValueError(f"np_threshold must be in (0, 1), got {self.np_threshold}")
        if self.edge_threshold_per_um <= 0 or self.marker_radius <= 0:
            raise ValueError("edge_threshold_per_um and marker_radius must be > 0")
        if self.min_marker_um2 <= 0 or self.min_area_um2 <= 0 or self.smooth_sigma_um < 0:
            raise ValueError("min_marker_um2 and min_area_um2 must be > 0, smooth_sigma_um >= 0")

    def in_pixels(self, mpp: float) -> dict[str, float]:
        """The thresholds for maps at ``mpp`` um/px: edge per px, areas in px (>= 1), sigma in px."""
        if not mpp > 0:
            raise ValueError(f"mpp must be > 0, got {mpp}")
        return {
            "edge_threshold": self.edge_threshold_per_um * mpp,
            "min_marker_px": max(1, round(self.min_marker_um2 / mpp**2)),
            "min_area_px": max(1, round(self.min_area_um2 / mpp**2)),
            "smooth_sigma_px": self.smooth_sigma_um / mpp,
        }


def legacy_postprocess(fields: dict, mpp: float) -> dict:
    """Pixel-unit post-processing fields of checkpoints before physical units, converted at ``mpp``.

    ``edge_threshold`` (per px), ``min_marker_px``, ``min_area_px``, ``smooth_sigma_px``
    become their ``*_per_um``, ``*_um2`` and ``*_um`` counterparts; other keys pass through.
    """
    out = dict(fields)
    scale = {"edge_threshold": ("edge_threshold_per_um", 1 / mpp), "min_marker_px": ("min_marker_um2", mpp**2),
             "min_area_px": ("min_area_um2", mpp**2), "smooth_sigma_px": ("smooth_sigma_um", mpp)}
    for old, (new, factor) in scale.items():
        if old in out:
            out[new] = float(out.pop(old)) * factor
    return out


def _remove_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)`` of bool (H, W) (background 4-connected to the border stays),
    by one labelling of the background instead of an iterated erosion (3x faster on a tile)."""
    background, n = ndi.label(~mask)
    if n == 0:
        return mask
    hole = np.ones(n + 1, bool)
    hole[0] = False
    hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    return mask | hole[background]


def open_3x3(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, structure=np.ones((3, 3)))`` of bool (H, W) (outside the image
    = False), as shifted ANDs then ORs (7x faster on a tile)."""
    p = np.pad(mask, 1)
    eroded = p[:-2] & p[1:-1] & p[2:]
    eroded = np.pad(eroded[:, :-2] & eroded[:, 1:-1] & eroded[:, 2:], 1)
    dilated = eroded[:-2] | eroded[1:-1] | eroded[2:]
    return dilated[:, :-2] | dilated[:, 1:-1] | dilated[:, 2:]


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def boundary_energy(hv: np.ndarray, smooth_sigma_px: float = 1.0) -> np.ndarray:
    """How fast h falls along x or v falls along y, per pixel: float32 (H, W), >= 0.

    Inside one nucleus h and v rise from -1 to 1, so their derivatives are positive and
    small; between two touching nuclei they jump from +1 back to -1 (large negative).
    """
    h, v = hv[0].astype(np.float32), hv[1].astype(np.float32)
    if smooth_sigma_px > 0:
        h = ndi.gaussian_filter(h, smooth_sigma_px)
        v = ndi.gaussian_filter(v, smooth_sigma_px)
    dh_dx = np.gradient(h, axis=1)
    dv_dy = np.gradient(v, axis=0)
    return np.maximum(np.maximum(-dh_dx, -dv_dy), 0.0)


def instances_from_maps(np_prob: np.ndarray, hv: np.ndarray, config: PostProcessConfig = PostProcessConfig(), *,
                        mpp: float) -> np.ndarray:
    """Instance map from network outputs.

    Args:
        np_prob: float (H, W) nucleus probability.
        hv: float (2, H, W) horizontal / vertical offsets to the centre in [-1, 1].
        config: thresholds in physical units.
        mpp: resolution of the maps (um per pixel).

    Returns:
        int32 (H, W) instance map, 0 = background, ids 1..N.
    """
    px = config.in_pixels(mpp)
    fg = np_prob >= config.np_threshold
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    fg = fill_holes(fg)
    fg = _remove_small(ndi.label(fg)[0], px["min_area_px"]) > 0
    energy = boundary_energy(hv, px["smooth_sigma_px"])
    radius = np.hypot(hv[0], hv[1])
    markers = fg & (energy < px["edge_threshold"]) & (radius < config.marker_radius)
    markers = open_3x3(markers)
    markers = _remove_small(ndi.label(markers)[0], px["min_marker_px"])
    labels = watershed(energy + radius * 0.05, markers=markers, mask=fg)
    unreached = fg & (labels == 0)
    if unreached.any():
        extra, _ = ndi.label(unreached)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    labels = _remove_small(labels.astype(np.int32), px["min_area_px"])
    return _relabel_sequential(labels)
