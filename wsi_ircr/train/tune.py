"""Choose post-processing thresholds on validation tiles (stored in the checkpoint)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.postprocess import PostProcessConfig, instances_from_maps
from wsi_ircr.train.config import TUNE_MARKER_RADII

GRID = {
    "np_threshold": (0.4, 0.5),
    "edge_threshold_per_um": (0.8, 1.4, 2.0, 3.2),
}


def tune_postprocess(predictor: Predictor, images: list[np.ndarray], labels: list[np.ndarray],
                     marker_radii: tuple[float, ...] = TUNE_MARKER_RADII, *, mpp: float) -> tuple[PostProcessConfig, float]:
    """The point of ``GRID`` x ``marker_radii`` (other fields: ``predictor.postprocess``) with the
    best mean AJI on (images uint8 (H, W, 3), labels int (H, W)) at ``mpp`` um/px.

    Network maps are computed once per tile, on the labels' grid; returns (config, its mean AJI).
    """
    from wsi_ircr.metrics import aji

    predictor.net.eval()
    maps = [predictor.maps_at(image, mpp) for image in images]
    best, best_score = predictor.postprocess, -1.0
    grid = {**GRID, "marker_radius": tuple(marker_radii)}
    for values in itertools.product(*grid.values()):
        candidate = dataclasses.replace(predictor.postprocess, **dict(zip(grid, values)))
        score = float(np.mean([aji(lab, instances_from_maps(p, h, candidate, mpp=mpp)) for (p, h), lab in zip(maps, labels)]))
        if score > best_score:
            best, best_score = candidate, score
    return best, best_score
