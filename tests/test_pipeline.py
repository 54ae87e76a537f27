"""The whole-slide pipeline end to end through its library API (``segment_slide``,
``tile_slide``) on synthetic Aperio SVS and pyramidal TIFF slides: outputs and summary,
ownership across tile seams, positions at level 0, resume and run-folder rules.

One in-process Dask cluster serves the module; small tiles (256 + 2 x 32 px) keep each run
to a few seconds."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import shapely
from model_fixtures import signal_checkpoint
from PIL import Image
from qupath_geojson import validate_qupath_geojson
from shapely.geometry import shape
from synthetic_slides import synthetic_he, write_aperio_svs, write_pyramidal_tiff

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import bundled_model_path, file_hash
from wsi_ircr.slide import pipeline
from wsi_ircr.slide.cluster import local_client
from wsi_ircr.slide.cohort import segment_slides
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.geojson import feature_uuid
from wsi_ircr.slide.pipeline import model_info, tile_slide
from wsi_ircr.slide.store import TileStore

pytestmark = pytest.mark.openslide
SMALL = {"core_px": 256, "halo_px": 32, "max_nucleus_um": 8.0, "threads_per_worker": 1}
RUN_CONFIGS = {
    "svs": lambda model: small_config(model=str(model)),
    "tiff": lambda model: small_config(model=str(model), tissue_mask=False),
}
OUTPUTS = ("geojson.gz", "nuclei.csv", "overlay.png", "tissue.png", "summary.json", "tiles.zarr", "run.json")


def small_config(**changes) -> SegmentConfig:
    return SegmentConfig(**{**SMALL, **changes})


def segment_slide(slide, out_root, config, client, info, **kwargs) -> dict:
    """One slide through ``segment_slides``: its summary, or its error raised as a UserError."""
    slide = Path(slide).absolute()
    report = segment_slides([slide], out_root, config, client, info, **kwargs)
    if report.failed:
        raise UserError(report.failed[slide])
    return report.summaries[slide]


@pytest.fixture(scope="module")
def client():
    with local_client(small_config()) as c:
        yield c


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """An untrained checkpoint: deterministic, many instances (some across seams), no accuracy."""
    image, _ = synthetic_he((256, 256), n_nuclei=20, seed=7)
    return signal_checkpoint(tmp_path_factory.mktemp("model") / "random.pt", image)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """An Aperio SVS at 0.5 mpp (3x3 tiles at the model's 0.25 mpp) and a 3-level
    pyramidal TIFF at 0.25 mpp (2x2 tiles; 0.1 mm across, too small for the tissue
    detector's smallest piece, so it runs without tissue mask)."""
    root = tmp_path_factory.mktemp("slides")
    svs_image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    tiff_image, _ = synthetic_he((400, 480), n_nuclei=60, seed=4, radius_px=(8, 12))
    return {
        "svs": write_aperio_svs(root / "he.svs", svs_image, mpp=0.5),
        "tiff": write_pyramidal_tiff(root / "pyr.tiff", tiff_image, mpp=0.25, n_levels=3),
    }


@pytest.fixture(scope="module")
def runs(slides, random_model, client, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """kind -> (summary, run folder) of one random-model run per slide."""
    root = tmp_path_factory.mktemp("runs")
    info = model_info(small_config(model=str(random_model)))
    out = {}
    for kind, slide in slides.items():
        summary = segment_slide(slide, root, RUN_CONFIGS[kind](random_model), client, info)
        out[kind] = summary, Path(summary["out_dir"])
    return out


def read_features(run_dir: Path) -> list[dict]:
    [path] = run_dir.glob("*.geojson.gz")
    with gzip.open(path, "rt") as f:
        return json.load(f)["features"]


def read_table(run_dir: Path) -> list[dict]:
    with open(run_dir / "nuclei.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_outputs_and_summary(kind, runs, slides, random_model):
    summary, out = runs[kind]
    stem = slides[kind].stem
    for suffix in OUTPUTS:
        name = f"{stem}.{suffix}" if suffix == "geojson.gz" else suffix
        assert (out / name).exists(), name
    assert not (out / "work").exists()
    n_features = validate_qupath_geojson(out / f"{stem}.geojson.gz")
    rows = read_table(out)
    assert summary["nuclei"] == n_features == len(rows) > 10
    # ids: uuid5 of (fingerprint, model hash, global id), global ids 1..n without gaps
    namespace = f"{summary['fingerprint']}:{summary['model']['hash']}"
    features = read_features(out)
    assert [f["id"] for f in features] == [feature_uuid(namespace, k) for k in range(1, n_features + 1)]
    assert [r["id"] for r in rows] == [f["id"] for f in features]
    # every polygon inside the slide, every table centroid inside its polygon's box
    width, height = summary["dimensions_xy"]
    polygons = np.array([shape(f["geometry"]) for f in features], dtype=object)
    bounds = shapely.bounds(polygons)
    assert bounds[:, :2].min() >= 0 and bounds[:, 2].max() <= width and bounds[:, 3].max() <= height
    centroids = np.array([[float(r["centroid_x"]), float(r["centroid_y"])] for r in rows])
    assert (centroids >= bounds[:, :2]).all() and (centroids <= bounds[:, 2:]).all()
    area_um2 = np.array([f["properties"]["measurements"]["Area um^2"] for f in features])
    ratio = area_um2 / (shapely.area(polygons) * summary["slide_mpp"] ** 2)
    assert 0.9 < np.median(ratio) < 1.3, "measurements and polygons disagree on the scale"

    assert summary["slide_mpp"] == pytest.approx({"svs": 0.5, "tiff": 0.25}[kind], rel=1e-3)
    assert summary["mpp_source"].startswith("metadata") and summary["model_mpp"] == 0.25
    assert summary["model"]["hash"] == file_hash(random_model)
    assert summary["config"] == to_dict(RUN_CONFIGS[kind](random_model))
    assert {"torch", "numpy", "zarr", "distributed", "openslide-python"} <= set(summary["versions"])
    assert {"plan_tissue", "tiles_wall", "stitch_export", "overlay", "total"} <= set(summary["seconds"])
    assert {"read_decode", "tile_load", "inference", "postprocess"} <= set(summary["task_seconds"])
    assert summary["resumed"] is False and summary["tiles"]["reused_results"] == 0
    assert summary["tiles"]["reused_from_store"] == 0 and summary["nuclei_dropped_at_halo"] >= 0
    assert summary["peak_rss_mb"]["driver"] > 50 and summary["peak_rss_mb"]["workers"] > 50
    assert summary["bounds_offset_xy"] == [0, 0]
    store = TileStore.open(out / "tiles.zarr")
    assert store.complete and store.n_tiles == summary["tiles"]["segmented"] > 1
    overlay = Image.open(out / "overlay.png")
    assert overlay.width >= min(width, 2048)
    tissue = np.asarray(Image.open(out / "tissue.png"))
    assert tissue.dtype == np.uint8 and (tissue > 0).any()


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_every_nucleus_once_across_tile_seams(kind, runs):
    """No two exported polygons overlap substantially, and some of them do cross a core
    boundary (the seams are exercised)."""
    summary, out = runs[kind]
    polygons = np.array([shape(f["geometry"]) for f in read_features(out)], dtype=object)
    tree = shapely.STRtree(polygons)
    a, b = tree.query(polygons, predicate="intersects")
    pairs = a < b
    a, b = a[pairs], b[pairs]
    inter = shapely.area(shapely.intersection(polygons[a], polygons[b]))
    iou = inter / (shapely.area(polygons[a]) + shapely.area(polygons[b]) - inter)
    assert not (iou > 0.5).any(), f"{int((iou > 0.5).sum())} pairs of duplicated nuclei"
    seam_px = summary["tiles"]["core_px"] * summary["model_mpp"] / summary["slide_mpp"]
    bounds = shapely.bounds(polygons)
    crosses = [np.floor(bounds[:, k] / seam_px) != np.floor(bounds[:, k + 2] / seam_px) for k in (0, 1)]
    assert (crosses[0] | crosses[1]).sum() >= 3


def _true_centroids_xy(labels: np.ndarray) -> np.ndarray:
    """float (n, 2) level-0 (x, y) pixel-centre centroids of labels 1..n."""
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    count = np.bincount(lab)[1:]
    return np.stack([np.bincount(lab, cols + 0.5)[1:] / count, np.bincount(lab, rows + 0.5)[1:] / count], axis=1)


@pytest.mark.parametrize("slide_mpp, radius_px", [(0.25, (8, 12)), (0.5, (4, 6))], ids=["0.25mpp", "0.5mpp-resampled"])
def test_bundled_model_puts_each_nucleus_once_at_level0(slide_mpp, radius_px, client, tmp_path):
    """Real detections on known nuclei (4-6 um across): each true nucleus has exactly one
    exported centroid within 2 level-0 px, with no systematic shift above a quarter of a
    model pixel (a half-pixel or scale error in the resampling or the export would show)."""
    if not bundled_model_path().exists():
        pytest.skip(f"the bundled model {bundled_model_path().name} is not in wsi_ircr/weights yet")
    shape_rc = (500, 600) if slide_mpp == 0.25 else (260, 300)
    image, labels = synthetic_he(shape_rc, n_nuclei=70 if slide_mpp == 0.25 else 50, seed=8, radius_px=radius_px,
                                 tissue_fraction=0.8)
    slide = write_aperio_svs(tmp_path / "known.svs", image, mpp=slide_mpp)
    config = small_config()
    summary = segment_slide(slide, tmp_path / "out", config, client, model_info(config))
    rows = read_table(Path(summary["out_dir"]))
    found = np.array([[float(r["centroid_x"]), float(r["centroid_y"])] for r in rows]).reshape(-1, 2)
    truth = _true_centroids_xy(labels)
    distance = np.linalg.norm(truth[:, None] - found[None], axis=2)
    near = distance < 2.0
    once = near.sum(axis=1) == 1
    assert once.mean() > 0.8, f"{once.mean():.2f} of the nuclei found exactly once"
    assert near.sum(axis=0).max() <= 1, "one polygon matches two true nuclei"
    assert len(found) < 1.2 * len(truth), f"{len(found)} detections for {len(truth)} nuclei"
    nearest = np.argmin(distance, axis=1)
    offset_xy = (found[nearest] - truth)[once].mean(axis=0)
    quarter_model_px = 0.25 * summary["model_mpp"] / slide_mpp  # level-0 px
    assert np.abs(offset_xy).max() < quarter_model_px, f"systematic shift {offset_xy} level-0 px"


def test_blank_slide_is_not_an_error(client, random_model, tmp_path):
    slide = write_pyramidal_tiff(tmp_path / "blank.tiff", np.full((300, 340, 3), 243, np.uint8), mpp=0.5, n_levels=1)
    config = small_config(model=str(random_model))
    summary = segment_slide(slide, tmp_path / "out", config, client, model_info(config))
    out = Path(summary["out_dir"])
    assert summary["nuclei"] == 0 and summary["tiles"]["segmented"] == 0 and summary["tissue_area_mm2"] == 0
    assert validate_qupath_geojson(out / "blank.geojson.gz") == 0
    assert read_table(out) == [] and (out / "overlay.png").exists()


def test_interrupted_run_resumes_to_the_same_result(runs, slides, random_model, client, tmp_path, monkeypatch):
    """A run stopped after the tile store and half of the tiles (simulated by running those
    stages alone) resumes with other execution settings and writes the reference GeoJSON."""
    from wsi_ircr.slide.cluster import client_size
    from wsi_ircr.slide.plan import resolve_plan
    from wsi_ircr.slide.pipeline import forward_boxes
    from wsi_ircr.slide.tasks import SlideJob, segment_batch

    config = small_config(model=str(random_model))
    info = model_info(config)
    folder, plan = tile_slide(slides["svs"], tmp_path, config, client, info)
    store = TileStore.open(folder.store_path)
    half = list(range(store.n_tiles // 2))
    job = SlideJob(str(slides["svs"]), None, plan.fingerprint, str(store.path), str(folder.work_dir), info.path,
                   info.hash, resolve_plan(config, client_size(client)))
    folder.work_dir.mkdir()
    boxes = forward_boxes(plan, store.tiles)  # what the cohort passes: glass is not forwarded
    segment_batch(job, half, [boxes[i] for i in half])
    # the task's saved result is segment_tile's, called directly
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.slide.segmentation import segment_tile
    from wsi_ircr.slide.tasks import load_result

    direct = segment_tile(store.read(0), Predictor(load_checkpoint(random_model), device="cpu"), store.grid,
                          store.tiles[0], box=boxes[0])
    saved = load_result(folder.work_dir, store.tiles[0])
    assert saved.count == direct.count > 0
    np.testing.assert_allclose(saved.centroid_rc, direct.centroid_rc, atol=1e-6)
    chunks = {p: p.stat().st_mtime_ns for p in (store.path / "tiles").rglob("*") if p.is_file()}

    monkeypatch.setattr(pipeline, "CROP_SAMPLE", 5)  # the overlay crops from a small sample
    summary = segment_slide(slides["svs"], tmp_path, small_config(model=str(random_model), batch_tiles=3, device="cpu"),
                            client, info)
    assert summary["resumed"] is True
    assert summary["tiles"]["reused_from_store"] == store.n_tiles
    assert summary["tiles"]["reused_results"] == len(half) > 0
    assert chunks == {p: p.stat().st_mtime_ns for p in (store.path / "tiles").rglob("*") if p.is_file()}
    assert read_features(folder.path) == read_features(runs["svs"][1])
    assert summary["config"]["batch_tiles"] == 3


def test_rerun_after_lost_outputs_gives_identical_geojson(runs, slides, random_model, client, tmp_path):
    """Deleting summary.json and the GeoJSON of a finished run makes it unfinished; the same
    call redoes the segmentation from the kept tile store and writes the same nuclei."""
    reference = runs["tiff"][1]
    out = tmp_path / reference.name
    shutil.copytree(reference, out)
    geojson = out / f"{reference.name}.geojson.gz"
    geojson.unlink()
    (out / "summary.json").unlink()
    config = RUN_CONFIGS["tiff"](random_model)
    summary = segment_slide(slides["tiff"], tmp_path, config, client, model_info(config))
    assert summary["resumed"] is True and summary["tiles"]["reused_results"] == 0
    assert summary["tiles"]["reused_from_store"] == summary["tiles"]["segmented"]
    assert gzip.decompress(geojson.read_bytes()) == gzip.decompress((reference / geojson.name).read_bytes())
    assert (out / "nuclei.csv").read_bytes() == (reference / "nuclei.csv").read_bytes()


def test_unfinished_run_refuses_another_config_slide_or_model(slides, random_model, client, tmp_path):
    config = small_config(model=str(random_model))
    info = model_info(config)
    tile_slide(slides["svs"], tmp_path, config, client, info)
    with pytest.raises(UserError, match=r"unfinished run with another halo_px \(32 -> 48\)"):
        segment_slide(slides["svs"], tmp_path, small_config(model=str(random_model), halo_px=48), client, info,
                      progress=False)
    other_slide = slides["svs"].parent.parent / "other" / "he.svs"
    other_slide.parent.mkdir(exist_ok=True)
    write_aperio_svs(other_slide, synthetic_he((260, 300), n_nuclei=10, seed=9)[0], mpp=0.5)
    with pytest.raises(UserError, match="unfinished run of another slide"):
        segment_slide(other_slide, tmp_path, config, client, info)
    other_model = signal_checkpoint(tmp_path / "other.pt", synthetic_he((256, 256), 20, seed=1)[0], seed=1)
    other = small_config(model=str(other_model))
    with pytest.raises(UserError, match="unfinished run of another model"):
        segment_slide(slides["svs"], tmp_path, other, client, model_info(other))
    assert not (tmp_path / "he" / "summary.json").exists()


def test_workers_refuse_files_that_are_not_the_drivers(slides, random_model, tmp_path):
    """Tasks open the slide and model from their paths; a missing file, another slide or
    another model file at that path is a one-line UserError, not a wrong result."""
    from wsi_ircr.slide.tasks import get_predictor, get_reader

    with pytest.raises(UserError, match="not found on the Dask worker"):
        get_reader(str(tmp_path / "gone.svs"), None, "0" * 32)
    with pytest.raises(UserError, match="differs from the driver's"):
        get_reader(str(slides["svs"]), None, "0" * 32)
    with pytest.raises(UserError, match="not found on the Dask worker"):
        get_predictor(str(tmp_path / "gone.pt"), "0" * 16, "cpu")
    with pytest.raises(UserError, match=f"hash {file_hash(random_model)}, the driver's 0000"):
        get_predictor(str(random_model), "0" * 16, "cpu")


_GPU_BARRIER = threading.Barrier(2, timeout=20)


def _meet_on_the_gpu(_: int) -> bool:
    _GPU_BARRIER.wait()
    return True


def test_local_gpu_tasks_do_not_queue_behind_one_another():
    """With ``device: cuda`` the local worker's threads all run GPU tasks at once (one
    thread's post-processing overlaps another's inference): two GPU tasks meet at a barrier."""
    import dataclasses

    from wsi_ircr.slide.cluster import LocalBackend
    from wsi_ircr.slide.plan import resolve_plan

    config = small_config(device="cuda", threads_per_worker=2)
    backend = LocalBackend(config)
    plan = resolve_plan(config, dataclasses.replace(backend.size(), gpu=True))  # the resources, not a GPU, are tested
    with backend.start(plan) as gpu_client:
        futures = [gpu_client.submit(_meet_on_the_gpu, i, resources={"GPU": 1}, pure=False) for i in range(2)]
        assert gpu_client.gather(futures) == [True, True]
