"""Checkpoint provenance records hashes and relative names, never a machine's absolute paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from wsi_ircr.model.checkpoint import (Checkpoint, bundled_model_path, load_checkpoint, portable_meta, portable_name,
                                       save_checkpoint)
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig

REPO = Path(__file__).resolve().parent.parent


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_bundled_checkpoint_holds_no_absolute_path():
    meta = load_checkpoint(None).meta
    assert meta and [s for s in _strings(meta) if Path(s).is_absolute()] == []
    assert load_checkpoint(None).describe()["path"] == portable_name(bundled_model_path())


def test_portable_meta_makes_paths_relative(tmp_path):
    meta = {"a": str(tmp_path / "runs" / "m.pt"), "b": ["/elsewhere/x/model.pt", "relative/kept.pt"],
            "c": {"d": 3, "e": "text with / slash"}}
    out = portable_meta(meta, tmp_path)
    assert out == {"a": "runs/m.pt", "b": ["model.pt", "relative/kept.pt"], "c": {"d": 3, "e": "text with / slash"}}
    assert portable_name(tmp_path / "x.pt", tmp_path / "other") == "x.pt"


def test_package_model_meta_only_keeps_weights(tmp_path):
    net = build_model("lite-s")
    source = tmp_path / "in.pt"
    save_checkpoint(source, Checkpoint("lite-s", net.state_dict(), 0.25, PostProcessConfig(),
                                       meta={"metrics": {"evaluation": {"model": {"path": str(tmp_path / "runs/m.pt")}}}}))
    target = tmp_path / "out.pt"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "package_model.py"), str(source), str(target), "--meta-only",
                    "--root", str(tmp_path)], check=True, capture_output=True)
    before, after = load_checkpoint(source), load_checkpoint(target)
    assert after.meta["metrics"]["evaluation"]["model"]["path"] == "runs/m.pt"
    assert all(torch.equal(before.model_state[k], after.model_state[k]) for k in before.model_state)
    assert (after.arch, after.mpp, after.postprocess) == (before.arch, before.mpp, before.postprocess)
