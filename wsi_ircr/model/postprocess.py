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
    """Thresholds of the watershed post-processing (stored in every checkpoint).

    np_threshold: nucleus probability above which a pixel is foreground.
    edge_threshold: HV "energy" (how fast h or v drops across a pixel, per px) above which
        a foreground pixel is a boundary between two nuclei, not a marker.
    marker_radius: markers keep only pixels whose normalised distance to their centre
        (sqrt(h^2 + v^2)) is below this, which separates touching nuclei.
    min_marker_px, min_area_px: smaller markers / instances are dropped (model pixels).
    smooth_sigma_px: Gaussian smoothing of the HV maps before differentiation.
    """

    np_threshold: float = 0.5
    edge_threshold: float = 0.25
    marker_radius: float = 0.3
    min_marker_px: int = 8
    min_area_px: int = 30
    smooth_sigma_px: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.np_threshold < 1.0:
            raise ValueError(f"np_threshold must be in (0, 1), got {self.np_threshold}")
        if self.edge_threshold <= 0 or self.marker_radius <= 0:
            raise ValueError("edge_threshold and marker_radius must be > 0")
        if self.min_marker_px < 1 or self.min_area_px < 1 or self.smooth_sigma_px < 0:
            raise ValueError("min_marker_px and min_area_px must be >= 1, smooth_sigma_px >= 0")


def _remove_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
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


def instances_from_maps(np_prob: np.ndarray, hv: np.ndarray, config: PostProcessConfig = PostProcessConfig()) -> np.ndarray:
    """Instance map from network outputs.

    Args:
        np_prob: float (H, W) nucleus probability.
        hv: float (2, H, W) horizontal / vertical offsets to the centre in [-1, 1].
        config: thresholds.

    Returns:
        int32 (H, W) instance map, 0 = background, ids 1..N.
    """
    fg = np_prob >= config.np_threshold
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    fg = ndi.binary_fill_holes(fg)
    fg = _remove_small(ndi.label(fg)[0], config.min_area_px) > 0
    energy = boundary_energy(hv, config.smooth_sigma_px)
    radius = np.hypot(hv[0], hv[1])
    markers = fg & (energy < config.edge_threshold) & (radius < config.marker_radius)
    markers = ndi.binary_opening(markers, structure=np.ones((3, 3), bool))
    markers = _remove_small(ndi.label(markers)[0], config.min_marker_px)
    labels = watershed(energy + radius * 0.05, markers=markers, mask=fg)
    unreached = fg & (labels == 0)
    if unreached.any():
        extra, _ = ndi.label(unreached)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    labels = _remove_small(labels.astype(np.int32), config.min_area_px)
    return _relabel_sequential(labels)
