"""Per-nucleus morphology, shared by PIAC priors (training) and slide export (measurements)."""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops_table

FEATURES = ("area", "perimeter", "solidity", "circularity", "eccentricity", "extent", "mean_intensity")


def instance_features(labels: np.ndarray, image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Morphological features of every instance in ``labels``, in pixel units.

    Args:
        labels: int (H, W) instance map, 0 = background.
        image: optional uint8 (H, W, 3) RGB; ``mean_intensity`` is the mean grey level
            (0-255, dark nuclei are low) inside each instance, NaN without an image.

    Returns:
        ``{"label": (N,) int, "centroid_rc": (N, 2) float, "bbox_rc": (N, 4) int
        (r0, c0, r1, c1), "area": px^2, "perimeter": px, "solidity", "circularity"
        (4 pi area / perimeter^2, clipped to 1), "eccentricity", "extent", "mean_intensity"}``,
        ordered by label.
    """
    labels = np.asarray(labels)
    if labels.max(initial=0) == 0:
        empty = {k: np.zeros(0) for k in FEATURES}
        return {"label": np.zeros(0, np.int64), "centroid_rc": np.zeros((0, 2)), "bbox_rc": np.zeros((0, 4), np.int64), **empty}
    grey = None
    if image is not None:
        grey = (image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    props = ["label", "centroid", "bbox", "area", "perimeter", "solidity", "eccentricity", "extent"]
    if grey is not None:
        props.append("intensity_mean")
    table = regionprops_table(labels.astype(np.int32, copy=False), intensity_image=grey, properties=props)
    area = table["area"].astype(np.float64)
    perimeter = table["perimeter"].astype(np.float64)
    circularity = np.where(perimeter > 0, 4 * np.pi * area / np.maximum(perimeter, 1e-9) ** 2, 1.0)
    return {
        "label": table["label"].astype(np.int64),
        "centroid_rc": np.stack([table["centroid-0"], table["centroid-1"]], axis=1),
        "bbox_rc": np.stack([table[f"bbox-{i}"] for i in range(4)], axis=1).astype(np.int64),
        "area": area,
        "perimeter": perimeter,
        "solidity": table["solidity"].astype(np.float64),
        "circularity": np.clip(circularity, 0.0, 1.0),
        "eccentricity": table["eccentricity"].astype(np.float64),
        "extent": table["extent"].astype(np.float64),
        "mean_intensity": table["intensity_mean"].astype(np.float64) if grey is not None else np.full(len(area), np.nan),
    }
