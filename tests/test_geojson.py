"""Streaming QuPath GeoJSON writer, its validator, and the nuclei table / export (table.py)."""

from __future__ import annotations

import csv
import gzip
import json
import uuid

import numpy as np
import pytest
from qupath_geojson import validate_qupath_geojson
from shapely.geometry import Point, Polygon, box

from wsi_ircr.slide.geojson import NUCLEUS_COLOR, GeoJSONWriter, feature_uuid
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.stitch import owned_instances as owned_and_dropped
from wsi_ircr.slide.stitch import tile_instances
from wsi_ircr.slide.table import (
    MEASUREMENTS,
    TABLE_COLUMNS,
    NucleiTableWriter,
    nucleus_measurements,
)
from wsi_ircr.slide.writers import tile_nuclei


def owned_instances(*args, **kwargs) -> np.ndarray:
    """The owned labels of :func:`owned_and_dropped` (the dropped count is checked apart)."""
    return owned_and_dropped(*args, **kwargs)[0]

SQUARE = box(100.123, 200.456, 110.789, 212.0)


def _load(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["nuclei.geojson", "nuclei.geojson.gz"])
def test_writes_qupath_detections(tmp_path, name):
    path = tmp_path / name
    with GeoJSONWriter(path) as out:
        first = out.write_feature(SQUARE, {"Area um^2": 12.5, "Score": 0.9})
        out.write_feature(box(0, 0, 1, 1), {"Area um^2": 1.0, "Mean intensity": float("nan")})
    assert out.count == 2
    assert validate_qupath_geojson(path) == 2
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == name.endswith(".gz")
    data = _load(path)
    feature = data["features"][0]
    assert feature["id"] == first and uuid.UUID(first).version == 4
    assert feature["properties"] == {
        "objectType": "detection",
        "classification": {"name": "Nucleus", "color": list(NUCLEUS_COLOR)},
        "measurements": {"Area um^2": 12.5, "Score": 0.9},
    }
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and [100.12, 200.46] in ring and [110.79, 212.0] in ring
    assert data["features"][1]["properties"]["measurements"] == {"Area um^2": 1.0}


def test_empty_collection_is_valid(tmp_path):
    path = tmp_path / "empty.geojson.gz"
    with GeoJSONWriter(path) as out:
        pass
    assert out.count == 0
    assert _load(path) == {"type": "FeatureCollection", "features": []}
    assert validate_qupath_geojson(path) == 0


def test_nothing_appears_when_writing_fails(tmp_path):
    path = tmp_path / "nuclei.geojson.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with GeoJSONWriter(path) as out:
            out.write_feature(SQUARE, {})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path):
    path = tmp_path / "nuclei.geojson"
    with GeoJSONWriter(path) as out:
        out.write_feature(SQUARE, {})
    with pytest.raises(ValueError):
        with GeoJSONWriter(path) as out:
            out.write_feature(SQUARE, {})
            out.write_feature(Polygon(), {})
    assert validate_qupath_geojson(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.geojson"]


def test_given_ids_and_holes(tmp_path):
    path = tmp_path / "nuclei.geojson"
    ids = [feature_uuid("slide-abc", i) for i in (1, 2)]
    assert ids[0] == feature_uuid("slide-abc", 1) != feature_uuid("slide-xyz", 1)
    donut = Polygon(box(0, 0, 10, 10).exterior.coords, [box(3, 3, 6, 6).exterior.coords])
    with GeoJSONWriter(path, gzip=False) as out:
        assert out.write_feature(donut, {"Area px^2": 91}, uuid=ids[0]) == ids[0]
        out.write_feature(SQUARE, {}, uuid=ids[1].upper())
    data = _load(path)
    assert [f["id"] for f in data["features"]] == ids
    assert len(data["features"][0]["geometry"]["coordinates"]) == 2
    assert validate_qupath_geojson(path) == 2


def test_write_outside_context_and_bad_input(tmp_path):
    out = GeoJSONWriter(tmp_path / "x.geojson")
    with pytest.raises(RuntimeError, match="context manager"):
        out.write_feature(SQUARE, {})
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "x.geojson", class_color=(0, 300, 0))
    with GeoJSONWriter(tmp_path / "x.geojson") as out:
        with pytest.raises(ValueError):
            out.write_feature(SQUARE, {}, uuid="not-a-uuid")
        with pytest.raises(ValueError):
            out.write_feature(SQUARE.exterior, {})


def _feature(**changes):
    feature = {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]},
        "properties": {"objectType": "detection", "classification": {"name": "Nucleus", "color": [1, 2, 3]},
                       "measurements": {"Area um^2": 1.5}},
    }
    for key, value in changes.items():
        target = feature["properties"] if key in ("objectType", "classification", "measurements", "type") else feature
        target[key] = value
    return feature


BAD = {
    "annotation": _feature(objectType="annotation"),
    "type in properties": _feature(type="detection"),
    "no color": _feature(classification={"name": "Nucleus"}),
    "nan measurement": _feature(measurements={"Area um^2": float("nan")}),
    "open ring": _feature(geometry={"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4]]]}),
    "bow tie": _feature(geometry={"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}),
    "point": _feature(geometry={"type": "Point", "coordinates": [1, 2]}),
    "bad id": _feature(id="nucleus-1"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_validator_rejects(tmp_path, name):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature(), BAD[name]]}))
    with pytest.raises(ValueError, match="feature 1|NaN"):
        validate_qupath_geojson(path)


def test_validator_rejects_duplicate_ids_and_non_collections(tmp_path):
    path = tmp_path / "bad.geojson"
    one = _feature()
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [one, one]}))
    with pytest.raises(ValueError, match="duplicate id"):
        validate_qupath_geojson(path)
    path.write_text(json.dumps([one]))
    with pytest.raises(ValueError, match="FeatureCollection"):
        validate_qupath_geojson(path)
    path.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        validate_qupath_geojson(path)


