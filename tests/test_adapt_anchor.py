"""What keeps an adapted student honest: the L2-SP pull towards the start (``anchor_weight``)
and the teacher-confidence threshold of the Mean Teacher term (``mt_confidence``)."""

from __future__ import annotations

import pytest
import torch
from test_adapt import cohort  # noqa: F401 (fixture)

from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.train.config import DataConfig, TrainConfig
from wsi_ircr.train.data import load_train_data
from wsi_ircr.train.loop import Trainer, recalibrate_bn, train
from wsi_ircr.train.losses import anchor_l2, mean_teacher_loss


def outputs(np_logits: torch.Tensor, hv: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"np": np_logits, "hv": hv}


def test_mean_teacher_loss_without_threshold_is_the_squared_difference_of_probabilities_and_hv():
    g = torch.Generator().manual_seed(0)
    s = outputs(torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g))
    t = outputs(torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g))
    expected = torch.mean((s["np"].softmax(1) - t["np"].softmax(1)) ** 2) + torch.mean((s["hv"] - t["hv"]) ** 2)
    assert torch.allclose(mean_teacher_loss(s, t), expected)


def test_confidence_threshold_counts_only_pixels_where_the_teacher_is_sure():
    g = torch.Generator().manual_seed(1)
    t_np = torch.zeros(1, 2, 4, 4)
    t_np[0, 1, :2] = 6.0  # top half: nucleus p ~ 1 (sure); bottom half: p = 0.5 (unsure)
    t = outputs(t_np, torch.zeros(1, 2, 4, 4))
    s = outputs(torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g))
    changed = outputs(s["np"].clone(), s["hv"].clone())
    changed["np"][0, :, 2:] += 5.0
    changed["hv"][0, :, 2:] -= 3.0  # only the unsure half differs
    assert mean_teacher_loss(s, t, 0.6) == pytest.approx(float(mean_teacher_loss(changed, t, 0.6)))
    assert mean_teacher_loss(s, t) != pytest.approx(float(mean_teacher_loss(changed, t)))
    top = outputs(s["np"][..., :2, :], s["hv"][..., :2, :])
    assert mean_teacher_loss(s, t, 0.6) == pytest.approx(float(mean_teacher_loss(top, outputs(t_np[..., :2, :], t["hv"][..., :2, :]))))


def test_anchor_is_zero_at_the_start_and_pulls_back_along_the_displacement():
    start = [torch.randn(3, 4), torch.randn(5)]
    params = [p.clone().requires_grad_(True) for p in start]
    assert float(anchor_l2(params, start).detach()) == 0.0
    with torch.no_grad():
        params[0].add_(0.5)
    value = anchor_l2(params, start)
    value.backward()
    assert float(value.detach()) == pytest.approx(12 * 0.25)
    assert torch.allclose(params[0].grad, torch.full((3, 4), 1.0)) and torch.equal(params[1].grad, torch.zeros(5))


@pytest.mark.parametrize("field, value", [("anchor_weight", -0.1), ("mt_confidence", 1.0), ("mt_confidence", -0.2),
                                          ("bn_recalibrate_crops", -1)])
def test_bad_anchor_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def distance_from_start(cohort, tmp_path, anchor_weight: float, steps: int = 4) -> tuple[float, list[dict]]:
    start = load_checkpoint(cohort["model"])
    cfg = TrainConfig(init=str(cohort["model"]), arch="lite-s", mt_weight=1.0, crop_px=32, device="cpu", lr=1e-2,
                      rampup_steps=0, unlabelled_batch_size=2, anchor_weight=anchor_weight)
    data = load_train_data(DataConfig(unlabelled=str(cohort["unlabelled"])))
    trainer = Trainer(cfg, tmp_path, data, start.priors, start)
    records = [trainer.train_step() for _ in range(steps)]
    params = dict(trainer.student.named_parameters())
    return sum(float(((params[k].detach() - v) ** 2).sum()) for k, v in start.model_state.items() if k in params), records


def test_the_anchor_keeps_the_student_nearer_its_start(cohort, tmp_path):
    free, free_records = distance_from_start(cohort, tmp_path / "free", 0.0)
    anchored, records = distance_from_start(cohort, tmp_path / "anchored", 100.0)
    assert "anchor" not in free_records[0] and records[0]["anchor"] == 0.0 and records[1]["anchor"] > 0
    assert 0 < anchored < 0.5 * free


def test_an_anchor_without_a_starting_model_is_one_error(cohort, tmp_path):
    cfg = TrainConfig(data=DataConfig(images=str(cohort["images"]), labels=str(cohort["labels"])), crop_px=32, device="cpu",
                      anchor_weight=0.1)
    with pytest.raises(UserError, match="anchor_weight") as e:
        train(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "last.pt").exists()


def test_recalibrated_batchnorm_statistics_are_the_plain_average_of_the_batches():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    torch.nn.init.eye_(net[0].weight.view(3, 3))
    torch.nn.init.zeros_(net[0].bias)
    net[1].running_mean.fill_(50.0)
    batches = [torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), 3.0), torch.full((2, 3, 4, 4), 8.0)]
    recalibrate_bn(net, iter(batches))
    assert torch.allclose(net[1].running_mean, torch.full((3,), 4.0)) and net[1].momentum == 0.1 and not net.training


def test_validation_recalibrates_the_shipped_network_without_touching_the_training_crops(cohort, tmp_path):
    start = load_checkpoint(cohort["model"])
    data = load_train_data(DataConfig(unlabelled=str(cohort["unlabelled"])))
    runs = {}
    for crops in (0, 8):
        cfg = TrainConfig(init=str(cohort["model"]), arch="lite-s", mt_weight=1.0, crop_px=32, device="cpu", unlabelled_batch_size=2,
                          bn_recalibrate_crops=crops)
        trainer = Trainer(cfg, tmp_path / str(crops), data, start.priors, start)
        trainer.say = lambda line: None
        trainer.train_step()
        trainer.validate_and_save(progress=False)
        runs[crops] = (trainer, dict(trainer.teacher.named_buffers()), trainer.rng.bit_generator.state)
    plain, recal = runs[0], runs[8]
    assert plain[2] == recal[2]  # the same training crops follow
    means = [k for k in plain[1] if k.endswith("running_mean")]
    assert means and not all(torch.allclose(plain[1][k], recal[1][k]) for k in means)
    saved = load_checkpoint(tmp_path / "8" / "best.pt").model_state
    assert all(torch.equal(saved[k], recal[1][k]) for k in means)
