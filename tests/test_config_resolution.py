"""One configuration path for every command: explicit option > --set > YAML > default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_ircr.cli import main
from wsi_ircr.config import resolve_config, to_dict
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_precedence_explicit_over_set_over_yaml_over_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("halo_px: 48\ncore_px: 512\nbatch_tiles: 3\n")
    config = resolve_config(SegmentConfig, path, ["core_px=384", "batch_tiles=5"], {"batch_tiles": 7, "mpp": None})
    assert (config.halo_px, config.core_px, config.batch_tiles, config.mpp) == (48, 384, 7, None)
    assert config.gzip is SegmentConfig().gzip


def test_explicit_values_are_never_parsed_as_yaml():
    weird = "/data/run #3/tiles: v2"
    config = resolve_config(TrainConfig, None, ["data.images=ignored"], {"data.images": weird, "data.labels": "[x]"})
    assert config.data.images == weird and config.data.labels == "[x]"


def test_train_cli_keeps_hashes_in_paths_and_options_beat_set(tmp_path, monkeypatch):
    seen = {}

    def fake_train(cfg, out_dir, **kwargs):
        seen["cfg"] = cfg
        return {"best": {"aji": 0.5, "step": 1}, "train_seconds": 1.0}

    monkeypatch.setattr("wsi_ircr.train.loop.train", fake_train)
    images = tmp_path / "tiles #1"
    main(["train", "--out", str(tmp_path / "run"), "--images", str(images), "--labels", str(tmp_path / "masks: a"),
          "--steps", "7", "--set", "steps=99", "--set", "seed=4", "--quiet"])
    cfg = seen["cfg"]
    assert cfg.data.images == str(images.resolve()) and cfg.data.labels == str((tmp_path / "masks: a").resolve())
    assert cfg.steps == 7 and cfg.seed == 4


def test_shipped_segment_defaults_are_the_dataclass_defaults():
    packaged = REPO / "wsi_ircr" / "configs" / "segment" / "default.yaml"
    assert yaml.safe_load(packaged.read_text()) == to_dict(SegmentConfig())
    assert (REPO / "configs" / "segment" / "default.yaml").resolve() == packaged.resolve()  # one file, two paths
    assert resolve_config(SegmentConfig, packaged) == SegmentConfig()


@pytest.mark.parametrize("bad, words", [("tasks_in_flight=-1", "tasks_in_flight"), ("torch_threads=x", "torch_threads")])
def test_new_segment_keys_are_validated(bad, words):
    from wsi_ircr.errors import UserError

    with pytest.raises(UserError, match=words):
        resolve_config(SegmentConfig, None, [bad])
