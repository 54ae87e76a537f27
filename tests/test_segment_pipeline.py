"""End-to-end tests of ``wsi-ircr segment`` / ``tile`` on synthetic slides (real OpenSlide,
real zarr, the default local Dask cluster)."""

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
from synthetic_slides import synthetic_he, write_aperio_svs, write_pyramidal_tiff

from wsi_ircr.model.checkpoint import bundled_model_path
from wsi_ircr.slide.geojson import validate_qupath_geojson

SMALL_TILES = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--set", "threads_per_worker=1"]
pytestmark = pytest.mark.openslide


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wsi_ircr", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def features(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["features"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """An untrained checkpoint: deterministic, non-empty output, no accuracy."""
    image, _ = synthetic_he((256, 256), n_nuclei=20, seed=7)
    return signal_checkpoint(tmp_path_factory.mktemp("model") / "random.pt", image)


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An Aperio SVS at 0.5 mpp (resampled 2x for a 0.25 mpp model) with known nuclei."""
    image, labels = synthetic_he((400, 520), n_nuclei=60, seed=3, radius_px=(4, 6))
    path = write_aperio_svs(tmp_path_factory.mktemp("slides") / "he.svs", image, mpp=0.5, compression="jpeg")
    return path, labels


def test_segment_writes_every_output_consistently(he_slide, random_model, tmp_path):
    slide, _ = he_slide
    run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES)
    out = tmp_path / "he"
    for name in ("he.geojson.gz", "nuclei.csv", "overlay.png", "tissue.png", "summary.json", "tiles.zarr", "run.json"):
        assert (out / name).exists(), name
    assert not (out / "work").exists()
    summary = json.loads((out / "summary.json").read_text())
    n_features = validate_qupath_geojson(out / "he.geojson.gz")
    n_rows = len((out / "nuclei.csv").read_text().strip().splitlines()) - 1
    assert summary["nuclei"] == n_features == n_rows
    assert summary["slide_mpp"] == pytest.approx(0.5) and summary["model_mpp"] == 0.25
    assert "metadata" in summary["mpp_source"]
    assert {"plan_tissue", "tile_store", "segment_wall", "stitch_export", "overlay", "total"} <= set(summary["seconds"])
    assert {"inference", "postprocess"} <= set(summary["task_seconds"])
    assert summary["model"]["hash"] and summary["versions"]["torch"] and summary["config"]["core_px"] == 256
    assert summary["tissue_area_mm2"] > 0 and summary["nuclei"] > 10


def test_same_result_whatever_the_tile_batches(he_slide, random_model, tmp_path):
    """Tiles are pure tasks: batching and order do not change the exported nuclei."""
    slide, _ = he_slide
    run_cli("segment", slide, "-o", tmp_path / "a", "--model", random_model, "--quiet", *SMALL_TILES)
    run_cli("segment", slide, "-o", tmp_path / "b", "--model", random_model, "--quiet", *SMALL_TILES,
            "--set", "batch_tiles=3", "--set", "threads_per_worker=2")
    a, b = features(tmp_path / "a/he/he.geojson.gz"), features(tmp_path / "b/he/he.geojson.gz")
    assert len(a) > 10
    assert [f["id"] for f in a] == [f["id"] for f in b]
    assert [f["geometry"] for f in a] == [f["geometry"] for f in b]


def test_finished_run_is_refused_then_overwritten(he_slide, random_model, tmp_path):
    slide, _ = he_slide
    run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES)
    again = run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", "--overwrite", *SMALL_TILES)
    assert (tmp_path / "he" / "summary.json").exists()


def test_tile_then_segment_resumes_from_the_store(he_slide, random_model, tmp_path):
    slide, _ = he_slide
    run_cli("tile", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES)
    assert (tmp_path / "he" / "tiles.zarr").is_dir() and not (tmp_path / "he" / "summary.json").exists()
    run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES)
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert summary["resumed"] is True
    reference = tmp_path / "fresh"
    run_cli("segment", slide, "-o", reference, "--model", random_model, "--quiet", *SMALL_TILES)
    assert features(tmp_path / "he/he.geojson.gz") == features(reference / "he/he.geojson.gz")


def test_unfinished_run_with_another_config_is_refused(he_slide, random_model, tmp_path):
    slide, _ = he_slide
    run_cli("tile", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES)
    other = run_cli("segment", slide, "-o", tmp_path, "--model", random_model, "--quiet", *SMALL_TILES,
                    "--set", "batch_tiles=5", check=False)
    assert other.returncode == 2 and "unfinished run" in other.stderr


