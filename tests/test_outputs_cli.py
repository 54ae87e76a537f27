"""``wsi-ircr segment`` outputs through the command line: ``--outputs`` formats, nucleus
filters, and the files summary.json names (a small synthetic SVS, an untrained model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli as run
from model_fixtures import synthetic_signal_model
from synthetic_slides import synthetic_he, write_aperio_svs

pytestmark = pytest.mark.openslide
SMALL = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--set", "threads_per_worker=1", "--quiet",
         "--fp32"]


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    return write_aperio_svs(root / "he.svs", image, mpp=0.5), synthetic_signal_model(root / "m.pt")


def segment(slide_and_model, out: Path, *extra, capfd) -> dict:
    slide, model = slide_and_model
    code, lines = run("segment", slide, "-o", out, "--model", model, *SMALL, *extra, capfd=capfd)
    assert code == 0, lines
    return json.loads((out / "he" / "summary.json").read_text())


def test_outputs_choose_the_files_and_filters_apply_to_all(slide_and_model, tmp_path, capfd):
    pq = pytest.importorskip("pyarrow.parquet")
    full = segment(slide_and_model, tmp_path / "all", "--outputs", "geojson,csv,parquet", capfd=capfd)
    folder = tmp_path / "all" / "he"
    assert full["outputs"]["parquet"] == "nuclei.parquet" and full["outputs"]["csv"] == "nuclei.csv"
    table = pq.read_table(folder / "nuclei.parquet")
    with open(folder / "nuclei.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert table.num_rows == len(rows) == full["nuclei"] > 5
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    areas = table.column("area_um2").to_numpy()
    cut = float(np.median(areas))

    filtered = segment(slide_and_model, tmp_path / "few", "--outputs", "parquet", "--min-area-um2", cut, capfd=capfd)
    few = tmp_path / "few" / "he"
    assert sorted(filtered["outputs"]) == ["overlay", "parquet", "tile_store", "tissue"]
    assert not (few / "nuclei.csv").exists() and not list(few.glob("*.geojson*"))
    kept = pq.read_table(few / "nuclei.parquet").column("area_um2").to_numpy()
    assert filtered["nuclei"] == len(kept) == int((areas >= cut).sum()) and kept.min() >= cut


def test_unknown_output_is_a_command_error(slide_and_model, tmp_path, capfd):
    slide, model = slide_and_model
    code, lines = run("segment", slide, "-o", tmp_path / "o", "--model", model, *SMALL, "--outputs", "geojson,shp",
                      capfd=capfd)
    assert code == 2 and len(lines) == 1 and "outputs geojson,shp: expected one or more of" in lines[0]
    assert not (tmp_path / "o").exists()


def _roi(path: Path, x1: float, y1: float, name: str = "left") -> Path:
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [x1, 0], [x1, y1], [0, y1], [0, 0]]]},
               "properties": {"objectType": "annotation", "name": name}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_roi_restricts_the_nuclei_and_reports_each_region(slide_and_model, tmp_path, capfd):
    full = segment(slide_and_model, tmp_path / "all", capfd=capfd)
    roi = _roi(tmp_path / "left.geojson", 150, 260)  # the slide is 300 x 260 level-0 px
    part = segment(slide_and_model, tmp_path / "roi", "--roi", roi, capfd=capfd)
    with open(tmp_path / "roi" / "he" / "nuclei.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "all" / "he" / "nuclei.csv", newline="") as f:
        every = list(csv.DictReader(f))
    assert rows and all(float(r["centroid_x"]) <= 150 for r in rows)
    assert len(rows) == part["nuclei"] < full["nuclei"]
    assert len(rows) == sum(float(r["centroid_x"]) <= 150 for r in every)  # the same nuclei, by centroid
    [region] = part["regions"]
    assert region["name"] == "left" and region["nuclei"] == len(rows)
    assert region["area_mm2"] == pytest.approx(150 * 260 * (0.5e-3) ** 2)
    with open(tmp_path / "roi" / "cohort.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row["roi"].startswith(f"left: {len(rows)} nuclei in ")


def test_roi_errors(slide_and_model, tmp_path, capfd):
    slide, model = slide_and_model
    line = tmp_path / "line.geojson"
    line.write_text(json.dumps({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]},
                                "properties": {}}))
    code, lines = run("segment", slide, "-o", tmp_path / "a", "--model", model, *SMALL, "--roi", line, capfd=capfd)
    assert code == 2 and len(lines) == 1 and "is a LineString, not a polygon" in lines[0]
    assert not (tmp_path / "a").exists()
    far = _roi(tmp_path / "far.geojson", 5000, 5000, "big")
    code, lines = run("segment", slide, "-o", tmp_path / "b", "--model", model, *SMALL, "--roi", far, capfd=capfd)
    assert code == 1 and len(lines) == 1 and "region 'big' (x 0..5000, y 0..5000) lies outside the slide" in lines[0]
    other = tmp_path / "other.svs"
    other.write_bytes(slide.read_bytes())
    code, lines = run("segment", slide, other, "-o", tmp_path / "c", "--model", model, *SMALL, "--roi", far, capfd=capfd)
    assert code == 2 and "regions belong to one slide" in lines[0]


def test_cohort_csv_says_which_seconds_are_wall_and_which_concurrent(slide_and_model, tmp_path, capfd):
    slide, model = slide_and_model
    other = tmp_path / "copy.svs"
    other.write_bytes(slide.read_bytes())
    code, lines = run("segment", slide, other, "-o", tmp_path / "o", "--model", model, *SMALL, capfd=capfd)
    assert code == 0, lines
    with open(tmp_path / "o" / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    slide_seconds = [float(r["slide_seconds_concurrent"]) for r in rows]
    wall = [float(r["run_wall_seconds"]) for r in rows]
    assert len(rows) == 2 and min(slide_seconds) > 0
    assert max(wall) >= max(slide_seconds)  # the run's wall clock covers every slide's span


def test_cells_geojson_imports_as_disjoint_cells(slide_and_model, tmp_path, capfd):
    import gzip

    import shapely
    from qupath_geojson import validate_qupath_geojson
    from shapely.geometry import Polygon

    pq = pytest.importorskip("pyarrow.parquet")
    slide, model = slide_and_model
    code, lines = run("segment", slide, "-o", tmp_path / "bad", "--model", model, *SMALL, "--cells", "2", capfd=capfd)
    assert code == 2 and "--cells 2 um needs a halo" in lines[0] and "use --halo 64" in lines[0]
    summary = segment(slide_and_model, tmp_path / "o", "--cells", "2", "--halo", "64", "--outputs",
                      "geojson,csv,parquet", capfd=capfd)
    folder = tmp_path / "o" / "he"
    assert summary["tiles"]["segmented"] > 1  # cells meet across tile borders
    assert validate_qupath_geojson(folder / "he.geojson.gz", object_type="cell") == summary["nuclei"] > 5
    with gzip.open(folder / "he.geojson.gz", "rt") as f:
        features = json.load(f)["features"]
    cells = [Polygon(f["geometry"]["coordinates"][0], f["geometry"]["coordinates"][1:]) for f in features]
    nuclei = [Polygon(f["properties"]["nucleusGeometry"]["coordinates"][0], f["properties"]["nucleusGeometry"]["coordinates"][1:])
              for f in features]
    assert all(c.is_valid and c.buffer(0.01).contains(n) for c, n in zip(cells, nuclei))  # 0.01 px: rounding
    tree = shapely.STRtree(cells)
    pairs = tree.query(cells, predicate="intersects")
    overlaps = [cells[i].intersection(cells[j]).area for i, j in pairs.T if i < j]
    assert max(overlaps, default=0.0) < 0.01  # neighbours touch at most (coordinates rounded to 0.01 px)
    grown = [c.area > n.area for c, n in zip(cells, nuclei)]
    assert sum(grown) >= 0.9 * len(cells)
    m = features[0]["properties"]["measurements"]
    assert {"Cell: Area um^2", "Cytoplasm: Area um^2", "Nucleus: Hematoxylin mean", "Cytoplasm: Eosin std"} <= set(m)
    assert m["Cell: Area um^2"] == pytest.approx(m["Area um^2"] + m["Cytoplasm: Area um^2"], rel=1e-6)
    table = pq.read_table(folder / "nuclei.parquet")
    assert {"cell_geometry", "cell_area_um2", "cytoplasm_hematoxylin_mean"} <= set(table.column_names)
    with open(folder / "nuclei.csv", newline="") as f:
        assert "cell_eosin_mean" in next(csv.reader(f))
