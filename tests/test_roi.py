"""Regions from QuPath (``--roi``): what a QuPath export looks like, what is refused, the mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box, mapping

from wsi_ircr.errors import UserError
from wsi_ircr.slide.roi import load_regions


def feature(geometry: dict, name: str | None = None, classification: str | None = None) -> dict:
    properties = {"objectType": "annotation"}
    if name:
        properties["name"] = name
    if classification:
        properties["classification"] = {"name": classification, "color": [255, 0, 0]}
    return {"type": "Feature", "id": "a", "geometry": geometry, "properties": properties}


def write(tmp_path, data) -> str:
    path = tmp_path / "roi.geojson"
    path.write_text(json.dumps(data))
    return path


def test_qupath_export_forms_and_names(tmp_path):
    two = mapping(box(0, 0, 10, 10).union(box(20, 20, 30, 30)))  # a MultiPolygon
    collection = {"type": "FeatureCollection",
                  "features": [feature(mapping(box(10, 10, 110, 60)), name="tumour"), feature(two, classification="Stroma"),
                               feature(mapping(box(5, 5, 6, 6)))]}
    regions = load_regions(write(tmp_path, collection), (200, 100))
    assert regions.names == ["tumour", "Stroma", "region 3"]
    assert [p.area for p in regions.polygons] == [5000.0, 200.0, 1.0]
    single = load_regions(write(tmp_path, feature(mapping(box(0, 0, 5, 5)))), (10, 10))  # one Feature
    assert single.names == ["region 1"]
    as_list = load_regions(write(tmp_path, [feature(mapping(box(0, 0, 5, 5)), name="a")]), (10, 10))  # QuPath's list form
    assert as_list.names == ["a"]


def test_centroids_belong_by_region_and_counts(tmp_path):
    regions = load_regions(write(tmp_path, [feature(mapping(box(0, 0, 50, 50)), "a"),
                                            feature(mapping(box(40, 40, 100, 100)), "b")]), (100, 100))
    centroids = np.array([[10.0, 10.0], [45.0, 45.0], [90.0, 90.0], [10.0, 90.0]])
    assert regions.inside(centroids).tolist() == [True, True, True, False]
    regions.count(centroids[regions.inside(centroids)])
    assert regions.counts.tolist() == [2, 2]  # the overlap counts in both
    report = regions.report(slide_mpp=0.5)
    assert report[0]["area_mm2"] == pytest.approx(2500 * 0.25e-6)
    assert report[0]["nuclei_per_mm2"] == pytest.approx(2 / report[0]["area_mm2"])


def test_mask_covers_the_regions(tmp_path):
    regions = load_regions(write(tmp_path, feature(mapping(box(0, 0, 400, 200).difference(box(100, 50, 200, 150))))),
                           (800, 400))
    mask = regions.mask((50, 100), mask_mpp=2.0, slide_mpp=0.25)  # 8 level-0 px per mask px
    assert mask.shape == (50, 100) and not mask[:, 60:].any()
    assert mask[5, 5] and not mask[12, 18]  # the hole is left out
    assert abs(mask.sum() * 64 - regions.polygons[0].area) < 0.25 * regions.polygons[0].area


@pytest.mark.parametrize("case, expect", [
    ("line", "region 'cut' is a LineString, not a polygon"),
    ("point", "is a Point, not a polygon"),
    ("outside", "region 'far' (x 900..1000, y 0..10) lies outside the slide (0..800 x 0..400 level-0 px)"),
    ("empty", "holds no regions"),
    ("not_json", "not a readable GeoJSON file"),
    ("other_json", "not a GeoJSON Feature, list of Features or FeatureCollection"),
    ("missing", "file not found"),
])
def test_bad_regions_are_one_line(tmp_path, case, expect):
    data = {
        "line": feature({"type": "LineString", "coordinates": [[0, 0], [10, 10]]}, "cut"),
        "point": feature({"type": "Point", "coordinates": [1, 1]}),
        "outside": feature(mapping(box(900, 0, 1000, 10)), "far"),
        "empty": {"type": "FeatureCollection", "features": []},
        "other_json": {"a": 1},
    }.get(case)
    path = tmp_path / "roi.geojson"
    if case == "not_json":
        path.write_text("{not json")
    elif data is not None:
        path.write_text(json.dumps(data))
    with pytest.raises(UserError) as error:
        load_regions(path, (800, 400))
    text = str(error.value)
    assert expect in text and text.startswith(f"--roi {path}: ") and "\n" not in text