def test_features_stream_to_disk_before_close(tmp_path):
    path = tmp_path / "nuclei.geojson"
    with GeoJSONWriter(path) as out:
        for _ in range(500):
            out.write_feature(SQUARE, {"Area um^2": 1.0})
        [partial] = list(tmp_path.iterdir())
        assert partial.name != path.name and partial.stat().st_size > 100_000
    assert validate_qupath_geojson(path) == 500


# --- measurements, nuclei table and export of a tile (table.py) ---------------------------


def test_nucleus_measurements_units():
    features = {"area": 100.0, "perimeter": 40.0, "solidity": 0.9, "circularity": 0.8,
                "eccentricity": 0.5, "mean_intensity": 70.0, "extent": 0.7}
    m = nucleus_measurements(features, mpp=0.5, slide_mpp=0.25)
    assert set(m) == set(MEASUREMENTS)
    assert m["Area px^2"] == 400.0 and m["Area um^2"] == 25.0 and m["Perimeter um"] == 20.0
    assert m["Solidity"] == 0.9 and m["Mean intensity"] == 70.0 and np.isnan(m["Score"])
    arrays = nucleus_measurements({k: np.array([v, 2 * v]) for k, v in features.items()}, 0.25, 0.25)
    np.testing.assert_allclose(arrays["Area um^2"], [6.25, 12.5])
    np.testing.assert_allclose(arrays["Area px^2"], [100, 200])


def _read_csv(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["nuclei.csv", "nuclei.csv.gz"])
def test_nuclei_table(tmp_path, name):
    path = tmp_path / name
    m = nucleus_measurements({"area": 100.0, "perimeter": 40.0, "solidity": 0.9}, 0.5, 0.25)
    with NucleiTableWriter(path) as table:
        table.write_row("id-1", (1234.5678, 99.0), m)
    assert table.count == 1
    [row] = _read_csv(path)
    assert tuple(row) == TABLE_COLUMNS
    assert row["id"] == "id-1" and row["centroid_x"] == "1234.57" and row["centroid_y"] == "99.00"
    assert float(row["area_um2"]) == 25.0 and float(row["perimeter_um"]) == 20.0
    assert row["score"] == "" and row["eccentricity"] == ""


def test_nuclei_table_is_atomic(tmp_path):
    with pytest.raises(KeyError):
        with NucleiTableWriter(tmp_path / "nuclei.csv") as table:
            table.write_row("a", (0, 0), {})
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def _tile_instances(scale):
    grid = TileGrid((int(60 * scale), int(60 * scale)), 0.25, 0.25 * scale, core_px=40, halo_px=10)
    labels = np.zeros((grid.tile_px, grid.tile_px), np.int32)
    labels[12:20, 14:24] = 1
    labels[30:36, 30:34] = 2
    labels[2:5, 2:5] = 3  # anchored in the padding above the image: owned by nobody
    owned = owned_instances(labels, grid, (0, 0))
    prob = np.full(labels.shape, 0.9)
    return grid, tile_instances(owned, grid, (0, 0), np_prob=prob)


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_export_tile_writes_matching_geojson_and_table(tmp_path, scale):
    grid, instances = _tile_instances(scale)
    assert instances.count == 2
    nuclei = tile_nuclei(instances, grid, offset=7, namespace="slide-1")
    with GeoJSONWriter(tmp_path / "n.geojson.gz") as geo, NucleiTableWriter(tmp_path / "n.csv") as table:
        geo.write(nuclei)
        table.write(nuclei)
    ids = nuclei.ids
    assert ids == [feature_uuid("slide-1", 8), feature_uuid("slide-1", 9)]
    assert validate_qupath_geojson(tmp_path / "n.geojson.gz") == 2
    features = _load(tmp_path / "n.geojson.gz")["features"]
    rows = _read_csv(tmp_path / "n.csv")
    assert [f["id"] for f in features] == [r["id"] for r in rows] == ids
    for feature, row in zip(features, rows):
        polygon = Polygon(feature["geometry"]["coordinates"][0])
        measurements = feature["properties"]["measurements"]
        assert set(measurements) == set(MEASUREMENTS) - {"Mean intensity"}
        assert polygon.contains(Point(float(row["centroid_x"]), float(row["centroid_y"])))
        assert abs(polygon.area - measurements["Area px^2"]) <= 0.6 * scale**2
        assert float(row["area_um2"]) == pytest.approx(measurements["Area um^2"], rel=1e-5)
        assert measurements["Score"] == pytest.approx(0.9)
    # nucleus 1: target rows 2..9, cols 4..13 (window 12..19 / 14..23 minus the 10 px halo)
    x0, y0, x1, y1 = Polygon(features[0]["geometry"]["coordinates"][0]).bounds
    assert (x0, y0, x1, y1) == (4 * scale, 2 * scale, 14 * scale, 10 * scale)


def test_export_tile_without_namespace_or_table(tmp_path):
    grid, instances = _tile_instances(1.0)
    with GeoJSONWriter(tmp_path / "n.geojson") as geo:
        geo.write(tile_nuclei(instances, grid, offset=0))
    ids = [f["id"] for f in _load(tmp_path / "n.geojson")["features"]]
    assert len(set(ids)) == 2 and all(uuid.UUID(i).version == 4 for i in ids)


def test_validator_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "n.geojson.gz"
    with GeoJSONWriter(path) as out:
        out.write_feature(SQUARE, {})
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="not valid JSON"):
        validate_qupath_geojson(path)
