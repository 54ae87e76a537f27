"""``base:`` in config files: a file laid over another, nested sections merged key by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_ircr.config import read_yaml, resolve_config
from wsi_ircr.errors import UserError
from wsi_ircr.train.config import TrainConfig


def test_a_file_overrides_its_base_key_by_key(tmp_path):
    (tmp_path / "common.yaml").write_text("steps: 100\nlr: 0.001\ndata:\n  mpp: 0.5\n  val: [a]\n")
    (tmp_path / "base.yaml").write_text("base: common.yaml\nsteps: 200\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nlr: 0.002\ndata:\n  val: [b, c]\n")
    assert read_yaml(tmp_path / "top.yaml") == {"steps": 200, "lr": 0.002, "data": {"mpp": 0.5, "val": ["b", "c"]}}
    cfg = resolve_config(TrainConfig, tmp_path / "top.yaml", ["steps=7"])
    assert (cfg.steps, cfg.lr, cfg.data.mpp, cfg.data.val) == (7, 0.002, 0.5, ("b", "c"))


@pytest.mark.parametrize("text, words", [("base: top.yaml\n", "leads back to itself"), ("base: 3\n", "base must be"),
                                         ("base: missing.yaml\n", "config file not found")])
def test_bad_bases_are_one_line_errors(tmp_path, text, words):
    (tmp_path / "top.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        read_yaml(tmp_path / "top.yaml")
    assert words in str(e.value) and "\n" not in str(e.value)


TRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
METHOD_FILES = ("supervised", "mean_teacher", "mt_piac", "mt_miac", "mt_miac_balanced", "ircr", "custom")


@pytest.mark.parametrize("name", METHOD_FILES)
def test_method_configs_lay_their_keys_over_one_base(name):
    assert read_yaml_one_level(TRAIN_CONFIGS / f"{name}.yaml").get("base") == "base.yaml"
    cfg = resolve_config(TrainConfig, TRAIN_CONFIGS / f"{name}.yaml")
    assert cfg.semi_supervised == (name != "supervised")
    if cfg.semi_supervised:
        assert cfg.mt_weight == 10.0  # the consistency weight of benchmarks/study.md


def test_bundled_config_still_describes_the_bundled_model():
    from wsi_ircr.config import to_dict
    from wsi_ircr.model.checkpoint import load_checkpoint

    trained = load_checkpoint().meta["config"]
    config = to_dict(resolve_config(TrainConfig, TRAIN_CONFIGS / "bundled.yaml"))
    defaults = to_dict(TrainConfig())
    # a field added after the bundled model was trained matches when its default is a no-op
    def as_trained(k):
        value = trained.get(k, defaults[k])
        return {**defaults[k], **value} if isinstance(value, dict) else value

    differ = {k for k in config if as_trained(k) != config[k]}
    assert differ == {"bf16"} and trained.get("bf16") is None and config["bf16"] is False  # trained before bf16 existed: fp32


def read_yaml_one_level(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
