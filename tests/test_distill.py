"""Distillation (``wsi_ircr.train.distill``): crops carry the teacher's maps through every
flip and rotation, the loss, and a tiny run that resumes to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import signal_checkpoint
from PIL import Image
from synthetic_slides import synthetic_he

from wsi_ircr.config import load_config
from wsi_ircr.errors import UserError
from wsi_ircr.io.images import write_label_png
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.train.data import TileSet
from wsi_ircr.train.distill import DistillConfig, MapCropSampler, distill, distill_loss, main, turn_hv
from wsi_ircr.train.targets import hv_targets


def _labels(shape=(64, 80)) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    lab[5:20, 10:40], lab[30:60, 50:62], lab[40:50, 5:30] = 1, 2, 3
    return lab


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", range(4))
def test_turned_hv_maps_are_the_targets_of_the_turned_labels(flip, k):
    lab = _labels()
    moved = np.ascontiguousarray(np.rot90(lab[:, ::-1] if flip else lab, k))
    assert np.abs(hv_targets(moved) - turn_hv(hv_targets(lab), flip, k)).max() < 1e-6


def test_crops_keep_maps_and_labels_aligned():
    """Maps made from the labels stay the labels' targets in every sampled crop."""
    rng = np.random.default_rng(0)
    lab = np.zeros((200, 200), np.int32)
    for i in range(1, 30):
        r, c = rng.integers(0, 185, 2)
        lab[r:r + int(rng.integers(5, 14)), c:c + int(rng.integers(5, 14))] = i
    image = np.repeat((lab > 0)[..., None] * 200, 3, axis=2).astype(np.uint8)
    maps = np.concatenate([(lab > 0)[None], hv_targets(lab)]).astype(np.float16)
    batch = MapCropSampler(TileSet(["a"], [image], [lab]), [maps], 64, rng, 0.0, 16).sample(16)
    assert batch["image"].shape == (16, 64, 64, 3) and batch["maps"].shape == (16, 3, 64, 64)
    assert np.array_equal(batch["maps"][:, 0] > 0.5, batch["labels"] > 0)
    assert np.array_equal(batch["image"][..., 0] > 100, batch["labels"] > 0)
    inside = np.abs(batch["maps"][:, 1:] - batch["hv"]).max(axis=1) < 2e-3
    assert inside.mean() > 0.97  # only nuclei cut by the margin window differ


def test_the_loss_is_lowest_where_the_student_matches_the_teacher():
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 32, 32, generator=gen).clamp(0.02, 0.98)
    hv = torch.rand(2, 2, 32, 32, generator=gen) * 2 - 1
    maps = torch.cat([prob[:, None], hv], dim=1)
    match = {"np": torch.stack([torch.zeros_like(prob), torch.log(prob / (1 - prob))], dim=1), "hv": hv}
    off = {"np": match["np"] + 0.5 * torch.randn(match["np"].shape, generator=gen), "hv": hv * 0.8}
    assert distill_loss(match, maps) < distill_loss(off, maps)
    assert float(distill_loss(match, maps)) > 0  # soft cross-entropy keeps the teacher's entropy


def _data(tmp_path):
    folders = {k: tmp_path / k for k in ("images", "labels", "other", "other_labels")}
    for folder in folders.values():
        folder.mkdir()
    for i in range(3):
        image, lab = synthetic_he((128, 128), n_nuclei=14, seed=i)
        Image.fromarray(image).save(folders["images"] / f"t{i}.png")
        write_label_png(folders["labels"] / f"t{i}.png", lab)
        Image.fromarray(image[::-1]).save(folders["other"] / f"o{i}.png")
        write_label_png(folders["other_labels"] / f"o{i}.png", lab[::-1])
    teacher = signal_checkpoint(tmp_path / "teacher.pt", synthetic_he((128, 128), n_nuclei=14, seed=0)[0])
    config = {"data": {"images": "images", "labels": "labels", "val": ["t2"],
                       "extra": [{"images": "other", "labels": "other_labels", "exclude": ["o2"]}]},
              "teacher": "teacher.pt", "steps": 4, "batch_size": 2, "crop_px": 32, "val_every": 4, "checkpoint_every": 2,
              "log_every": 1, "tune_postprocess": False}
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "distill.yaml"


def test_a_tiny_run_ships_the_student_and_resumes_to_the_same_weights(tmp_path):
    config_path = _data(tmp_path)
    cfg = load_config(DistillConfig, config_path)
    lines = []
    summary = distill(cfg, tmp_path / "straight", base_dir=tmp_path, say=lines.append)
    assert "data: 2 labelled, 2 other, 1 validation tiles" in lines
    model = load_checkpoint(tmp_path / "straight" / "model.pt")
    teacher = load_checkpoint(tmp_path / "teacher.pt")
    assert model.arch == "lite-m-half" and model.mpp == teacher.mpp and model.postprocess == teacher.postprocess
    assert model.meta["teacher"] == {"name": "teacher.pt", "hash": teacher.model_hash, "arch": "lite-s"}
    assert model.meta["data"]["val"] == ["t2"] and "o2" not in model.meta["data"]["other"]
    assert summary["history"][-1]["step"] == 4 and "aji" in summary["history"][-1]

    _stop_after(cfg, tmp_path, 2)  # killed after its step-2 checkpoint
    distill(cfg, tmp_path / "partial", base_dir=tmp_path, resume=True, say=lines.append)
    assert "resuming from step 2" in lines
    resumed = load_checkpoint(tmp_path / "partial" / "last.pt").train_state["student"]
    straight = load_checkpoint(tmp_path / "straight" / "last.pt").train_state["student"]
    assert all(torch.allclose(resumed[k].float(), straight[k].float(), atol=1e-5) for k in straight)


def _stop_after(cfg: DistillConfig, tmp_path, steps: int) -> None:
    """Run ``cfg`` into tmp_path/partial and interrupt it when step ``steps`` + 1 begins."""
    from wsi_ircr.train import distill as module

    original = module.Distiller.train_step

    def stop_after(self):
        if self.step >= steps:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(module.Distiller, "train_step", stop_after)
        distill(cfg, tmp_path / "partial", base_dir=tmp_path, say=lambda line: None)


def test_bad_input_is_one_line(tmp_path, capsys):
    config_path = _data(tmp_path)
    assert main(["--config", str(config_path), "--out", str(tmp_path / "r"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing to resume" in err and len(err.strip().splitlines()) == 1
    assert main(["--config", str(config_path), "--out", str(tmp_path / "r"), "--set", "arch=lite-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'lite-q'" in err and len(err.strip().splitlines()) == 1


def test_a_run_can_start_from_a_student_of_the_same_architecture(tmp_path):
    from wsi_ircr.model.checkpoint import file_hash

    config_path = _data(tmp_path)
    first = load_config(DistillConfig, config_path, ["steps=2", "val_every=2"])
    distill(first, tmp_path / "first", base_dir=tmp_path, say=lambda line: None)
    second = load_config(DistillConfig, config_path, ["steps=2", "val_every=2", "init=first/model.pt", "lr=0.0005"])
    distill(second, tmp_path / "second", base_dir=tmp_path, say=lambda line: None)
    model = load_checkpoint(tmp_path / "second" / "model.pt")
    assert model.meta["init"]["hash"] == file_hash(tmp_path / "first" / "model.pt")
    wrong = load_config(DistillConfig, config_path, ["init=teacher.pt"])
    with pytest.raises(UserError, match="a lite-s checkpoint cannot start a lite-m-half student; set arch=lite-s"):
        distill(wrong, tmp_path / "third", base_dir=tmp_path, say=lambda line: None)
