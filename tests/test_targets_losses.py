"""HV / NP targets and the supervised losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ircr.train.losses import consistency_map, hv_gradients, hv_loss, instance_loss, np_loss
from wsi_ircr.train.targets import hv_targets, np_targets


def disk(shape, centre_rc, radius):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre_rc[0]) ** 2 + (cc - centre_rc[1]) ** 2 <= radius**2


def test_np_targets():
    labels = np.zeros((5, 6), np.int32)
    labels[1:3, 2:5] = 7
    t = np_targets(labels)
    assert t.dtype == np.uint8 and t.sum() == 6 and t[1, 2] == 1 and t[0, 0] == 0


def test_hv_targets_disk_is_symmetric():
    labels = np.zeros((40, 50), np.int32)
    labels[disk(labels.shape, (20, 25), 9)] = 3
    hv = hv_targets(labels)
    assert hv.shape == (2, 40, 50) and hv.dtype == np.float32
    h, v = hv
    assert h[20, 25] == 0 and v[20, 25] == 0
    assert h[20, 16] == -1 and h[20, 34] == 1
    assert v[11, 25] == -1 and v[29, 25] == 1
    np.testing.assert_allclose(h[:, 26:50], -h[:, 24:0:-1], atol=1e-6)
    np.testing.assert_allclose(v[21:40], -v[19:0:-1], atol=1e-6)
    assert np.all(hv[:, labels == 0] == 0)
    assert np.all(np.diff(h[20, 16:35]) > 0)


def test_hv_targets_disk_is_rotation_symmetric():
    labels = np.zeros((41, 41), np.int32)
    labels[disk(labels.shape, (20, 20), 9)] = 1
    h, v = hv_targets(labels)
    np.testing.assert_allclose(h, v.T, atol=1e-6)


def test_hv_targets_touching_instances_flip_sign():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:15] = 1
    labels[5:15, 15:27] = 2
    h, v = hv_targets(labels)
    assert h[10, 14] == 1 and h[10, 15] == -1
    assert h[10, 3] == -1 and h[10, 26] == 1
    np.testing.assert_allclose(v[:, 3:15], v[:, 15:27])
    assert np.abs(hv_targets(labels)).max() <= 1


def test_hv_targets_empty_and_single_pixel():
    assert not hv_targets(np.zeros((4, 4), np.int32)).any()
    one = np.zeros((4, 4), np.int32)
    one[2, 1] = 5
    assert not hv_targets(one).any()


def _logits(target: torch.Tensor, scale: float) -> torch.Tensor:
    sign = target.float() * 2 - 1
    return torch.stack([-sign * scale, sign * scale], dim=1)


def test_np_loss_zero_when_perfect_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 16, 16, generator=gen) > 0.6).long()
    assert float(np_loss(_logits(target, 40.0), target)) == pytest.approx(0.0, abs=1e-6)
    wrong = _logits(1 - target, 2.0)
    assert float(np_loss(wrong, target)) > 1.0
    logits = torch.randn(2, 2, 16, 16, generator=gen, requires_grad=True)
    np_loss(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_np_loss_zero_weight_removes_pixels():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    logits = _logits(target, 40.0)
    bad = logits.clone()
    bad[0, :, 0, 0] = torch.tensor([-40.0, 40.0])
    weight = torch.ones(1, 8, 8)
    assert float(np_loss(bad, target)) > 0.1
    weight[0, 0, 0] = 0
    assert float(np_loss(bad, target, weight)) == pytest.approx(0.0, abs=1e-6)


def test_hv_gradients_axes():
    labels = np.zeros((30, 30), np.int32)
    labels[disk(labels.shape, (15, 15), 8)] = 1
    hv = torch.from_numpy(hv_targets(labels))[None]
    grad = hv_gradients(hv)[0].numpy()
    assert grad[0, 15, 13:18].min() > 0 and grad[1, 13:18, 15].min() > 0
    ramp = torch.arange(10.0).repeat(10, 1)
    g = hv_gradients(torch.stack([ramp, ramp])[None])[0]
    assert g[0, 5, 5] > 0 and g[1, 5, 5] == pytest.approx(0.0, abs=1e-6)


def two_disk_batch() -> np.ndarray:
    """int32 (2, 24, 24): one disk per image (ids 1 and 2, radii 5 and 6 px)."""
    labels = np.zeros((2, 24, 24), np.int32)
    labels[0][disk((24, 24), (8, 8), 5)] = 1
    labels[1][disk((24, 24), (14, 12), 6)] = 2
    return labels


def test_hv_loss_zero_positive_and_gradient():
    labels = two_disk_batch()
    target = torch.from_numpy(np.stack([hv_targets(l) for l in labels]))
    fg = torch.from_numpy(labels > 0).float()
    assert float(hv_loss(target.clone(), target, fg)) == 0.0
    pred = (target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    loss = hv_loss(pred, target, fg)
    assert float(loss.detach()) > 0
    loss.backward()
    assert pred.grad.abs().sum() > 0
    assert float(hv_loss(pred, target, torch.zeros_like(fg)).detach()) == pytest.approx(float(torch.mean((pred - target) ** 2).detach()))


def test_hv_loss_gradient_term_only_inside_fg():
    target = torch.zeros(1, 2, 20, 20)
    fg = torch.zeros(1, 20, 20)
    fg[0, 2:6, 2:6] = 1
    pred = target.clone()
    pred[0, 0, 15, 15] = 0.5
    assert float(hv_loss(pred, target, fg)) == pytest.approx(0.25 / (2 * 400))


def test_weighted_hv_and_instance_loss_ignore_zero_weight_pixels():
    labels = two_disk_batch()
    target_hv = torch.from_numpy(np.stack([hv_targets(l) for l in labels]))
    target_np = torch.from_numpy(labels > 0).long()
    gen = torch.Generator().manual_seed(3)
    out = {"np": torch.randn(2, 2, 24, 24, generator=gen), "hv": target_hv + 0.2 * torch.randn(2, 2, 24, 24, generator=gen)}
    ones = torch.ones(2, 24, 24)
    fg = target_np.float()
    assert float(hv_loss(out["hv"], target_hv, fg, ones)) == pytest.approx(float(hv_loss(out["hv"], target_hv, fg)))
    plain = float(instance_loss(out, target_np, target_hv))
    assert float(instance_loss(out, target_np, target_hv, ones)) == pytest.approx(plain)
    assert float(instance_loss(out, target_np, target_hv, 3 * ones)) == pytest.approx(plain, rel=1e-5)
    # image 1 weighted out: changing the output there changes nothing, elsewhere it does
    half = ones.clone()
    half[1] = 0
    changed = {k: v.clone() for k, v in out.items()}
    changed["np"][1] += 5.0
    changed["hv"][1] -= 0.5
    assert float(instance_loss(changed, target_np, target_hv, half)) == pytest.approx(float(instance_loss(out, target_np, target_hv, half)))
    assert float(instance_loss(changed, target_np, target_hv)) != pytest.approx(plain)


def test_consistency_map_detaches_teacher():
    gen = torch.Generator().manual_seed(2)
    s = {"np": torch.randn(1, 2, 6, 6, generator=gen, requires_grad=True), "hv": torch.rand(1, 2, 6, 6, generator=gen, requires_grad=True)}
    t = {"np": torch.randn(1, 2, 6, 6, generator=gen, requires_grad=True), "hv": torch.rand(1, 2, 6, 6, generator=gen, requires_grad=True)}
    d = consistency_map(s, t)
    assert d.shape == (1, 6, 6) and float(d.detach().min()) >= 0
    d.sum().backward()
    assert s["np"].grad is not None and t["np"].grad is None and t["hv"].grad is None
    assert float(consistency_map(s, s).detach().abs().max()) == 0.0


def test_consistency_map_teacher_temperature_sharpens_the_target():
    # teacher nucleus probability 0.7 everywhere (logit gap log(7/3)); student at the same 0.7
    gap = float(np.log(0.7 / 0.3))
    teacher = {"np": torch.stack([torch.zeros(4, 4), torch.full((4, 4), gap)])[None], "hv": torch.zeros(1, 2, 4, 4)}
    student = {k: v.clone() for k, v in teacher.items()}
    assert float(consistency_map(student, teacher, 1.0).abs().max()) < 1e-12
    sharp_p = 1.0 / (1.0 + np.exp(-gap / 0.5))  # about 0.845
    d = consistency_map(student, teacher, 0.5)
    assert torch.allclose(d, torch.full((1, 4, 4), (sharp_p - 0.7) ** 2, dtype=d.dtype), atol=1e-6)
    # a confident student (p = sharp_p) now matches the sharpened teacher exactly
    student["np"] = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 2 * gap)])[None]
    assert float(consistency_map(student, teacher, 0.5).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="temperature"):
        consistency_map(student, teacher, 0.0)
