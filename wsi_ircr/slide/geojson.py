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

import contextlib
import gzip as gzip_module
import json
import math
import os
import uuid as uuid_module
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import shapely
from shapely.geometry import Polygon

from wsi_ircr.io.atomic import atomic_path

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


@contextlib.contextmanager
def atomic_binary(path: str | os.PathLike, gzip: bool, compresslevel: int = 6) -> Iterator[IO[bytes]]:
    """A binary file (gzip stream if ``gzip``) that appears at ``path``, fsynced, only when
    the block ends without an exception; otherwise nothing is left behind."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        if gzip:
            with gzip_module.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as out:
                yield out
        else:
            yield raw
        raw.flush()
        os.fsync(raw.fileno())


class GeoJSONWriter:
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
        self.path = Path(path)
        self.gzip = self.path.suffix == ".gz" if gzip is None else bool(gzip)
        color = [int(v) for v in class_color]
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ValueError(f"class_color must be three integers 0-255, got {class_color!r}")
        self._classification = {"name": str(class_name), "color": color}
        self._compresslevel = int(compresslevel)
        self._output: contextlib.AbstractContextManager | None = None
        self._out: IO[bytes] | None = None
        self.count = 0

    def __enter__(self) -> GeoJSONWriter:
        if self._output is not None:
            raise RuntimeError(f"{self.path}: writer already open")
        self._output = atomic_binary(self.path, self.gzip, self._compresslevel)
        self._out = self._output.__enter__()
        self.count = 0
        try:
            self._out.write(_HEADER)
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        output, out = self._output, self._out
        self._output = self._out = None
        if exc_type is None:
            try:
                out.write(_FOOTER)
            except BaseException as error:
                output.__exit__(type(error), error, error.__traceback__)
                raise
        return bool(output.__exit__(exc_type, exc, tb))

    def write_feature(self, polygon_xy: Polygon, measurements: Mapping[str, float], uuid: str | None = None) -> str:
        """Append one detection.

        Args:
            polygon_xy: a valid Polygon in level-0 (x, y) pixels.
            measurements: QuPath measurement name -> number; NaN / inf values are dropped.
            uuid: the feature id (e.g. from :func:`feature_uuid`); a random uuid4 by default.

        Returns:
            The feature id (write it to the nuclei table too).
        """
        if self._out is None:
            raise RuntimeError(f"{self.path}: use GeoJSONWriter as a context manager ('with')")
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
        text = json.dumps(feature, allow_nan=False, separators=(",", ":"))
        self._out.write(((",\n" if self.count else "") + text).encode())
        self.count += 1
        return feature_id
