"""Per-nucleus measurements (QuPath names, one definition) and the streaming nuclei table.

``nucleus_measurements`` turns pixel features at the model ``mpp`` into the QuPath
measurements written to the GeoJSON; the CSV table carries the same numbers under short
column names, keyed by the same feature id. ``export_tile`` writes one tile's nuclei to
both, so the two outputs cannot drift apart.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_ircr.slide.geojson import GeoJSONWriter, atomic_binary, feature_uuid
from wsi_ircr.slide.polygons import to_level0

if TYPE_CHECKING:
    from wsi_ircr.slide.grid import TileGrid
    from wsi_ircr.slide.stitch import TileInstances

AREA_PX = "Area px^2"
AREA_UM = "Area um^2"
PERIMETER_UM = "Perimeter um"
SOLIDITY = "Solidity"
CIRCULARITY = "Circularity"
ECCENTRICITY = "Eccentricity"
MEAN_INTENSITY = "Mean intensity"
SCORE = "Score"
MEASUREMENTS = (AREA_PX, AREA_UM, PERIMETER_UM, SOLIDITY, CIRCULARITY, ECCENTRICITY, MEAN_INTENSITY, SCORE)

# CSV column -> QuPath measurement it holds (after id, centroid_x, centroid_y).
TABLE_MEASUREMENT_COLUMNS = {
    "area_um2": AREA_UM,
    "perimeter_um": PERIMETER_UM,
    "solidity": SOLIDITY,
    "circularity": CIRCULARITY,
    "eccentricity": ECCENTRICITY,
    "mean_intensity": MEAN_INTENSITY,
    "score": SCORE,
}
TABLE_COLUMNS = ("id", "centroid_x", "centroid_y", *TABLE_MEASUREMENT_COLUMNS)


def nucleus_measurements(features: Mapping[str, float | np.ndarray], mpp: float, slide_mpp: float
                         ) -> dict[str, float | np.ndarray]:
    """QuPath measurements from pixel features (scalars, or arrays for many nuclei at once).

    Args:
        features: ``instance_features`` values at the model resolution ("area" px^2,
            "perimeter" px, "solidity", "circularity", "eccentricity", "mean_intensity"
            0-255) and optionally "score" (0-1).
        mpp: microns per pixel of the features (the model's ``mpp``).
        slide_mpp: level-0 microns per pixel.

    Returns:
        ``{name: value}`` for every name in ``MEASUREMENTS``; "Area px^2" is in level-0
        pixels. Missing inputs give NaN (the GeoJSON writer leaves NaN out).
    """
    scale = mpp / slide_mpp
    nan = math.nan
    area = features["area"]
    return {
        AREA_PX: area * scale**2,
        AREA_UM: area * mpp**2,
        PERIMETER_UM: features["perimeter"] * mpp,
        SOLIDITY: features.get("solidity", nan),
        CIRCULARITY: features.get("circularity", nan),
        ECCENTRICITY: features.get("eccentricity", nan),
        MEAN_INTENSITY: features.get("mean_intensity", nan),
        SCORE: features.get("score", nan),
    }


def _cell(value: float, decimals: int | None = None) -> str:
    value = float(value)
    if not math.isfinite(value):
        return ""
    return f"{value:.{decimals}f}" if decimals is not None else f"{value:.6g}"


class NucleiTableWriter:
    """Context manager streaming one CSV row per nucleus into ``path`` (atomic; gzip for ``.gz``).

    Columns ``TABLE_COLUMNS``: id (the GeoJSON feature id), centroid_x / centroid_y
    (level-0 px, 0.01 px), then the measurements of ``TABLE_MEASUREMENT_COLUMNS``;
    NaN is written as an empty cell.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._output: contextlib.AbstractContextManager | None = None
        self._file: io.TextIOWrapper | None = None
        self._writer = None
        self.count = 0

    def __enter__(self) -> NucleiTableWriter:
        if self._output is not None:
            raise RuntimeError(f"{self.path}: writer already open")
        self._output = atomic_binary(self.path, gzip=self.path.suffix == ".gz")
        self._file = io.TextIOWrapper(self._output.__enter__(), encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self.count = 0
        try:
            self._writer.writerow(TABLE_COLUMNS)
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        output, text = self._output, self._file
        self._output = self._file = self._writer = None
        try:
            text.flush()
            text.detach()
        except BaseException as error:
            if exc_type is None:
                output.__exit__(type(error), error, error.__traceback__)
                raise
        return bool(output.__exit__(exc_type, exc, tb))

    def write_row(self, nucleus_id: str, centroid_xy: tuple[float, float], measurements: Mapping[str, float]) -> None:
        """Append one nucleus: its feature id, level-0 centroid and ``nucleus_measurements`` dict."""
        if self._writer is None:
            raise RuntimeError(f"{self.path}: use NucleiTableWriter as a context manager ('with')")
        row = [str(nucleus_id), _cell(centroid_xy[0], 2), _cell(centroid_xy[1], 2)]
        row += [_cell(measurements.get(name, math.nan)) for name in TABLE_MEASUREMENT_COLUMNS.values()]
        self._writer.writerow(row)
        self.count += 1


def export_tile(instances: TileInstances, grid: TileGrid, offset: int, geojson: GeoJSONWriter,
                table: NucleiTableWriter | None = None, namespace: str | None = None) -> list[str]:
    """Write one tile's nuclei to the GeoJSON (and table) in level-0 coordinates.

    Args:
        instances: the tile's owned instances (target-image coordinates).
        grid: the tile grid (target -> level-0 mapping, mpp).
        offset: the tile's global id offset from ``assign_global_ids``.
        geojson: an open GeoJSONWriter.
        table: an open NucleiTableWriter, or None.
        namespace: with a namespace (e.g. slide fingerprint + model hash) ids are
            ``feature_uuid(namespace, global id)`` and reruns reproduce them; else uuid4.

    Returns:
        The feature ids written, in instance order (global ids offset+1 ... offset+count).
    """
    measurements = nucleus_measurements(instances.features, grid.mpp, grid.slide_mpp)
    centroids_xy = grid.target_to_level0_xy(instances.centroid_rc)
    ids = []
    for i, polygon in enumerate(instances.polygons):
        values = {name: float(np.asarray(column)[i]) if np.ndim(column) else float(column)
                  for name, column in measurements.items()}
        uuid = None if namespace is None else feature_uuid(namespace, offset + i + 1)
        feature_id = geojson.write_feature(to_level0(polygon, grid), values, uuid=uuid)
        if table is not None:
            table.write_row(feature_id, centroids_xy[i], values)
        ids.append(feature_id)
    return ids
