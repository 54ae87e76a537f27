"""A checker of QuPath GeoJSON files for tests: loads a whole (possibly gzipped) file and
checks every feature the way QuPath imports nucleus detections; ``raster_features`` draws
features back into an instance map."""

from __future__ import annotations

import gzip as gzip_module
import json
import math
import os
import uuid as uuid_module
from pathlib import Path
from typing import IO

import numpy as np
import shapely
from shapely.geometry import Polygon


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip_module.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _check_feature(feature: object, seen: set[str], object_type: str = "detection") -> None:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise ValueError('not a {"type": "Feature"} object')
    try:
        feature_id = str(uuid_module.UUID(str(feature.get("id"))))
    except ValueError:
        raise ValueError(f"id {feature.get('id')!r} is not a UUID") from None
    if feature_id in seen:
        raise ValueError(f"duplicate id {feature_id}")
    seen.add(feature_id)
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict) or geometry.get("type") != "Polygon":
        raise ValueError("geometry is not a Polygon")
    rings = geometry.get("coordinates")
    if not isinstance(rings, list) or not rings:
        raise ValueError("Polygon has no rings")
    for ring in rings:
        if len(ring) < 4 or ring[0] != ring[-1]:
            raise ValueError("a ring is not closed or has fewer than 4 positions")
    polygon = Polygon(rings[0], rings[1:])
    if polygon.is_empty or not polygon.is_valid:
        raise ValueError(f"invalid polygon: {shapely.is_valid_reason(polygon)}")
    properties = feature.get("properties")
    if not isinstance(properties, dict) or properties.get("objectType") != object_type:
        raise ValueError(f'properties.objectType is not "{object_type}"')
    if object_type == "cell":  # QuPath cells: the nucleus as nucleusGeometry, inside the cell
        nucleus = properties.get("nucleusGeometry")
        if not isinstance(nucleus, dict) or nucleus.get("type") != "Polygon":
            raise ValueError("a cell without a Polygon nucleusGeometry")
        inner = Polygon(nucleus["coordinates"][0], nucleus["coordinates"][1:])
        if not inner.is_valid or not polygon.buffer(0.01).contains(inner):  # coordinates are rounded to 0.01
            raise ValueError("nucleusGeometry is not a valid polygon inside the cell")
    if "type" in properties or "object_type" in properties:
        raise ValueError('properties hold a "type" or pre-0.3 "object_type" key')
    classification = properties.get("classification")
    if not isinstance(classification, dict) or not isinstance(classification.get("name"), str):
        raise ValueError("classification has no name")
    color = classification.get("color")
    if not (isinstance(color, list) and len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
        raise ValueError(f"classification color {color!r} is not [r, g, b] in 0-255")
    measurements = properties.get("measurements", {})
    if not isinstance(measurements, dict):
        raise ValueError("measurements is not an object")
    for name, value in measurements.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"measurement {name!r} = {value!r} is not a finite number")


def validate_qupath_geojson(path: str | os.PathLike, object_type: str = "detection") -> int:
    """Check that a (possibly gzipped) GeoJSON file is a FeatureCollection QuPath imports as
    nucleus detections (``object_type="cell"``: as cells, each with a ``nucleusGeometry``
    inside it); loads the whole file (for tests and spot checks).

    Checks: valid JSON without NaN/Infinity; every feature a Feature with a unique UUID id,
    a valid non-empty Polygon with closed rings, ``properties.objectType == "detection"``,
    no ``type``/``object_type`` key in properties, a classification with a name and an RGB
    color, finite numeric measurements.

    Returns:
        The number of features. Raises ValueError naming the file and the first bad feature.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        try:
            data = json.load(f, parse_constant=_reject_constant)
        except (ValueError, EOFError, OSError) as error:  # bad JSON, NaN, truncated gzip
            raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not (isinstance(data, dict) and data.get("type") == "FeatureCollection"
            and isinstance(data.get("features"), list)):
        raise ValueError(f'{path}: not a {{"type": "FeatureCollection", "features": [...]}} object')
    seen: set[str] = set()
    for index, feature in enumerate(data["features"]):
        try:
            _check_feature(feature, seen, object_type)
        except ValueError as error:
            raise ValueError(f"{path}: feature {index}: {error}") from None
    return len(data["features"])


def raster_features(features: list[dict], shape_rc: tuple[int, int]) -> np.ndarray:
    """int32 (h, w) instance map of GeoJSON features' level-0 polygons (ids 1..n in feature order)."""
    from PIL import Image, ImageDraw

    image = Image.new("I", (shape_rc[1], shape_rc[0]), 0)
    draw = ImageDraw.Draw(image)
    for k, feature in enumerate(features, 1):
        draw.polygon([tuple(p) for p in feature["geometry"]["coordinates"][0]], fill=k)
    return np.asarray(image, np.int32)
