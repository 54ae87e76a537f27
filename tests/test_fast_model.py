"""Bundled models by name (``--model lite-m``) and the CPU student's network (lite-m-half):
full-resolution answers from half-resolution work, and its ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_run import run_main
from PIL import Image
from synthetic_slides import synthetic_he

from wsi_ircr.errors import UserError
from wsi_ircr.io.images import write_label_png
from wsi_ircr.model import engines
from wsi_ircr.model.checkpoint import BUNDLED_MODELS, Checkpoint, bundled_model_path, load_checkpoint, model_path, save_checkpoint
from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig

needs_engine = pytest.mark.skipif("onnxruntime" not in engines.installed_engines(),
                                  reason='ONNX Runtime and onnx not installed: pip install "wsi-ircr[cpu-fast]"')


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (48, 33)])
def test_the_half_resolution_network_answers_at_full_resolution(shape):
    torch.manual_seed(0)
    net = build_model("lite-m-half").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *shape))
    assert out["np"].shape == out["hv"].shape == (2, 2, *shape)
    assert out["hv"].abs().max() <= 1
    assert not torch.allclose(out["np"][..., 0, 0], out["np"][..., 1, 1])  # each pixel of a 2 x 2 block its own value


def test_bundled_names_and_paths():
    assert model_path(None) == model_path("lite-m") == bundled_model_path() and bundled_model_path().name == BUNDLED_MODELS["lite-m"]
    assert str(model_path("runs/x/model.pt")) == "runs/x/model.pt"
    with pytest.raises(UserError, match=r"--model lite-n: no bundled model of that name and no such file; choose one of lite-m "):
        model_path("lite-n")


def _folder(tmp_path):
    image, labels = synthetic_he((128, 128), n_nuclei=10, seed=5)
    for name in ("images", "labels"):
        (tmp_path / name).mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    write_label_png(tmp_path / "labels" / "a.png", labels)
    return tmp_path / "images", tmp_path / "labels"


def test_an_unknown_model_name_is_one_line_listing_the_names(tmp_path, capsys):
    images, labels = _folder(tmp_path)
    code, _, err = run_main(["evaluate", "--images", str(images), "--labels", str(labels), "--model", "quick"], capsys)
    assert code == 2 and err.startswith("error: --model quick: ") and "choose one of lite-m" in err
    assert len(err.strip().splitlines()) == 1


def test_model_lite_m_by_name_is_the_bundled_model(tmp_path, capsys):
    images, labels = _folder(tmp_path)
    out = tmp_path / "scores.json"
    code, _, err = run_main(["evaluate", "--images", str(images), "--labels", str(labels), "--model", "lite-m", "--device", "cpu",
                             "--precision", "fp32", "--json", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["model"]["hash"] == load_checkpoint(None).model_hash


@needs_engine
def test_the_half_resolution_network_exports_to_onnx(tmp_path, monkeypatch):
    """Pixel unshuffle / shuffle survive the export: ONNX Runtime fp32 gives torch's maps."""
    monkeypatch.setenv("WSI_IRCR_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = build_model("lite-m-half")
    path = tmp_path / "half.pt"
    save_checkpoint(path, Checkpoint(arch="lite-m-half", model_state=net.state_dict(), mpp=0.25, postprocess=PostProcessConfig()))
    image = synthetic_he((96, 80), n_nuclei=6, seed=2)[0]
    reference = Predictor(load_checkpoint(path), device="cpu", precision="fp32", engine="torch").predict_image_maps(image)
    exported = Predictor(load_checkpoint(path), device="cpu", precision="fp32", engine="onnxruntime").predict_image_maps(image)
    assert all(np.abs(a - b).max() < 1e-3 for a, b in zip(reference, exported))
