"""Per-nucleus measurements (QuPath names, one definition) and the streaming nuclei table.

``nucleus_measurements`` turns pixel features at the model ``mpp`` into the QuPath
measurements written to the GeoJSON; the CSV table carries the same numbers under short
column names, keyed by the same feature id; every writer takes the same
``writers.TileNuclei``, so the outputs cannot drift apart.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping

import numpy as np

from wsi_ircr.io.atomic import StreamWriter


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


def column_name(measurement: str) -> str:
    """A measurement's column name: "Area um^2" -> "area_um2", "Cell: Eosin mean" -> "cell_eosin_mean"."""
    return (measurement.lower().replace("^2", "2").replace(": ", "_").replace(":", "_").replace(" ", "_")
            .replace("-", "_"))


def extra_measurements(measurements) -> list[str]:
    """Measurements beyond the table's fixed columns (e.g. the cell ones), in their order."""
    fixed = set(TABLE_MEASUREMENT_COLUMNS.values()) | {AREA_PX}
    return [name for name in measurements if name not in fixed]


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


class NucleiTableWriter(StreamWriter):
    """Context manager streaming one CSV row per nucleus into ``path`` (atomic; gzip for ``.gz``).

    Columns ``TABLE_COLUMNS``: id (the GeoJSON feature id), centroid_x / centroid_y
    (level-0 px, 0.01 px), the measurements of ``TABLE_MEASUREMENT_COLUMNS``, then any
    further measurement of the first row (``column_name``: the cell ones with ``--cells``);
    NaN is written as an empty cell. The header is written with the first row.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.gzip = self.path.suffix == ".gz"
        self._file: io.TextIOWrapper | None = None
        self._writer = None
        self._extra: list[str] | None = None  # measurements after the fixed columns, from the first row

    def _begin(self, out) -> None:
        self._file = io.TextIOWrapper(out, encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._extra = None

    def _header(self, measurements) -> None:
        self._extra = extra_measurements(measurements)
        self._writer.writerow((*TABLE_COLUMNS, *map(column_name, self._extra)))

    def _end(self) -> None:
        if self._extra is None:
            self._header(())
        text, self._file, self._writer = self._file, None, None
        text.flush()
        text.detach()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.detach()
        self._file = self._writer = None

    def write_row(self, nucleus_id: str, centroid_xy: tuple[float, float], measurements: Mapping[str, float]) -> None:
        """Append one nucleus: its feature id, level-0 centroid and ``nucleus_measurements`` dict."""
        self._require_open()
        if self._extra is None:
            self._header(measurements)
        row = [str(nucleus_id), _cell(centroid_xy[0], 2), _cell(centroid_xy[1], 2)]
        row += [_cell(measurements.get(name, math.nan)) for name in (*TABLE_MEASUREMENT_COLUMNS.values(), *self._extra)]
        self._writer.writerow(row)
        self.count += 1

    def write(self, nuclei) -> None:
        """Write a tile's ``writers.TileNuclei``."""
        for i, nucleus_id in enumerate(nuclei.ids):
            self.write_row(nucleus_id, nuclei.centroids_xy[i], nuclei.row(i))
