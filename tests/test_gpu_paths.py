"""The code paths a GPU run takes, exercised on the CPU (bf16 autocast, post-processing on the
network's device inside the streamed tile task, the streaming knobs), and, marked ``gpu``, the
same runs on CUDA compared against the CPU's results."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import signal_checkpoint
from qupath_geojson import raster_features
from synthetic_slides import synthetic_he, write_pyramidal_tiff

from wsi_ircr.errors import UserError
from wsi_ircr.metrics import aji
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.model.inference import Predictor, choose_backend, native_bf16

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--core-px", "256", "--halo", "32", "--no-tissue-mask", "--set", "max_nucleus_um=8", "--quiet"]


@pytest.fixture(scope="module")
def he_tiles() -> np.ndarray:
    return np.stack([synthetic_he((256, 256), n_nuclei=40, seed=s)[0] for s in (1, 2)])


def test_backend_follows_the_device():
    assert choose_backend(torch.device("cpu")) == "skimage"
    assert choose_backend(torch.device("cuda")) == "torch"
    assert choose_backend(torch.device("cpu"), "torch") == "torch"
    with pytest.raises(UserError, match="expected one of auto, skimage, torch"):
        choose_backend(torch.device("cpu"), "opencv")


def test_bf16_network_gives_nearly_the_float32_instances(he_tiles):
    """The autocast path CUDA takes by default, on the CPU: the instances barely move."""
    checkpoint = load_checkpoint(None)
    fp32 = Predictor(checkpoint, device="cpu", precision="fp32")
    bf16 = Predictor(checkpoint, device="cpu", precision="bf16")
    assert not fp32.bf16 and bf16.bf16
    p32, h32 = fp32.predict_maps(he_tiles)
    p16, h16 = bf16.predict_maps(he_tiles)
    assert p16.dtype == np.float32 and 0 < np.abs(p16 - p32).max() < 0.1
    for k in range(len(he_tiles)):
        ref = fp32.instances(p32[k], h32[k])
        assert ref.max() > 5 and aji(ref, bf16.instances(p16[k], h16[k])) > 0.9


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_chosen_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, native):
    """``precision="auto"`` (the default everywhere) follows the CPU's native bf16 support; CUDA always has it."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(torch.device("cpu")) is native
    assert native_bf16(torch.device("cuda")) is True
    checkpoint = load_checkpoint(None)
    assert Predictor(checkpoint, device="cpu").bf16 is native
    assert Predictor(checkpoint, device="cpu", precision="fp32").bf16 is False


def test_predict_batch_with_the_torch_backend_returns_instances(he_tiles):
    """The device-side post-processing a CUDA run uses, on the CPU: instances instead of HV,
    agreeing with the reference on the same maps."""
    checkpoint = load_checkpoint(None)
    reference = Predictor(checkpoint, device="cpu")
    on_device = Predictor(checkpoint, device="cpu", postprocess_backend="torch")
    prob, hv, labels = reference.predict_batch(he_tiles)
    prob_t, hv_t, labels_t = on_device.predict_batch(he_tiles)
    assert labels is None and hv.shape == (2, 2, 256, 256)
    assert hv_t is None and labels_t.shape == (2, 256, 256) and labels_t.dtype == np.int32
    np.testing.assert_array_equal(prob, prob_t)
    for k in range(2):
        assert aji(reference.instances(prob[k], hv[k]), labels_t[k]) >= 0.99


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-paths")
    image, _ = synthetic_he((520, 480), n_nuclei=90, seed=11)
    slide = write_pyramidal_tiff(root / "he.tiff", image, mpp=0.25)
    model = signal_checkpoint(root / "model.pt", synthetic_he((256, 256), 20, seed=7)[0])
    return slide, model


def segment(slide: Path, model: Path, out: Path, *options: str) -> list[dict]:
    """``wsi-ircr segment`` in a child process; the GeoJSON features."""
    cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(slide), "-o", str(out), "--model", str(model), *SMALL, *options]
    subprocess.run(cmd, check=True, cwd=REPO)
    [path] = (out / slide.stem).glob("*.geojson.gz")
    return json.loads(gzip.decompress(path.read_bytes()))["features"]


@pytest.mark.slow  # two whole segment processes; the torch flood on the CPU takes about a minute of CPU
def test_torch_postprocessing_through_the_whole_pipeline_matches_the_reference(slide_and_model, tmp_path):
    """``postprocess: torch`` (CUDA's default) on the CPU, in streamed tasks of several
    batches and post-processing threads, against the scikit-image run: same nuclei."""
    slide, model = slide_and_model
    ref = segment(slide, model, tmp_path / "ref", "--device", "cpu", "--fp32")  # the backends compared on the same maps
    got = segment(slide, model, tmp_path / "torch", "--device", "cpu", "--fp32", "--set", "postprocess=torch",
                  "--set", "task_tiles=4", "--set", "batch_tiles=2", "--set", "post_threads=2")
    assert len(ref) > 30
    assert abs(len(got) - len(ref)) <= max(1, len(ref) // 50)
    # the signal model's HV maps are rougher than a trained network's, so the flood's levels
    # matter more (0.93 here; >= 0.999 on the bundled model's maps, benchmarks/postprocess.md);
    # a tile handed the wrong instances would score near 0
    assert aji(raster_features(ref, (520, 480)), raster_features(got, (520, 480))) >= 0.9


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_run(slide_and_model, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU run is compared with the CPU run only where torch sees a GPU")
    slide, model = slide_and_model
    cpu = segment(slide, model, tmp_path / "cpu", "--device", "cpu")
    gpu = segment(slide, model, tmp_path / "gpu", "--device", "cuda")
    assert abs(len(gpu) - len(cpu)) <= max(1, len(cpu) // 50)
    assert aji(raster_features(cpu, (520, 480)), raster_features(gpu, (520, 480))) >= 0.9
    scores_cpu = np.mean([f["properties"]["measurements"]["Score"] for f in cpu])
    scores_gpu = np.mean([f["properties"]["measurements"]["Score"] for f in gpu])
    assert abs(scores_cpu - scores_gpu) < 0.01


@pytest.mark.gpu
def test_cuda_maps_match_cpu_maps(he_tiles):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU maps are compared with the CPU maps only where torch sees a GPU")
    checkpoint = load_checkpoint(None)
    p_cpu, _ = Predictor(checkpoint, device="cpu").predict_maps(he_tiles)
    p_gpu, _ = Predictor(checkpoint, device="cuda").predict_maps(he_tiles)
    assert np.abs(p_cpu - p_gpu).max() < 0.1
