"""Resampling between a tile's resolution and a model's: images, network maps, instance maps.

Sizes follow ``scaled_shape``: an (H, W) grid at ``from_mpp`` covers
round(H * from_mpp / to_mpp) x round(W * from_mpp / to_mpp) pixels at ``to_mpp``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

MPP_TOLERANCE = 1e-3  # relative mpp difference below which no resampling is done


def same_mpp(a: float, b: float) -> bool:
    """True when two resolutions differ by less than ``MPP_TOLERANCE`` (relative)."""
    return abs(a - b) <= MPP_TOLERANCE * max(a, b)


def scaled_shape(shape_rc: tuple[int, ...], from_mpp: float, to_mpp: float) -> tuple[int, int]:
    """(H, W) of the same area at ``to_mpp`` (at least 1 x 1)."""
    scale = from_mpp / to_mpp
    return max(1, round(shape_rc[0] * scale)), max(1, round(shape_rc[1] * scale))


def resize_image(image: np.ndarray, shape_rc: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (*shape_rc, 3), bilinear with antialiasing when shrinking."""
    if image.shape[:2] == tuple(shape_rc):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    shrink = shape_rc[0] < image.shape[0] or shape_rc[1] < image.shape[1]
    y = F.interpolate(x, size=tuple(shape_rc), mode="bilinear", align_corners=False, antialias=shrink)
    return y[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_maps(prob: np.ndarray, hv: np.ndarray, shape_rc: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Probability float32 (H, W) and HV float32 (2, H, W) -> the same on ``shape_rc``, bilinear."""
    if prob.shape == tuple(shape_rc):
        return prob, hv
    x = torch.from_numpy(np.concatenate([prob[None], hv]).astype(np.float32, copy=False))[None]
    shrink = shape_rc[0] < prob.shape[0] or shape_rc[1] < prob.shape[1]
    y = F.interpolate(x, size=tuple(shape_rc), mode="bilinear", align_corners=False, antialias=shrink)[0].numpy()
    return np.ascontiguousarray(y[0]), np.ascontiguousarray(y[1:])


def resize_labels(labels: np.ndarray, shape_rc: tuple[int, int]) -> np.ndarray:
    """int (H, W) instance map -> int32 on ``shape_rc`` by nearest neighbour (pixel centres)."""
    if labels.shape == tuple(shape_rc):
        return labels.astype(np.int32, copy=False)
    rows = np.minimum(((np.arange(shape_rc[0]) + 0.5) * labels.shape[0] / shape_rc[0]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape_rc[1]) + 0.5) * labels.shape[1] / shape_rc[1]).astype(np.int64), labels.shape[1] - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]], dtype=np.int32)
