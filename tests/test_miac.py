"""MIAC: instance matching, matched masks and the matched-only consistency loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ircr.train.miac import instance_centroids, instance_weights, match_instances, matched_masks, miac_loss


def squares(shape, centres_rc, ids, half=2):
    labels = np.zeros(shape, np.int32)
    for (r, c), i in zip(centres_rc, ids):
        labels[r - half : r + half + 1, c - half : c + half + 1] = i
    return labels


def test_instance_centroids():
    labels = squares((20, 30), [(5, 6), (12, 20)], [4, 9])
    ids, rc = instance_centroids(labels)
    np.testing.assert_array_equal(ids, [4, 9])
    np.testing.assert_allclose(rc, [[5, 6], [12, 20]])
    ids, rc = instance_centroids(np.zeros((3, 3), np.int32))
    assert ids.shape == (0,) and rc.shape == (0, 2)


def test_match_instances_hand_made():
    teacher = squares((60, 80), [(10, 10), (10, 30), (40, 40)], [1, 2, 3])
    student = squares((60, 80), [(11, 31), (9, 11), (40, 62)], [7, 5, 6])
    matches = match_instances(teacher, student, max_dist_px=8)
    np.testing.assert_array_equal(matches, [[1, 5], [2, 7]])
    assert match_instances(teacher, student, max_dist_px=30).shape == (3, 2)


def test_match_instances_far_pair_does_not_displace_a_feasible_one():
    # Plain Hungarian would pair t2-s1 (7 px) to avoid the 112 px t2-s2 cost; gated, t1-s1 (5 px) wins.
    teacher = squares((9, 140), [(4, 110), (4, 122)], [1, 2])
    student = squares((9, 140), [(4, 115), (4, 10)], [1, 2])
    np.testing.assert_array_equal(match_instances(teacher, student, max_dist_px=8), [[1, 1]])


def test_match_instances_empty_sides():
    some = squares((20, 20), [(10, 10)], [1])
    none = np.zeros((20, 20), np.int32)
    for t, s in ((some, none), (none, some), (none, none)):
        m = match_instances(t, s, 8)
        assert m.shape == (0, 2) and m.dtype == np.int64


def test_matched_masks():
    teacher = squares((40, 40), [(10, 10), (30, 30)], [1, 2], half=4)
    student = squares((40, 40), [(11, 11), (30, 10)], [3, 4], half=4)
    inside, band = matched_masks(teacher, student, np.array([[1, 3]]), band_px=1)
    assert inside.dtype == np.float32 and band.dtype == np.float32
    np.testing.assert_array_equal(inside.astype(bool), (teacher == 1) | (student == 3))
    np.testing.assert_array_equal(band[10, 2:10], [0, 0, 1, 1, 1, 1, 0, 0])
    assert not band[(teacher == 2) | (student == 4)].any() and not inside[(teacher == 2) | (student == 4)].any()
    wider = matched_masks(teacher, student, np.array([[1, 3]]), band_px=3)[1]
    assert wider.sum() > band.sum() and np.all(wider >= band)
    empty_inside, empty_band = matched_masks(teacher, student, np.zeros((0, 2), np.int64))
    assert not empty_inside.any() and not empty_band.any()


def test_band_between_touching_matched_instances():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:15] = 1
    labels[5:15, 15:27] = 2
    _, band = matched_masks(labels, labels, np.array([[1, 1], [2, 2]]), band_px=0)
    assert band[10, 14] == 1 and band[10, 15] == 1 and band[10, 9] == 0


def test_band_does_not_reach_unmatched_neighbour():
    teacher = np.zeros((20, 30), np.int32)
    teacher[5:15, 3:15] = 1
    teacher[5:15, 15:27] = 2
    _, band = matched_masks(teacher, teacher, np.array([[1, 1]]), band_px=2)
    assert band[10, 14] == 1 and not band[teacher == 2].any()


def outputs(gen, n=1, size=40):
    return {"np": torch.randn(n, 2, size, size, generator=gen), "hv": torch.rand(n, 2, size, size, generator=gen) * 2 - 1}


def test_miac_loss():
    gen = torch.Generator().manual_seed(0)
    teacher_labels = squares((40, 40), [(10, 10), (30, 30)], [1, 2], half=4)
    student_labels = squares((40, 40), [(11, 11), (30, 8)], [3, 4], half=4)
    matches = match_instances(teacher_labels, student_labels, 8)
    np.testing.assert_array_equal(matches, [[1, 3]])
    inside, band = (torch.from_numpy(m)[None] for m in matched_masks(teacher_labels, student_labels, matches))
    t_out = outputs(gen)
    assert float(miac_loss(t_out, t_out, inside, band)) == 0.0
    s_out = {k: v.clone().requires_grad_(True) for k, v in outputs(gen).items()}
    loss = miac_loss(s_out, t_out, inside, band, beta=0.5)
    assert float(loss.detach()) > 0
    loss.backward()
    assert s_out["np"].grad.abs().sum() > 0 and s_out["np"].grad[0, :, 30, 30].abs().sum() == 0
    changed = {k: v.detach().clone() for k, v in s_out.items()}
    unmatched = torch.from_numpy((teacher_labels == 2) | (student_labels == 4))
    changed["np"][0, :, unmatched] += 5.0
    changed["hv"][0, :, unmatched] = -changed["hv"][0, :, unmatched]
    assert float(miac_loss(changed, t_out, inside, band)) == pytest.approx(float(loss.detach()), rel=1e-6)
    no_band = float(miac_loss(s_out, t_out, inside, band, beta=0.0).detach())
    assert no_band < float(loss.detach())


def test_miac_loss_nothing_matched_is_zero():
    gen = torch.Generator().manual_seed(1)
    zeros = torch.zeros(2, 40, 40)
    loss = miac_loss(outputs(gen, 2), outputs(gen, 2), zeros, zeros)
    assert float(loss) == 0.0 and not torch.isnan(loss)


def test_instance_weights_give_every_matched_pair_the_same_total():
    teacher = squares((40, 40), [(8, 8), (28, 28)], [1, 2], half=2)  # 25 px
    teacher[20:37, 20:37] = 2  # a large nucleus: 289 px
    student = squares((40, 40), [(9, 9), (28, 28), (8, 30)], [5, 6, 7], half=2)  # 7 unmatched
    matches = match_instances(teacher, student, 4)
    np.testing.assert_array_equal(matches, [[1, 5], [2, 6]])
    w = instance_weights(teacher, student, matches)
    union_1 = (teacher == 1) | (student == 5)
    assert w[union_1].sum() == pytest.approx(1.0) and w[teacher == 2].sum() == pytest.approx(1.0)
    assert w.sum() == pytest.approx(2.0) and not w[student == 7].any() and not w[(teacher == 0) & (student == 0)].any()
    np.testing.assert_allclose(w[union_1], 1.0 / union_1.sum())
    assert not instance_weights(teacher, student, np.zeros((0, 2), np.int64)).any()


def test_instance_norm_makes_the_inside_term_a_mean_over_instances():
    """Errors of 1 on a small nucleus and 0 on a large one: per pixel the mean is small,
    per instance it is 1/2 (the small nucleus's mean error)."""
    labels = squares((40, 40), [(8, 8)], [1], half=2)
    labels[20:37, 20:37] = 2
    matches = np.array([[1, 1], [2, 2]])
    t_out = {"np": torch.zeros(1, 2, 40, 40), "hv": torch.zeros(1, 2, 40, 40)}
    s_out = {"np": torch.zeros(1, 2, 40, 40), "hv": torch.zeros(1, 2, 40, 40)}
    s_out["hv"][0, :, torch.from_numpy(labels == 1)] = 1.0  # squared HV difference 1 on nucleus 1
    inside, _ = matched_masks(labels, labels, matches)
    zero = torch.zeros(1, 40, 40)
    per_pixel = float(miac_loss(s_out, t_out, torch.from_numpy(inside)[None], zero))
    per_instance = float(miac_loss(s_out, t_out, torch.from_numpy(instance_weights(labels, labels, matches))[None], zero))
    assert per_pixel == pytest.approx(25 / (25 + 289), rel=1e-6)
    assert per_instance == pytest.approx(0.5, rel=1e-6)


def test_miac_np_and_hv_switches_select_what_is_compared():
    gen = torch.Generator().manual_seed(2)
    inside, band = torch.ones(1, 40, 40), torch.zeros(1, 40, 40)
    t_out, s_out = outputs(gen), outputs(gen)
    hv_only = {"np": t_out["np"], "hv": s_out["hv"]}  # agrees on NP, differs on HV
    np_only = {"np": s_out["np"], "hv": t_out["hv"]}
    assert float(miac_loss(hv_only, t_out, inside, band, np_mode="prob")) > 0
    assert float(miac_loss(hv_only, t_out, inside, band, hv=False)) == 0.0
    assert float(miac_loss(np_only, t_out, inside, band, np_mode="off")) == 0.0
    both = float(miac_loss(s_out, t_out, inside, band))
    parts = float(miac_loss(s_out, t_out, inside, band, hv=False)) + float(miac_loss(s_out, t_out, inside, band, np_mode="off"))
    assert both == pytest.approx(parts, rel=1e-6)
    z_s, z_t = s_out["np"][:, 1] - s_out["np"][:, 0], t_out["np"][:, 1] - t_out["np"][:, 0]
    logit = float(miac_loss(s_out, t_out, inside, band, np_mode="logit", hv=False))
    assert logit == pytest.approx(float(((z_s - z_t) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError):
        miac_loss(s_out, t_out, inside, band, np_mode="off", hv=False)


def test_logit_consistency_keeps_its_gradient_where_the_teacher_is_sure():
    """A sure teacher (p = 0.9999) and a sure-but-less student (p = 0.999): the probability
    difference hardly pulls the student; the log-odds difference still does."""
    t_out = {"np": torch.tensor([0.0, 9.2]).view(1, 2, 1, 1), "hv": torch.zeros(1, 2, 1, 1)}
    mask, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    grads = {}
    for mode in ("prob", "logit"):
        s_np = torch.tensor([0.0, 6.9]).view(1, 2, 1, 1).requires_grad_(True)
        miac_loss({"np": s_np, "hv": torch.zeros(1, 2, 1, 1)}, t_out, mask, zero, np_mode=mode, hv=False).backward()
        grads[mode] = float(s_np.grad.abs().sum())
    assert grads["logit"] > 1000 * grads["prob"]


def test_confidence_gate_leaves_out_pixels_where_the_teacher_is_unsure():
    t_np = torch.zeros(1, 2, 1, 2)
    t_np[0, 1, 0, 0] = 4.0  # sure: p = 0.98; pixel (0, 1) unsure: p = 0.5
    t_out = {"np": t_np, "hv": torch.zeros(1, 2, 1, 2)}
    s_out = {"np": torch.zeros(1, 2, 1, 2), "hv": torch.zeros(1, 2, 1, 2)}
    s_out["hv"][0, :, 0, 1] = 1.0  # the student differs on HV only at the unsure pixel
    inside, band = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    sure_diff = float((torch.softmax(t_np, 1)[0, 1, 0, 0] - 0.5) ** 2)
    assert float(miac_loss(s_out, t_out, inside, band, min_confidence=0.9)) == pytest.approx(sure_diff, rel=1e-6)
    assert float(miac_loss(s_out, t_out, inside, band)) == pytest.approx((sure_diff + 1.0) / 2, rel=1e-6)
    assert float(miac_loss(s_out, t_out, inside, band, min_confidence=0.99)) == 0.0
