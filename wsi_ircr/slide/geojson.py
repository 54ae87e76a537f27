"""Streaming QuPath GeoJSON: one detection Feature per nucleus, written as it comes.

The file is a ``FeatureCollection`` written incrementally (memory stays flat for millions
of nuclei), gzip-compressed for ``.gz`` paths (QuPath opens ``.geojson.gz`` by
drag-and-drop) and atomic: it appears under its final name only when the writer closes
without an exception. Each feature follows QuPath's format (0.3+)::

    {"type": "Feature", "id": "<uuid4>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x0, y0]]]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "Nucleus", "color": [r, g, b]},
                    "measurements": {"Area um^2": 31.2, ...}}}

with (x, y) in level-0 slide pixels rounded to 0.01 px.
"""

from __future__ import annotations

import json
import math
import os
import uuid as uuid_module
from collections.abc import Mapping
from typing import IO

import shapely
from shapely.geometry import Polygon

from wsi_ircr.io.atomic import StreamWriter

NUCLEUS_CLASS = "Nucleus"
NUCLEUS_COLOR = (230, 160, 0)
COORD_DECIMALS = 2
_HEADER = b'{"type":"FeatureCollection","features":[\n'
_FOOTER = b"\n]}\n"


def feature_uuid(namespace: str, global_id: int) -> str:
    """A reproducible UUID for nucleus ``global_id`` of one run (e.g. namespace = slide
    fingerprint + model hash), so a rerun writes the same ids."""
    return str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, f"wsi-ircr:{namespace}:{int(global_id)}"))


def _finite_measurements(measurements: Mapping[str, float]) -> dict[str, float]:
    """str -> float, dropping NaN and infinite values (QuPath reads a missing one as NaN)."""
    out = {}
    for name, value in measurements.items():
        value = float(value)
        if math.isfinite(value):
            out[str(name)] = value
    return out


def _rings(polygon: Polygon) -> list[list[list[float]]]:
    rings = [polygon.exterior, *polygon.interiors]
    return [shapely.get_coordinates(ring).round(COORD_DECIMALS).tolist() for ring in rings]


class GeoJSONWriter(StreamWriter):
    """Context manager that streams QuPath detection features into ``path``.

    Args:
        path: output file; ``.gz`` paths are gzip-compressed unless ``gzip`` says otherwise.
        gzip: compress (default: ``path`` ends in ``.gz``).
        class_name, class_color: the QuPath classification of every feature (RGB 0-255).
        compresslevel: gzip level 1 (fast) to 9 (small).

    Example::

        with GeoJSONWriter("slide.geojson.gz") as out:
            out.write_feature(polygon_xy, {"Area um^2": 31.2})
        out.count  # features written
    """

    def __init__(self, path: str | os.PathLike, gzip: bool | None = None, class_name: str = NUCLEUS_CLASS,
                 class_color: tuple[int, int, int] = NUCLEUS_COLOR, compresslevel: int = 6):
        super().__init__(path)
        self.gzip = self.path.suffix == ".gz" if gzip is None else bool(gzip)
        color = [int(v) for v in class_color]
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ValueError(f"class_color must be three integers 0-255, got {class_color!r}")
        self._classification = {"name": str(class_name), "color": color}
        self.compresslevel = int(compresslevel)
        self._out: IO[bytes] | None = None

    def _begin(self, out: IO[bytes]) -> None:
        self._out = out
        out.write(_HEADER)

    def _end(self) -> None:
        out, self._out = self._out, None
        out.write(_FOOTER)

    def write_feature(self, polygon_xy: Polygon, measurements: Mapping[str, float], uuid: str | None = None) -> str:
        """Append one detection.

        Args:
            polygon_xy: a valid Polygon in level-0 (x, y) pixels.
            measurements: QuPath measurement name -> number; NaN / inf values are dropped.
            uuid: the feature id (e.g. from :func:`feature_uuid`); a random uuid4 by default.

        Returns:
            The feature id (write it to the nuclei table too).
        """
        self._require_open()
        if not isinstance(polygon_xy, Polygon) or polygon_xy.is_empty:
            raise ValueError(f"expected a non-empty shapely Polygon, got {polygon_xy!r:.80}")
        feature_id = str(uuid_module.uuid4()) if uuid is None else str(uuid_module.UUID(str(uuid)))
        feature = {
            "type": "Feature",
            "id": feature_id,
            "geometry": {"type": "Polygon", "coordinates": _rings(polygon_xy)},
            "properties": {
                "objectType": "detection",
                "classification": self._classification,
                "measurements": _finite_measurements(measurements),
            },
        }
        return self._append(feature)

    def write_cell(self, cell_xy: Polygon, nucleus_xy: Polygon, measurements: Mapping[str, float], uuid: str) -> str:
        """Append one QuPath cell: ``cell_xy`` as its geometry, ``nucleus_xy`` as its
        ``nucleusGeometry`` (both valid Polygons in level-0 (x, y) pixels)."""
        self._require_open()
        feature = {
            "type": "Feature",
            "id": str(uuid_module.UUID(str(uuid))),
            "geometry": {"type": "Polygon", "coordinates": _rings(cell_xy)},
            "properties": {
                "objectType": "cell",
                "classification": self._classification,
                "nucleusGeometry": {"type": "Polygon", "coordinates": _rings(nucleus_xy)},
                "measurements": _finite_measurements(measurements),
            },
        }
        return self._append(feature)

    def _append(self, feature: dict) -> str:
        text = json.dumps(feature, allow_nan=False, separators=(",", ":"))
        self._out.write(((",\n" if self.count else "") + text).encode())
        self.count += 1
        return feature["id"]

    def write(self, nuclei) -> None:
        """Write a tile's ``writers.TileNuclei``: detections, or cells when it has cells."""
        for i, polygon in enumerate(nuclei.polygons_xy):
            if nuclei.cells_xy is None:
                self.write_feature(polygon, nuclei.row(i), uuid=nuclei.ids[i])
            else:
                self.write_cell(nuclei.cells_xy[i], polygon, nuclei.row(i), uuid=nuclei.ids[i])
