"""Streaming QuPath GeoJSON writer and its validator."""

from __future__ import annotations

import gzip
import json
import uuid

import pytest
from shapely.geometry import Polygon, box

from wsi_ircr.slide.geojson import NUCLEUS_COLOR, GeoJSONWriter, feature_uuid, validate_qupath_geojson

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
