"""Supervised targets from an instance map: NP (nucleus pixels) and HoVer-Net HV maps."""

from __future__ import annotations

import numpy as np


def np_targets(labels: np.ndarray) -> np.ndarray:
    """Nucleus-pixel target: uint8 (H, W), 1 inside any instance of ``labels`` (int (H, W)), else 0."""
    return (np.asarray(labels) > 0).astype(np.uint8)


def _normalise_sides(offset: np.ndarray, lab_sorted: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Divide negative offsets by their instance's max |negative| and positive ones by its max.

    ``offset`` is float64 (P,) over foreground pixels sorted by instance; ``starts`` are
    the first index of each instance run, ``lab_sorted`` the run index of every pixel.
    """
    neg = -np.minimum.reduceat(offset, starts)[lab_sorted]
    pos = np.maximum.reduceat(offset, starts)[lab_sorted]
    out = np.zeros_like(offset)
    below, above = offset < 0, offset > 0
    out[below] = offset[below] / neg[below]
    out[above] = offset[above] / pos[above]
    return out


def hv_targets(labels: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal / vertical distance maps of an instance map.

    For every instance, each pixel's offset from the instance centroid along x (columns,
    channel 0) and y (rows, channel 1); per instance and per side the negative offsets are
    divided by their largest magnitude and the positive ones by their largest value, so
    the map runs from -1 (left / top edge) through 0 (centroid) to +1 (right / bottom).
    Unlike HoVer-Net's code the centroid is not rounded to a pixel (no half-pixel bias),
    so a symmetric nucleus gets a symmetric map. All instances are processed at once
    (pixels grouped by label), not by looping over the image per instance.

    Args:
        labels: int (H, W) instance map, 0 = background.

    Returns:
        float32 (2, H, W) in [-1, 1]; 0 on background.
    """
    labels = np.asarray(labels)
    out = np.zeros((2,) + labels.shape, np.float32)
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return out
    lab = labels[rows, cols]
    order = np.argsort(lab, kind="stable")
    rows, cols, lab = rows[order], cols[order], lab[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    run = np.cumsum(np.r_[False, lab[1:] != lab[:-1]])
    counts = np.diff(np.r_[starts, lab.size])
    cy = np.add.reduceat(rows.astype(np.float64), starts) / counts
    cx = np.add.reduceat(cols.astype(np.float64), starts) / counts
    out[0, rows, cols] = _normalise_sides(cols - cx[run], run, starts)
    out[1, rows, cols] = _normalise_sides(rows - cy[run], run, starts)
    return out
