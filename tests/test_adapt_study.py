"""The adaptation study's bookkeeping (benchmarks/experiments/adapt.py): which step's test score is the last step's."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.experiments import adapt as study
from wsi_ircr.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig

SCORES = {"aji": 0.5, "dice": 0.7, "pq": 0.4, "f1": 0.6}


def row(history_aji: list[float], **extra) -> dict:
    return {"target": "nuinsseg", "method": "ircr", "labelled": 0, "seed": 0, "steps": 40 * len(history_aji), "minutes": 1.0,
            "val": SCORES, "test": SCORES,
            "val_history": [{"step": 40 * (i + 1), "aji": a, "dice": 0.7, "pq": 0.4} for i, a in enumerate(history_aji)], **extra}


def test_the_last_steps_test_score_is_recorded_or_the_kept_steps_only_when_it_was_the_last():
    assert study.kept_is_last(row([0.3, 0.4])) and study.test_last(row([0.3, 0.4])) == SCORES
    assert not study.kept_is_last(row([0.4, 0.3])) and study.test_last(row([0.4, 0.3])) is None
    assert not study.kept_is_last(row([0.4, 0.4]))  # ties keep the first step, as the training loop does
    recorded = {**SCORES, "aji": 0.45}
    assert study.test_last(row([0.4, 0.3], test_last=recorded)) == recorded


def test_the_table_shows_the_last_steps_test_scores_and_how_many_seeds_have_them():
    lines = study.table([row([0.3, 0.4]), {**row([0.4, 0.3]), "seed": 1}]).splitlines()
    assert lines[0].count("|") == lines[2].count("|") and "test AJI (last step)" in lines[0]
    assert lines[2].endswith("| 0.500 (1 of 2) | 0.700 (1 of 2) |")


def test_last_model_is_the_teacher_of_last_pt(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "REPO", tmp_path)
    torch.manual_seed(0)
    student, teacher = build_model("lite-s").state_dict(), build_model("lite-s").state_dict()
    save_checkpoint(tmp_path / "run" / "last.pt", Checkpoint(arch="lite-s", model_state=student, mpp=0.25, postprocess=PostProcessConfig(),
                                                             train_state={"teacher": teacher, "step": 160}))
    shipped = load_checkpoint(study.last_model(Path("run")))
    assert shipped.train_state is None
    assert all(torch.equal(shipped.model_state[k], v) for k, v in teacher.items())
    assert not all(torch.equal(shipped.model_state[k], v) for k, v in student.items() if v.is_floating_point())


def test_add_row_keeps_the_rows_other_processes_wrote_and_replaces_a_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path / "adapt.json")
    monkeypatch.setattr(study, "REPO", tmp_path)  # the lock goes to REPO/runs/...
    study.add_row({"target": "consep", "name": "a", "v": 1})
    study.save_rows(study.load_rows() + [{"target": "consep", "name": "b", "v": 2}])  # another process's row
    rows = study.add_row({"target": "consep", "name": "a", "v": 3})
    assert sorted((r["name"], r["v"]) for r in rows) == [("a", 3), ("b", 2)] and rows == study.load_rows()
    assert (tmp_path / study.RUNS / "adapt.lock").exists()
