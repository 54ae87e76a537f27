"""Which engine runs an in-memory checkpoint: ``precision.resolve_engine(exportable=False)``,
asked by ``Predictor`` like any other (engines run a checkpoint file's cached export)."""

from __future__ import annotations

import pytest
import torch

from wsi_ircr.errors import UserError
from wsi_ircr.model import engines
from wsi_ircr.model.checkpoint import Checkpoint
from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig
from wsi_ircr.model.precision import resolve_engine

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_runs_an_in_memory_network_in_torch(precision):
    assert resolve_engine(precision, CPU, "auto", exportable=False) == "torch"
    assert resolve_engine(precision, CPU, "torch", exportable=False) == "torch"


@pytest.mark.parametrize("precision, engine", [("int8", "auto"), ("fp32", "onnxruntime"), ("fp32", "openvino")])
def test_an_engine_for_an_in_memory_network_is_one_line_saying_what_to_do(precision, engine):
    with pytest.raises(UserError, match="save_checkpoint") as e:
        resolve_engine(precision, CPU, engine, exportable=False)
    assert "\n" not in str(e.value)


def test_the_predictor_of_an_in_memory_checkpoint_asks_resolve_engine():
    checkpoint = Checkpoint(arch="lite-s", model_state=build_model("lite-s").state_dict(), mpp=0.25,
                            postprocess=PostProcessConfig())
    assert not checkpoint.model_hash
    predictor = Predictor(checkpoint, device="cpu", precision="fp32")
    assert predictor.engine == "torch"
    with pytest.raises(UserError, match="save_checkpoint"):
        Predictor(checkpoint, device="cpu", precision="fp32", engine="onnxruntime")


def test_a_checkpoint_file_still_gets_the_installed_engine():
    expected = "onnxruntime" if "onnxruntime" in engines.installed_engines() else "torch"
    assert resolve_engine("fp32", CPU, "auto", exportable=True) == expected
