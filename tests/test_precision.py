"""The precision seam: ``resolve_precision`` rules, the config field and the CLI options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wsi_ircr.errors import UserError
from wsi_ircr.model import precision as prec
from wsi_ircr.model.checkpoint import Checkpoint
from wsi_ircr.model.postprocess import PostProcessConfig
from wsi_ircr.model.precision import resolve_engine, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def checkpoint(record: dict | None = None) -> Checkpoint:
    meta = {} if record is None else {"precision": record}
    return Checkpoint(arch="lite-s", model_state={}, mpp=0.25, postprocess=PostProcessConfig(), meta=meta)


@pytest.fixture
def cpu_kind(monkeypatch):
    """Set whether this CPU has native bf16 and whether the int8 engine is installed."""

    def set_kind(native: bool, engine: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(prec, "int8_engine", lambda: "onnxruntime" if engine else None)

    return set_kind


def entry(aji: float, fp32_aji: float = 0.600) -> dict:
    return {"engine": "onnxruntime", "aji": aji, "fp32_aji": fp32_aji}


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_honoured(cpu_kind, requested):
    cpu_kind(native=False, engine=False)
    assert resolve_precision(requested, CPU, checkpoint()) == requested
    assert resolve_engine(requested, CPU) == "torch"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_without_a_record_is_bf16_where_native(cpu_kind, native, expected):
    cpu_kind(native=native, engine=True)
    assert resolve_precision("auto", CPU, checkpoint()) == expected
    assert resolve_precision("auto", CUDA, checkpoint()) == "bf16"


@pytest.mark.parametrize(("aji", "engine", "expected"), [
    (0.598, True, "int8"),   # within 0.005 of fp32, engine installed
    (0.590, True, "fp32"),   # proven worse than fp32 by more than the tolerance
    (0.598, False, "fp32"),  # accurate, but its engine is missing
])
def test_auto_takes_int8_only_where_proven_and_installed(cpu_kind, aji, engine, expected):
    cpu_kind(native=False, engine=engine)
    record = {"cpu": {"fp32": {"engine": "torch", "aji": 0.600}, "int8": entry(aji)}}
    assert resolve_precision("auto", CPU, checkpoint(record)) == expected


def test_auto_keeps_bf16_first_on_a_bf16_cpu(cpu_kind):
    """On a CPU with native bf16 nothing may get slower: bf16, when proven, beats int8 in the order."""
    cpu_kind(native=True, engine=True)
    record = {"cpu": {"bf16": {"engine": "torch", "aji": 0.601, "fp32_aji": 0.600}, "int8": entry(0.599)}}
    assert resolve_precision("auto", CPU, checkpoint(record)) == "bf16"
    record["cpu"].pop("bf16")  # no bf16 record: the rule validated for every lite network, bf16
    assert resolve_precision("auto", CPU, checkpoint(record)) == "bf16"
    record["cpu"]["bf16"] = {"engine": "torch", "aji": 0.590, "fp32_aji": 0.600}  # recorded as worse
    assert resolve_precision("auto", CPU, checkpoint(record)) == "int8"


def test_an_int8_record_of_another_recipe_proves_nothing(cpu_kind):
    from wsi_ircr.model.engines import RECIPE

    cpu_kind(native=False, engine=True)
    assert resolve_precision("auto", CPU, checkpoint({"cpu": {"int8": {**entry(0.6), "recipe": RECIPE}}})) == "int8"
    assert resolve_precision("auto", CPU, checkpoint({"cpu": {"int8": {**entry(0.6), "recipe": RECIPE - 1}}})) == "fp32"


def test_a_record_for_one_device_says_nothing_of_another(cpu_kind):
    cpu_kind(native=False, engine=True)
    record = {"cpu": {"int8": entry(0.600)}}
    assert resolve_precision("auto", CUDA, checkpoint(record)) == "bf16"  # no cuda record: the default rule
    assert resolve_precision("auto", CPU, checkpoint({"cuda": {"fp32": {"aji": 0.6}}})) == "fp32"


def test_int8_errors_are_one_line_and_name_the_fix(cpu_kind):
    cpu_kind(native=False, engine=False)
    with pytest.raises(UserError, match=r'pip install "wsi-ircr\[cpu-fast\]"') as missing:
        resolve_precision("int8", CPU, checkpoint())
    with pytest.raises(UserError, match="CPU only") as on_gpu:
        resolve_precision("int8", CUDA, checkpoint())
    with pytest.raises(UserError, match="expected one of auto, fp32, bf16, int8"):
        resolve_precision("fp16", CPU, checkpoint())
    assert all("\n" not in str(e.value) for e in (missing, on_gpu))


def test_segment_config_takes_a_precision_not_bf16():
    from wsi_ircr.config import resolve_config
    from wsi_ircr.slide.config import SegmentConfig

    assert SegmentConfig().precision == "auto"
    assert "bf16" not in {f.name for f in dataclasses.fields(SegmentConfig)}
    assert resolve_config(SegmentConfig, None, ["precision=fp32"], {}).precision == "fp32"
    with pytest.raises(UserError):
        resolve_config(SegmentConfig, None, ["precision=fp16"], {})


@pytest.mark.parametrize(("args", "expected"), [
    ([], None), (["--precision", "int8"], "int8"), (["--fp32"], "fp32"), (["--bf16"], "bf16"),
    (["--fp32", "--precision", "fp32"], "fp32"),
])
def test_precision_options_and_their_short_forms(args, expected):
    import click
    from click.testing import CliRunner

    from wsi_ircr.cli.options import precision_option

    @click.command()
    @precision_option
    def show(precision):
        click.echo(repr(precision))

    result = CliRunner().invoke(show, args)
    assert result.exit_code == 0 and result.output.strip() == repr(expected)


def test_conflicting_precision_options_are_a_usage_error(capsys):
    from wsi_ircr.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--images", "x", "--labels", "y", "--fp32", "--precision", "bf16"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "conflicting precisions (bf16, fp32)" in err and len(err.strip().splitlines()) == 1
