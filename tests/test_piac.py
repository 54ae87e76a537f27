"""PIAC: morphology priors, instance weight maps, pseudo-label targets and the weighted consistency loss."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse

from wsi_ircr.errors import UserError
from wsi_ircr.morphology import instance_features
from wsi_ircr.train.piac import MorphologyPriors, piac_loss, piac_targets, piac_weight_map
from wsi_ircr.train.targets import hv_targets

DARK, PALE, BACKGROUND = 75, 170, 220


def nuclei_tiles(n_tiles: int = 4, size: int = 144, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tiles of dark, randomly oriented ellipses (radii 5-9 px) on a pale background."""
    rng = np.random.default_rng(seed)
    labels, images = [], []
    for _ in range(n_tiles):
        lab = np.zeros((size, size), np.int32)
        img = np.full((size, size, 3), BACKGROUND, np.uint8)
        for i, (r, c) in enumerate(((r, c) for r in range(12, size, 24) for c in range(12, size, 24)), start=1):
            rr, cc = ellipse(r, c, rng.uniform(6, 9), rng.uniform(5, 7), shape=lab.shape, rotation=rng.uniform(0, np.pi))
            lab[rr, cc] = i
            img[rr, cc] = rng.integers(50, 100)
        labels.append(lab)
        images.append(img)
    return labels, images


@pytest.fixture(scope="module")
def priors() -> MorphologyPriors:
    return MorphologyPriors.fit(*nuclei_tiles())


def outlier_case() -> tuple[np.ndarray, np.ndarray]:
    """1 nucleus-like ellipse, 2 pale thin line (a fibre), 3 huge round blob, 4 huge irregular clump."""
    labels = np.zeros((128, 128), np.int32)
    rr, cc = ellipse(30, 30, 7, 5.5, rotation=0.4)
    labels[rr, cc] = 1
    labels[60:62, 10:70] = 2
    rr, cc = disk((100, 100), 25, shape=labels.shape)
    labels[rr, cc] = 3
    for centre in [(90, 20), (105, 20), (95, 35), (110, 40)]:
        rr, cc = disk(centre, 10, shape=labels.shape)
        labels[rr, cc] = 4
    image = np.full((128, 128, 3), BACKGROUND, np.uint8)
    image[labels > 0] = DARK
    image[labels == 2] = PALE
    return labels, image




def test_priors_score_nuclei_high_and_outliers_low(priors):
    assert priors.features == ("area", "solidity", "circularity", "mean_intensity", "extent")
    held_out = nuclei_tiles(1, seed=7)
    train_scores = priors.score(instance_features(held_out[0][0], held_out[1][0]))
    assert np.median(train_scores) > 0.6 and np.all((train_scores >= 0) & (train_scores <= 1))
    labels, image = outlier_case()
    nucleus, line, blob, clump = priors.score(instance_features(labels, image))
    assert nucleus > 0.6
    assert line < 0.35 and clump < 0.35
    assert blob < nucleus - 0.2


def test_priors_dark_line_scores_below_nucleus(priors):
    labels, image = outlier_case()
    image[labels == 2] = DARK
    nucleus, line = priors.score(instance_features(labels, image))[:2]
    assert line < nucleus - 0.2


def test_priors_round_trip(priors):
    labels, image = outlier_case()
    table = instance_features(labels, image)
    data = priors.to_dict()
    again = MorphologyPriors.from_dict(json.loads(json.dumps(data)))
    np.testing.assert_array_equal(again.score(table), priors.score(table))
    buf = io.BytesIO()
    torch.save({"priors": data}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["priors"]
    np.testing.assert_array_equal(MorphologyPriors.from_dict(loaded).score(table), priors.score(table))
    assert again.describe() == priors.describe() and "area: n=144" in priors.describe()


def test_priors_bad_input(priors):
    labels, images = nuclei_tiles(1)
    with pytest.raises(UserError, match="unknown feature"):
        MorphologyPriors.fit(labels, images, features=("area", "roundness"))
    with pytest.raises(UserError, match="needs the images"):
        MorphologyPriors.fit(labels, None)
    with pytest.raises(UserError, match="0 nuclei"):
        MorphologyPriors.fit([np.zeros((10, 10), np.int32)], [np.zeros((10, 10, 3), np.uint8)])
    with pytest.raises(UserError, match="malformed"):
        MorphologyPriors.from_dict({"version": 1, "features": [{"name": "area"}]})
    only_shape = MorphologyPriors.fit(labels, None, features=("area", "extent"))
    assert only_shape.features == ("area", "extent")
    with pytest.raises(ValueError, match="missing"):
        priors.score({"area": np.ones(2)})


def test_piac_weight_map(priors):
    labels, image = outlier_case()
    weight, scores = piac_weight_map(labels, image, priors, tau=0.35, w_good=2.0)
    assert weight.dtype == np.float32 and weight.shape == labels.shape and scores.shape == (4,)
    assert np.all(weight[labels == 0] == 1)
    for i, s in enumerate(scores, start=1):
        assert np.all(weight[labels == i] == (2.0 if s >= 0.35 else 0.0))
    assert np.all(weight[labels == 1] == 2.0) and np.all(weight[labels == 2] == 0.0)
    keep_all, _ = piac_weight_map(labels, image, priors, tau=0.0, w_good=3.0)
    assert np.all(keep_all[labels > 0] == 3.0)
    empty, no_scores = piac_weight_map(np.zeros((16, 16), np.int32), np.zeros((16, 16, 3), np.uint8), priors)
    assert np.all(empty == 1) and no_scores.shape == (0,)


def test_piac_targets_drop_implausible_instances(priors):
    labels, image = outlier_case()
    weight, scores = piac_weight_map(labels, image, priors, tau=0.35, w_good=2.0)
    assert (scores < 0.35).any() and (scores >= 0.35).any()
    target_np, target_hv = piac_targets(labels, weight)
    kept = np.where(weight > 0, labels, 0)
    assert target_np.dtype == np.uint8 and np.array_equal(target_np, (kept > 0).astype(np.uint8))
    assert np.array_equal(target_hv, hv_targets(kept))
    dropped = (labels > 0) & (weight == 0)
    assert dropped.any() and not target_np[dropped].any() and not target_hv[:, dropped].any()


def test_piac_loss():
    gen = torch.Generator().manual_seed(0)
    t_out = {"np": torch.randn(2, 2, 12, 12, generator=gen), "hv": torch.rand(2, 2, 12, 12, generator=gen)}
    s_out = {"np": torch.randn(2, 2, 12, 12, generator=gen, requires_grad=True), "hv": torch.rand(2, 2, 12, 12, generator=gen, requires_grad=True)}
    weight = torch.ones(2, 12, 12)
    assert float(piac_loss(t_out, t_out, weight)) == 0.0
    loss = piac_loss(s_out, t_out, weight)
    assert float(loss.detach()) > 0
    loss.backward()
    assert s_out["np"].grad.abs().sum() > 0
    dropped = weight.clone()
    dropped[0, :6] = 0
    changed = {k: v.detach().clone() for k, v in s_out.items()}
    changed["hv"][0, :, :6] += 1.0
    assert float(piac_loss(changed, t_out, dropped)) == pytest.approx(float(piac_loss(s_out, t_out, dropped).detach()))
    doubled = piac_loss(s_out, t_out, 2 * weight)
    assert float(doubled.detach()) == pytest.approx(float(loss.detach()))
    assert float(piac_loss(s_out, t_out, torch.zeros(2, 12, 12)).detach()) == 0.0
