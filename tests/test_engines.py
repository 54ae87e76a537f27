"""The CPU engines of the ``cpu-fast`` extra: ONNX Runtime fp32 and int8 against torch fp32,
the export cache, and the one-line errors when the extra is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qupath_geojson import raster_features
from synthetic_slides import synthetic_he

from wsi_ircr.errors import UserError
from wsi_ircr.metrics import aji
from wsi_ircr.model import engines, precision
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.model.inference import Predictor

needs_engine = pytest.mark.skipif("onnxruntime" not in engines.installed_engines(),
                                  reason='ONNX Runtime and onnx not installed: pip install "wsi-ircr[cpu-fast]"')


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    """Every exported graph of this module in one temporary cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("engine-cache")
        mp.setenv("WSI_IRCR_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    """A 384 x 384 synthetic H&E image with 60 nuclei."""
    return synthetic_he((384, 384), n_nuclei=60, seed=3)[0]


@pytest.fixture(scope="module")
def fp32_torch(he_image):
    predictor = Predictor(load_checkpoint(None), device="cpu", precision="fp32", engine="torch")
    prob, hv = predictor.predict_image_maps(he_image)
    labels = predictor.instances(prob, hv)
    assert labels.max() > 10  # the reference finds the nuclei
    return prob, hv, labels


@needs_engine
def test_fp32_in_onnx_runtime_matches_torch(engine_cache, he_image, fp32_torch):
    predictor = Predictor(load_checkpoint(None), device="cpu", precision="fp32", engine="onnxruntime")
    assert (predictor.precision, predictor.engine) == ("fp32", "onnxruntime")
    prob, hv = predictor.predict_image_maps(he_image)
    assert np.abs(prob - fp32_torch[0]).max() < 1e-3 and np.abs(hv - fp32_torch[1]).max() < 1e-3
    assert aji(fp32_torch[2], predictor.instances(prob, hv)) > 0.999


@needs_engine
@pytest.mark.slow
def test_int8_agrees_with_fp32_instances(engine_cache, he_image, fp32_torch):
    """Static int8 (calibrated on the shipped sample-slide crops) keeps the fp32 instances."""
    predictor = Predictor(load_checkpoint(None), device="cpu", precision="int8")
    assert (predictor.precision, predictor.engine) == ("int8", "onnxruntime")
    prob, hv = predictor.predict_image_maps(he_image)
    assert 0 < np.abs(prob - fp32_torch[0]).max() < 0.5  # int8 differs, but not wildly
    assert aji(fp32_torch[2], predictor.instances(prob, hv)) >= 0.98


@needs_engine
def test_the_export_is_cached_per_model_and_written_once(engine_cache, tmp_path):
    from model_fixtures import signal_checkpoint

    image = synthetic_he((64, 64), n_nuclei=4, seed=1)[0]
    first = load_checkpoint(signal_checkpoint(tmp_path / "a.pt", image, seed=0))
    second = load_checkpoint(signal_checkpoint(tmp_path / "b.pt", image, seed=1))
    path = engines.graph_path(first, "fp32")
    assert path.parent.parent == engine_cache and path.name.startswith(first.model_hash)
    mtime = path.stat().st_mtime_ns
    assert engines.graph_path(first, "fp32") == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert engines.graph_path(second, "fp32") != path
    assert not list(path.parent.glob("*.partial"))
    x = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ref = first.build()(x)
    out = engines.EngineNetwork(path, "onnxruntime")(x)
    assert set(out) == {"np", "hv"} and torch.allclose(out["hv"], ref["hv"], atol=1e-4)


@needs_engine
def test_a_cached_graph_runs_without_importing_onnx(engine_cache, tmp_path):
    """The cache key reads package versions from their metadata (the same strings as
    ``__version__``, so keys made before still match); onnx is imported only to build a graph."""
    import json
    import os
    import subprocess
    import sys

    import onnx
    import onnxruntime
    from model_fixtures import signal_checkpoint

    assert (engines.package_version("onnx"), engines.package_version("onnxruntime")) == (onnx.__version__, onnxruntime.__version__)
    model = signal_checkpoint(tmp_path / "a.pt", synthetic_he((64, 64), n_nuclei=4, seed=1)[0])
    built = engines.graph_path(load_checkpoint(model), "fp32")
    code = ("import json, sys, torch; from wsi_ircr.model.checkpoint import load_checkpoint; from wsi_ircr.model import engines; "
            f"net = engines.engine_network(load_checkpoint({str(model)!r}), 'fp32', 'onnxruntime'); "
            "out = net(torch.rand(1, 3, 32, 32)); print(json.dumps([str(net.path), 'onnx' in sys.modules, list(out['np'].shape)]))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WSI_IRCR_CACHE": str(engine_cache)},
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [str(built), False, [1, 2, 32, 32]]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WSI_IRCR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engines.cache_dir() == tmp_path / "xdg" / "wsi-ircr"
    monkeypatch.setenv("WSI_IRCR_CACHE", str(tmp_path / "own"))
    assert engines.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("WSI_IRCR_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engines.cache_dir() == tmp_path / "home" / ".cache" / "wsi-ircr"


def test_a_missing_engine_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(engines, "installed_engines", lambda: [])
    checkpoint = load_checkpoint(None)
    for kwargs in ({"precision": "int8"}, {"precision": "fp32", "engine": "onnxruntime"}):
        with pytest.raises(UserError) as err:
            Predictor(checkpoint, device="cpu", **kwargs)
        assert 'pip install "wsi-ircr[cpu-fast]"' in str(err.value) and "\n" not in str(err.value)
    # without the extra, auto falls back to torch
    assert Predictor(checkpoint, device="cpu", precision="fp32").engine == "torch"
    assert precision.resolve_engine("fp32", torch.device("cpu")) == "torch"


def test_engines_run_fp32_and_int8_on_the_cpu_only(monkeypatch):
    monkeypatch.setattr(engines, "installed_engines", lambda: ["onnxruntime"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve_engine("fp32", cpu) == "onnxruntime"
    assert precision.resolve_engine("int8", cpu) == "onnxruntime"
    assert precision.resolve_engine("bf16", cpu) == "torch" and precision.resolve_engine("fp32", cuda) == "torch"
    assert precision.resolve_engine("fp32", cpu, "torch") == "torch"
    with pytest.raises(UserError, match="CPU only"):
        precision.resolve_engine("bf16", cpu, "onnxruntime")
    with pytest.raises(UserError, match="not in torch"):
        precision.resolve_engine("int8", cpu, "torch")


def test_evaluate_cli_int8_without_the_extra_exits_2(monkeypatch, tmp_path, capsys):
    from PIL import Image

    from wsi_ircr.cli import main

    image, labels = synthetic_he((64, 64), n_nuclei=4, seed=2)
    for name, arr in (("images", image), ("labels", labels.astype(np.uint16))):
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / "t.png")
    monkeypatch.setattr(engines, "installed_engines", lambda: [])
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--device", "cpu",
              "--precision", "int8"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "wsi-ircr[cpu-fast]" in err


@needs_engine
@pytest.mark.slow
def test_a_slide_segmented_in_int8_agrees_with_fp32(engine_cache, tmp_path):
    """The whole segment pipeline on a synthetic slide: int8 in ONNX Runtime (what auto runs for
    the bundled model with the extra where bf16 is not native) against torch fp32, the same nuclei.
    int8 is asked for by name: on a bf16-native CPU auto rightly picks bf16."""
    import gzip
    import json

    from synthetic_slides import write_pyramidal_tiff

    from wsi_ircr.cli import main

    shape_rc = (520, 480)
    slide = write_pyramidal_tiff(tmp_path / "he.tiff", synthetic_he(shape_rc, n_nuclei=90, seed=11)[0], mpp=0.25)
    runs = {}
    for name, options in (("fp32", ["--precision", "fp32", "--set", "engine=torch"]), ("int8", ["--precision", "int8"])):
        out = tmp_path / name
        try:
            main(["segment", str(slide), "-o", str(out), "--core-px", "256", "--halo", "32", "--no-tissue-mask",
                  "--set", "max_nucleus_um=8", "--device", "cpu", "--quiet", *options])
        except SystemExit as e:
            assert e.code in (0, None)
        summary = json.loads((out / "he" / "summary.json").read_text())
        [geojson] = (out / "he").glob("*.geojson.gz")
        runs[name] = (summary["execution"]["ran"], json.loads(gzip.decompress(geojson.read_bytes()))["features"])
    assert [(r["precision"], r["engine"]) for r in runs["fp32"][0]] == [("fp32", "torch")]
    assert [(r["precision"], r["engine"]) for r in runs["int8"][0]] == [("int8", "onnxruntime")]
    ref, got = (raster_features(runs[k][1], shape_rc) for k in ("fp32", "int8"))
    assert ref.max() > 30 and aji(ref, got) >= 0.98
