"""The bundled models by name (``--model lite-m`` / ``--model fast``) and the distilled CPU
student: its half-resolution network, segmenting, and int8 against fp32."""

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
from wsi_ircr.metrics import aji
from wsi_ircr.model import engines
from wsi_ircr.model.checkpoint import BUNDLED_MODELS, bundled_model_path, load_checkpoint, model_path
from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.net import build_model

needs_fast = pytest.mark.skipif(not bundled_model_path("fast").exists(), reason="the fast model is not bundled")
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
    # the pixel shuffle gives each pixel of a 2 x 2 block its own value
    assert not torch.allclose(out["np"][..., 0:2:2, 0:2:2], out["np"][..., 1:2:2, 1:2:2])


def test_bundled_names_and_paths():
    assert model_path(None) == model_path("lite-m") == bundled_model_path()
    assert model_path("fast").name == BUNDLED_MODELS["fast"] and model_path("fast").parent == bundled_model_path().parent
    assert str(model_path("runs/x/model.pt")) == "runs/x/model.pt"
    with pytest.raises(UserError, match=r"--model fsat: no bundled model of that name and no such file; choose one of lite-m, fast"):
        model_path("fsat")


def _folder(tmp_path):
    image, labels = synthetic_he((256, 256), n_nuclei=30, seed=5)
    for name in ("images", "labels"):
        (tmp_path / name).mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    write_label_png(tmp_path / "labels" / "a.png", labels)
    return tmp_path / "images", tmp_path / "labels"


def test_an_unknown_model_name_is_one_line_listing_the_names(tmp_path, capsys):
    images, labels = _folder(tmp_path)
    code, _, err = run_main(["evaluate", "--images", str(images), "--labels", str(labels), "--model", "quick"], capsys)
    assert code == 2 and err.startswith("error: --model quick: ") and "lite-m, fast" in err
    assert len(err.strip().splitlines()) == 1


@needs_fast
def test_model_fast_segments_a_synthetic_tile(tmp_path, capsys):
    images, labels = _folder(tmp_path)
    out = tmp_path / "scores.json"
    code, _, err = run_main(["evaluate", "--images", str(images), "--labels", str(labels), "--model", "fast", "--device", "cpu",
                             "--precision", "fp32", "--json", str(out), "--quiet"], capsys)
    assert code == 0, err
    scores = json.loads(out.read_text())
    assert scores["model"]["arch"] == "lite-m-half" and scores["model"]["hash"] == load_checkpoint("fast").model_hash
    assert scores["per_image"]["a"]["n_pred"] > 15 and scores["mean"]["aji"] > 0.5


@pytest.fixture(scope="module")
def fast_fp32():
    image = synthetic_he((384, 384), n_nuclei=60, seed=3)[0]
    predictor = Predictor(load_checkpoint("fast"), device="cpu", precision="fp32", engine="torch")
    labels = predictor.instances(*predictor.predict_image_maps(image))
    assert labels.max() > 10
    return image, labels


@needs_fast
@needs_engine
@pytest.mark.slow
def test_the_fast_model_in_int8_agrees_with_fp32_instances(tmp_path, monkeypatch, fast_fp32):
    monkeypatch.setenv("WSI_IRCR_CACHE", str(tmp_path))
    image, reference = fast_fp32
    predictor = Predictor(load_checkpoint("fast"), device="cpu", precision="int8")
    assert (predictor.precision, predictor.engine) == ("int8", "onnxruntime")
    prob, hv = predictor.predict_image_maps(image)
    assert aji(reference, predictor.instances(prob, hv)) >= 0.98
