"""Validated dataclass configs: YAML files, ``key=value`` overrides, one-line errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from wsi_ircr.config import apply_overrides, from_dict, load_config, read_yaml, to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.model.postprocess import PostProcessConfig
from wsi_ircr.train.config import DataConfig, TrainConfig


@dataclass(frozen=True)
class Inner:
    size: int = 4
    scale: float = 1.0
    names: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    mode: Literal["fast", "exact"] = "fast"
    flag: bool = False
    label: str = "x"
    limit: int | None = None


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# --- from_dict ------------------------------------------------------------------------


def test_defaults_and_nested_dataclass():
    cfg = from_dict(Outer, {"inner": {"size": 8, "scale": 2}, "mode": "exact"})
    assert cfg == Outer(inner=Inner(size=8, scale=2.0), mode="exact")
    assert isinstance(cfg.inner.scale, float)
    assert from_dict(Outer, {}) == Outer()


def test_lists_become_tuples_and_round_trip():
    cfg = from_dict(Outer, {"inner": {"names": ["a", "b"], "pair": [3, 4]}})
    assert cfg.inner.names == ("a", "b") and isinstance(cfg.inner.names, tuple)
    assert cfg.inner.pair == (3, 4.0) and isinstance(cfg.inner.pair[1], float)
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert to_dict(cfg)["inner"]["names"] == ["a", "b"]


@pytest.mark.parametrize(
    "data, words",
    [
        ({"inner": {"size": "big"}}, ["where.inner.size", "integer", "'big'"]),
        ({"inner": {"size": 2.5}}, ["where.inner.size", "integer"]),
        ({"inner": {"size": True}}, ["where.inner.size", "integer"]),
        ({"inner": {"scale": "x"}}, ["where.inner.scale", "number"]),
        ({"flag": "yes"}, ["where.flag", "true or false"]),
        ({"label": 3}, ["where.label", "string"]),
        ({"inner": {"names": "a"}}, ["where.inner.names", "list"]),
        ({"inner": {"names": ["a", 1]}}, ["where.inner.names[1]", "string"]),
        ({"inner": {"pair": [1]}}, ["where.inner.pair", "2 values"]),
        ({"inner": 5}, ["where.inner", "mapping"]),
        ({"limit": "many"}, ["where.limit", "integer"]),
    ],
)
def test_wrong_types_name_the_key(data, words):
    with pytest.raises(UserError) as e:
        from_dict(Outer, data, "where")
    for word in words:
        assert word in one_line(e)


def test_optional_accepts_null():
    assert from_dict(Outer, {"limit": None}).limit is None
    assert from_dict(Outer, {"limit": 3}).limit == 3


def test_literal_values_are_checked():
    with pytest.raises(UserError) as e:
        from_dict(Outer, {"mode": "slow"}, "where")
    assert "where.mode" in one_line(e) and "'slow'" in str(e.value) and "'fast'" in str(e.value)
    with pytest.raises(UserError, match="device"):
        from_dict(TrainConfig, {"device": "gpu"})


def test_unknown_keys_are_errors_top_level_and_nested():
    with pytest.raises(UserError) as e:
        from_dict(Outer, {"modee": "fast"}, "where")
    assert "'modee'" in one_line(e) and "where" in str(e.value) and "mode" in str(e.value)
    with pytest.raises(UserError) as e:
        from_dict(Outer, {"inner": {"sise": 3}}, "where")
    assert "where.inner" in one_line(e) and "'sise'" in str(e.value)


def test_unknown_non_string_keys_do_not_crash():
    with pytest.raises(UserError, match="unknown key"):
        from_dict(Outer, {1: 2, "zzz": 3})


def test_post_init_value_errors_become_user_errors():
    with pytest.raises(UserError) as e:
        from_dict(Outer, {"inner": {"size": 0}}, "where")
    assert "where.inner" in one_line(e) and "size must be >= 1" in str(e.value)
    with pytest.raises(UserError, match="crop_px must be a multiple of 16"):
        from_dict(TrainConfig, {"crop_px": 40})
    with pytest.raises(UserError, match="only one of labelled and labelled_fraction"):
        from_dict(TrainConfig, {"data": {"labelled": 2, "labelled_fraction": 0.5}})
    with pytest.raises(UserError, match="np_threshold"):
        from_dict(TrainConfig, {"postprocess": {"np_threshold": 1.5}})


def test_numbers_in_exponent_notation_are_accepted_for_floats():
    # PyYAML reads "1e-4" as a string (YAML 1.1); float fields must still accept it.
    cfg = load_config(TrainConfig, None, ["lr=1e-4", "weight_decay=5E-5"])
    assert cfg.lr == pytest.approx(1e-4) and cfg.weight_decay == pytest.approx(5e-5)
    for bad in ("lr=fast", "lr=nan", "lr=inf"):
        with pytest.raises(UserError, match="config.lr"):
            load_config(TrainConfig, None, [bad])
    with pytest.raises(UserError, match="integer"):
        load_config(TrainConfig, None, ["steps=1e3"])


# --- YAML files and overrides ----------------------------------------------------------


def test_load_config_from_yaml_with_overrides(tmp_path):
    path = write(tmp_path, "steps: 10\ndata:\n  images: imgs\n  val: [a, b]\npostprocess:\n  np_threshold: 0.4\n")
    cfg = load_config(TrainConfig, path, ["data.labelled=2", "postprocess.min_area_um2=0.75", "steps=20", "arch=lite-m"])
    assert cfg.steps == 20 and cfg.arch == "lite-m"
    assert cfg.data == DataConfig(images="imgs", val=("a", "b"), labelled=2)
    assert cfg.postprocess == PostProcessConfig(np_threshold=0.4, min_area_um2=0.75)
    # overrides parse YAML values: lists, null, booleans
    cfg = load_config(TrainConfig, path, ["data.include=[x, y]", "data.unlabelled=null", "tune_postprocess=false"])
    assert cfg.data.include == ("x", "y") and cfg.data.unlabelled is None and cfg.tune_postprocess is False


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "steps: 10\nmiac_wieght: 3\n")
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, path)
    assert str(path) in one_line(e) and "'miac_wieght'" in str(e.value)
    path = write(tmp_path, "data:\n  imgs: a\n", "nested.yaml")
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, path)
    assert str(path) in one_line(e) and "'imgs'" in str(e.value) and "data" in str(e.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "steps: many\n")
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, path)
    assert f"{path}.steps" in one_line(e)


def test_unknown_override_key_is_an_error():
    with pytest.raises(UserError, match="'stepz'"):
        load_config(TrainConfig, None, ["stepz=3"])
    with pytest.raises(UserError, match="'nope'"):
        load_config(TrainConfig, None, ["data.nope=3"])


@pytest.mark.parametrize("item", ["steps", "steps.x=1", "data.val=[a,", "data.val=: x: y"])
def test_malformed_overrides_are_one_line_user_errors(item):
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, None, [item])
    assert item.split("=")[0].split(".")[0] in one_line(e)


def test_apply_overrides_does_not_modify_its_input():
    data = {"data": {"val": ["a"]}}
    out = apply_overrides(data, ["data.val=[b]", "steps=3"])
    assert out == {"data": {"val": ["b"]}, "steps": 3}
    assert data == {"data": {"val": ["a"]}}


def test_bad_yaml_is_one_line_with_line_number(tmp_path):
    path = write(tmp_path, "steps: 10\nlr: 0.1\ndata: [a, b\narch: x\n")
    with pytest.raises(UserError) as e:
        read_yaml(path)
    text = one_line(e)
    match = re.search(r"at line (\d+)", text)
    assert str(path) in text and match
    assert 3 <= int(match.group(1)) <= 4


@pytest.mark.parametrize("content", [b"- a\n- b\n", b"just text\n", b"\xff\xfe\x00binary\x80"])
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_yaml(path)
    assert str(path) in one_line(e)


def test_empty_yaml_gives_defaults_and_missing_file_is_an_error(tmp_path):
    assert load_config(TrainConfig, write(tmp_path, "# nothing\n")) == TrainConfig()
    with pytest.raises(UserError, match="not found"):
        load_config(TrainConfig, tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml")
                                         if not p.name.startswith("distill")), ids=lambda p: p.name)
def test_shipped_train_configs_are_valid(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.crop_px % 16 == 0
    if cfg.miac_weight or cfg.piac_weight or cfg.mt_weight:
        assert cfg.semi_supervised


def test_shipped_distill_config_is_valid():
    from wsi_ircr.train.distill import DistillConfig

    cfg = load_config(DistillConfig, Path(__file__).resolve().parents[1] / "configs" / "train" / "distill.yaml")
    assert cfg.steps > 0


def test_tune_marker_radii_and_piac_mode_are_validated():
    cfg = load_config(TrainConfig, None, ["tune_marker_radii=[0.2, 0.3]", "piac_mode=consistency"])
    assert cfg.tune_marker_radii == (0.2, 0.3) and cfg.piac_mode == "consistency"
    assert load_config(TrainConfig, None).piac_mode == "pseudo_label"
    for bad, word in [("tune_marker_radii=[]", "tune_marker_radii"), ("tune_marker_radii=[0.3, 0]", "tune_marker_radii"),
                      ("piac_mode=soft", "piac_mode"), ("labelled_strength=-0.5", "labelled_strength"),
                      ("strong_strength=-1", "strong_strength"), ("miac_temperature=0", "miac_temperature")]:
        with pytest.raises(UserError) as e:
            load_config(TrainConfig, None, [bad])
        assert word in one_line(e)
