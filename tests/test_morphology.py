"""instance_features against skimage regionprops (the reference it replaces)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse, line
from skimage.measure import regionprops_table

from wsi_ircr.morphology import FEATURES, instance_features

# Largest |new - regionprops| allowed per feature. Everything but the float32 grey mean is
# the same computation, so only rounding differs.
TOLERANCE = {"centroid_rc": 1e-9, "bbox_rc": 0, "area": 0, "perimeter": 1e-9, "solidity": 1e-12,
             "circularity": 1e-9, "eccentricity": 1e-6, "extent": 1e-12, "mean_intensity": 1e-3}


def regionprops_features(labels: np.ndarray, image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The regionprops implementation ``instance_features`` replaced (same keys and units)."""
    grey = None
    if image is not None:
        grey = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    props = ["label", "centroid", "bbox", "area", "perimeter", "solidity", "eccentricity", "extent"]
    if grey is not None:
        props.append("intensity_mean")
    table = regionprops_table(labels, intensity_image=grey, properties=props)
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


def nuclei_map(size: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 (size, size) labels of n random ellipses (radii 3-14 px, later ones painted
    over earlier ones, so many touch, overlap into irregular shapes or split in parts),
    ids 3, 6, 9, ... (gaps), and a random uint8 (size, size, 3) image."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        r, c = rng.uniform(0, size, 2)
        rr, cc = ellipse(r, c, rng.uniform(3, 14), rng.uniform(3, 10), shape=labels.shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = 3 * i
    return labels, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def odd_shapes() -> np.ndarray:
    """int32 (64, 64): single pixels, lines (horizontal, vertical, diagonal, steep), a ring,
    a label in two far-apart parts, objects cut by the map border, touching squares."""
    labels = np.zeros((64, 64), np.int32)
    labels[5, 5] = 1
    labels[0, 63] = 2
    labels[10, 10:40] = 3
    labels[12:50, 2] = 4
    rr, cc = line(20, 10, 40, 30)
    labels[rr, cc] = 5
    rr, cc = line(20, 40, 60, 47)
    labels[rr, cc] = 6
    labels[44:60, 8:24] = 7
    labels[48:56, 12:20] = 0
    labels[0:3, 20:26] = 8
    labels[30:33, 55:64] = 8
    labels[60:64, 30:40] = 9
    labels[20:26, 50:56] = 10
    labels[20:26, 56:60] = 11
    return labels


def assert_matches_regionprops(labels: np.ndarray, image: np.ndarray | None = None) -> None:
    new = instance_features(labels, image)
    ref = regionprops_features(labels, image)
    assert list(new) == list(ref)
    np.testing.assert_array_equal(new["label"], ref["label"])
    for name, tol in TOLERANCE.items():
        assert new[name].dtype == ref[name].dtype, name
        if name == "mean_intensity" and image is None:
            assert np.isnan(new[name]).all()
            continue
        np.testing.assert_allclose(new[name], ref[name], rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_nuclei_match_regionprops(seed):
    labels, image = nuclei_map(160, 80, seed)
    assert len(np.unique(labels)) > 60
    assert_matches_regionprops(labels, image)


def test_speckled_nuclei_match_regionprops():
    """Salt-and-pepper relabelling makes ragged, holed, multi-part objects and lone pixels."""
    labels, image = nuclei_map(120, 50, seed=3)
    rng = np.random.default_rng(4)
    flip = rng.random(labels.shape) < 0.05
    labels[flip] = 3 * rng.integers(0, 51, int(flip.sum()))
    assert_matches_regionprops(labels, image)


def test_odd_shapes_match_regionprops():
    labels = odd_shapes()
    assert_matches_regionprops(labels, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert_matches_regionprops(labels)


@pytest.mark.parametrize("seed", range(40))
def test_tiny_random_maps_match_regionprops(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 24, 2)
    labels = (rng.random((height, width)) < rng.uniform(0.2, 0.9)) * rng.integers(1, 5, (height, width))
    if labels.max() == 0:
        labels[0, 0] = 1
    assert_matches_regionprops(labels)


def test_known_values():
    labels = np.zeros((12, 12), np.int32)
    labels[2:6, 3:9] = 4
    labels[9, 9] = 7
    out = instance_features(labels)
    np.testing.assert_array_equal(out["label"], [4, 7])
    np.testing.assert_array_equal(out["bbox_rc"], [[2, 3, 6, 9], [9, 9, 10, 10]])
    np.testing.assert_allclose(out["centroid_rc"], [[3.5, 5.5], [9, 9]])
    np.testing.assert_allclose(out["area"], [24, 1])
    np.testing.assert_allclose(out["solidity"], [1, 1])
    np.testing.assert_allclose(out["extent"], [1, 1])
    np.testing.assert_allclose(out["eccentricity"][1], 0)
    assert 0 < out["eccentricity"][0] < 1


def test_large_ids_without_a_lookup_table():
    labels = np.zeros((40, 40), np.int64)
    labels[5:15, 5:12] = 2**40
    labels[20:30, 20:35] = 7
    labels[32:39, 2:6] = 2**40 + 5
    out = instance_features(labels)
    np.testing.assert_array_equal(out["label"], [7, 2**40, 2**40 + 5])
    _, compact = np.unique(labels, return_inverse=True)
    ref = regionprops_features(compact.reshape(labels.shape).astype(np.int32))
    for name in FEATURES[:-1]:
        np.testing.assert_allclose(out[name], ref[name], rtol=0, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint64, bool])
def test_label_dtypes(dtype):
    labels = odd_shapes()
    if dtype is bool:
        labels = labels > 0
    out = instance_features(labels.astype(dtype))
    ref = regionprops_features(labels.astype(np.int32))
    np.testing.assert_array_equal(out["label"], ref["label"])
    np.testing.assert_allclose(out["solidity"], ref["solidity"], rtol=0, atol=1e-12)
    assert out["label"].dtype == np.int64 and out["bbox_rc"].dtype == np.int64


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (7, 5)])
@pytest.mark.parametrize("with_image", [False, True])
def test_empty_map(shape, with_image):
    image = np.zeros((*shape, 3), np.uint8) if with_image else None
    out = instance_features(np.zeros(shape, np.int32), image)
    assert list(out) == ["label", "centroid_rc", "bbox_rc", *FEATURES]
    assert out["label"].shape == (0,) and out["label"].dtype == np.int64
    assert out["centroid_rc"].shape == (0, 2) and out["centroid_rc"].dtype == np.float64
    assert out["bbox_rc"].shape == (0, 4) and out["bbox_rc"].dtype == np.int64
    assert all(out[name].shape == (0,) and out[name].dtype == np.float64 for name in FEATURES)


def test_selected_features_equal_the_full_result():
    labels, image = nuclei_map(96, 30, seed=5)
    full = instance_features(labels, image)
    piac = ("extent", "area", "mean_intensity", "solidity", "circularity")
    some = instance_features(labels, image, features=piac)
    assert list(some) == ["label", "centroid_rc", "bbox_rc", "area", "solidity", "circularity", "extent", "mean_intensity"]
    for name, value in some.items():
        np.testing.assert_array_equal(value, full[name], err_msg=name)
    assert list(instance_features(labels, features=())) == ["label", "centroid_rc", "bbox_rc"]
    assert list(instance_features(labels, features="perimeter")) == ["label", "centroid_rc", "bbox_rc", "perimeter"]


@pytest.mark.parametrize(
    ("labels", "image", "features", "message"),
    [
        (np.zeros((4, 4, 3), np.int32), None, None, "2-D"),
        (np.zeros((4, 4)), None, None, "integers"),
        (-np.eye(4, dtype=np.int32), None, None, ">= 0"),
        (np.eye(4, dtype=np.int32), np.zeros((5, 4, 3), np.uint8), None, "does not match"),
        (np.eye(4, dtype=np.int32), None, ["area", "roundness"], "roundness"),
    ],
)
def test_bad_input(labels, image, features, message):
    with pytest.raises(ValueError, match=message):
        instance_features(labels, image, features)
