"""Bundled-model readiness: weights stored in float16 (half the file, float32 on load, the same
instances), packaging with provenance, and the ``--model NAME`` registry (a tiny model made
here stands in for a bundled file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_main
from PIL import Image
from synthetic_slides import synthetic_he

from wsi_ircr.errors import UserError
from wsi_ircr.io.images import write_label_png
from wsi_ircr.metrics import score_instances
from wsi_ircr.model import checkpoint as ckpt_mod
from wsi_ircr.model.checkpoint import Checkpoint, bundled_model_path, bundled_names_help, load_checkpoint, model_path, save_checkpoint
from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig
from wsi_ircr.train.config import init_checkpoint_path

REPO = Path(__file__).resolve().parent.parent
needs_bundled = pytest.mark.skipif(not bundled_model_path().exists(), reason="the bundled model is not in wsi_ircr/weights")


@needs_bundled
def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    fp32 = load_checkpoint(None)
    path = tmp_path / "half.pt"
    digest = save_checkpoint(path, fp32, weights_dtype="float16")
    half = load_checkpoint(path)
    assert path.stat().st_size < 0.55 * bundled_model_path().stat().st_size
    assert half.weights_dtype == "float16" and half.describe()["weights_dtype"] == "float16" and fp32.weights_dtype == "float32"
    assert half.model_hash == digest != fp32.model_hash  # the hash names the stored file
    assert torch.load(path, weights_only=True)["model"]["stem.0.weight"].dtype == torch.float16
    for name, value in fp32.model_state.items():
        assert half.model_state[name].dtype == value.dtype  # float32 again (integer counters untouched)
        if value.is_floating_point():
            assert torch.allclose(half.model_state[name], value, rtol=1e-3, atol=1e-4), name
    half.build()  # loads into the network
    half.meta["precision"] = {"cpu": {}}  # a rewrite of the file (validate_precision --write, package_model --meta-only)
    save_checkpoint(path, half)
    assert load_checkpoint(path).weights_dtype == "float16" and path.stat().st_size < 0.55 * bundled_model_path().stat().st_size


@needs_bundled
def test_a_float16_stored_model_gives_the_same_instances_as_float32(tmp_path):
    fp32 = load_checkpoint(None)
    path = tmp_path / "half.pt"
    save_checkpoint(path, fp32, weights_dtype="float16")
    image, _ = synthetic_he((256, 256), n_nuclei=24, seed=3)
    mpp = fp32.mpp
    maps = [Predictor(c, device="cpu", precision="fp32", engine="torch").predict_image_maps(image) for c in (fp32, load_checkpoint(path))]
    assert max(np.abs(a - b).max() for a, b in zip(*maps)) < 0.02  # probability and HV maps, per pixel
    reference = Predictor(fp32, device="cpu", precision="fp32", engine="torch").segment_image(image, mpp)
    stored = Predictor(load_checkpoint(path), device="cpu", precision="fp32", engine="torch").segment_image(image, mpp)
    assert reference.max() >= 10  # the model finds the synthetic nuclei
    assert score_instances(reference, stored)["aji"] >= 0.98


def test_float16_storage_refuses_weights_it_cannot_hold(tmp_path):
    state = {"w": torch.tensor([1.0, 1e6]), "n": torch.tensor(3)}
    with pytest.raises(ValueError, match=r"w: values beyond the range of float16"):
        save_checkpoint(tmp_path / "x.pt", Checkpoint("lite-s", state, 0.25, PostProcessConfig()), weights_dtype="float16")
    with pytest.raises(ValueError, match="weights_dtype must be one of float32, float16"):
        save_checkpoint(tmp_path / "x.pt", Checkpoint("lite-s", state, 0.25, PostProcessConfig()), weights_dtype="int8")


def test_package_model_stores_float16_and_records_its_source(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "run" / "model.pt"
    source.parent.mkdir()
    save_checkpoint(source, Checkpoint("lite-s", build_model("lite-s").state_dict(), 0.25, PostProcessConfig(),
                                       meta={"data": {"labelled": ["a"]}}))
    target = tmp_path / "packaged.pt"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "package_model.py"), str(source), str(target), "--weights-dtype", "float16",
                    "--root", str(tmp_path)], check=True, capture_output=True)
    before, after = load_checkpoint(source), load_checkpoint(target)
    assert after.weights_dtype == "float16"
    assert after.meta["packaged_from"] == {"checkpoint": "run/model.pt", "hash": before.model_hash, "weights_dtype": "float16"}
    assert all(torch.allclose(v, after.model_state[k], rtol=1e-3, atol=1e-4) if v.is_floating_point() else torch.equal(v, after.model_state[k])
               for k, v in before.model_state.items())


@pytest.fixture
def tiny_bundled(tmp_path, monkeypatch):
    """A second bundled model, ``tiny``: a lite-s file in a stand-in weights folder, registered
    the way a shipped one is (one file, one ``BUNDLED_MODELS`` line)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(1)
    save_checkpoint(weights / "ircr-tiny.pt", Checkpoint("lite-s", build_model("lite-s").state_dict(), 0.25, PostProcessConfig()),
                    weights_dtype="float16")
    monkeypatch.setattr(ckpt_mod, "WEIGHTS_DIR", weights)
    monkeypatch.setitem(ckpt_mod.BUNDLED_MODELS, "tiny", "ircr-tiny.pt")
    return weights / "ircr-tiny.pt"


def test_a_registered_model_is_reached_by_name(tiny_bundled, tmp_path):
    assert model_path("tiny") == bundled_model_path("tiny") == tiny_bundled
    assert load_checkpoint("tiny").arch == "lite-s" and load_checkpoint("tiny").weights_dtype == "float16"
    assert init_checkpoint_path("tiny", tmp_path) == tiny_bundled  # train / distill --set init=tiny, teacher=tiny
    assert bundled_names_help() == "lite-m (the default), tiny"
    with pytest.raises(UserError, match=r"--model quick: no bundled model of that name and no such file; choose one of lite-m, tiny "):
        model_path("quick")


def test_evaluate_runs_a_registered_model_by_name(tiny_bundled, tmp_path, capsys):
    image, labels = synthetic_he((128, 128), n_nuclei=10, seed=5)
    for name in ("images", "labels"):
        (tmp_path / name).mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    write_label_png(tmp_path / "labels" / "a.png", labels)
    out = tmp_path / "scores.json"
    code, _, err = run_main(["evaluate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--model", "tiny",
                             "--device", "cpu", "--precision", "fp32", "--json", str(out), "--quiet"], capsys)
    assert code == 0, err
    described = json.loads(out.read_text())["model"]
    assert described["hash"] == load_checkpoint(tiny_bundled).model_hash and described["arch"] == "lite-s"


def test_every_registered_model_is_shipped_and_loads():
    """A BUNDLED_MODELS line without its file (or with a file its architecture does not build) fails here."""
    from wsi_ircr.model.checkpoint import BUNDLED_MODELS

    for name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        assert path.is_file(), f"--model {name}: {path.name} is not in wsi_ircr/weights"
        load_checkpoint(name).build()