def test_blank_slide_gives_an_empty_valid_geojson(random_model, tmp_path):
    slide = write_pyramidal_tiff(tmp_path / "blank.tiff", np.full((300, 300, 3), 243, np.uint8), mpp=0.5, n_levels=1)
    run_cli("segment", slide, "-o", tmp_path / "out", "--model", random_model, "--quiet", *SMALL_TILES)
    summary = json.loads((tmp_path / "out/blank/summary.json").read_text())
    assert summary["nuclei"] == 0 and summary["tiles"]["segmented"] == 0
    assert validate_qupath_geojson(tmp_path / "out/blank/blank.geojson.gz") == 0


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "no_mpp", "tiny", "halo", "cuda"])
def test_bad_input_is_one_line_and_leaves_no_output(case, he_slide, random_model, tmp_path, shared_slides):
    slide, _ = he_slide
    extra = list(SMALL_TILES)
    if case == "missing":
        target = tmp_path / "nope.svs"
    elif case == "directory":
        target = tmp_path
    elif case == "text":
        target = tmp_path / "notes.svs"
        target.write_text("not a slide")
    elif case == "truncated":
        target = tmp_path / "cut.svs"
        target.write_bytes(slide.read_bytes()[:3000])
    elif case == "no_mpp":
        image, _ = synthetic_he((300, 300), n_nuclei=5, seed=1)
        target = tmp_path / "nompp.tiff"
        import tifffile

        tifffile.imwrite(target, image, tile=(256, 256), photometric="rgb")
    elif case == "tiny":
        target = shared_slides / "small.svs"
    elif case == "halo":
        target = slide
        extra = ["--core-px", "256", "--halo", "16"]
    else:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        target = slide
        extra += ["--device", "cuda"]
    out = tmp_path / "out"
    proc = run_cli("segment", target, "-o", out, "--model", random_model, "--quiet", *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert not list(out.rglob("summary.json")) and not list(out.rglob("*.geojson*"))
    if case == "no_mpp":
        assert "--mpp" in lines[0]
        run_cli("segment", target, "-o", out, "--model", random_model, "--quiet", "--mpp", "0.5", *SMALL_TILES)
        assert (out / "nompp" / "summary.json").exists()


def test_unsupported_dicom_is_refused(shared_slides, random_model, tmp_path):
    proc = run_cli("segment", shared_slides / "small_dicom.dcm", "-o", tmp_path, "--model", random_model, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "small_dicom.dcm" in proc.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from wsi_ircr.cli import main\n"
            "for argv in (['--help'], ['segment', '--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules and 'dask' not in sys.modules, 'heavy import'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wsi-ircr segment" in proc.stdout or "Usage" in proc.stdout


needs_bundled = pytest.mark.skipif(not bundled_model_path().exists(), reason="bundled model not present")


@needs_bundled
def test_bundled_model_finds_synthetic_nuclei_at_level0(he_slide, tmp_path):
    """Polygons land on the right level-0 pixels after the 2x resampling, each nucleus once."""
    from shapely.geometry import shape

    slide, labels = he_slide
    run_cli("segment", slide, "-o", tmp_path, "--quiet", *SMALL_TILES)
    polygons = [shape(f["geometry"]) for f in features(tmp_path / "he/he.geojson.gz")]
    centres = np.array([[p.centroid.x, p.centroid.y] for p in polygons])
    ids = np.unique(labels)[1:]
    truth = np.array([[np.mean(np.nonzero(labels == i)[1]) + 0.5, np.mean(np.nonzero(labels == i)[0]) + 0.5] for i in ids])
    distances = np.linalg.norm(truth[:, None] - centres[None], axis=2)
    hits = (distances < 3.0).sum(axis=1)
    assert (hits >= 1).mean() > 0.8, f"found {np.mean(hits >= 1):.2f} of the nuclei"
    assert (hits <= 1).all(), "a nucleus came out twice"


@needs_bundled
@pytest.mark.slow
def test_readme_command_on_the_sample_slide(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    run_cli("segment", repo / "examples/cmu-1-small-region.svs", "-o", tmp_path, "--quiet")
    out = tmp_path / "cmu-1-small-region"
    assert validate_qupath_geojson(out / "cmu-1-small-region.geojson.gz") > 1000
    assert (out / "overlay.png").stat().st_size > 10000
