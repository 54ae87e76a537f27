"""Streaming GeoParquet: one row per nucleus, readable by geopandas, DuckDB and QGIS as they are.

Columns: ``id`` (the GeoJSON feature id), ``geometry`` (the nucleus outline, WKB Polygon in
level-0 (x, y) pixels), ``centroid_x`` / ``centroid_y`` (level-0 px), one float64 column per
measurement (``table.column_name``: area_px2, area_um2, perimeter_um, ...), and with cells
``cell_geometry`` (the cell outline, WKB). The file carries GeoParquet 1.0 ``geo`` metadata
(WKB encoding, ``crs: null``: slide pixels, not a geographic CRS), so
``geopandas.read_parquet`` gives a GeoDataFrame and DuckDB's spatial extension reads the
geometry. Rows go out in row groups of ``ROW_GROUP`` nuclei: memory stays flat.

pyarrow is an extra: ``pip install "wsi-ircr[parquet]"``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import shapely

from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import StreamWriter

ROW_GROUP = 65_536
GEOPARQUET_VERSION = "1.0.0"
INSTALL_HINT = 'pip install "wsi-ircr[parquet]"'


def require_pyarrow():
    """The ``pyarrow`` module, or a one-line UserError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"--outputs parquet needs pyarrow, which is not installed: {INSTALL_HINT}") from None
    return pyarrow


def geo_metadata(geometry_columns: list[str]) -> dict:
    """GeoParquet 1.0 file metadata for WKB polygon columns in slide pixels (no CRS)."""
    return {"version": GEOPARQUET_VERSION, "primary_column": geometry_columns[0],
            "columns": {name: {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
                        for name in geometry_columns}}


class GeoParquetWriter(StreamWriter):
    """Context manager streaming nuclei (``writers.TileNuclei``) into a GeoParquet file.

    The schema is fixed by the first tile written (its measurements, cells or not); a file
    without nuclei has the id, geometry and centroid columns only.
    """

    def __init__(self, path: str | os.PathLike, row_group: int = ROW_GROUP):
        super().__init__(path)
        self.row_group = int(row_group)
        self._pa = require_pyarrow()
        self._sink = None
        self._writer = None
        self._columns: dict[str, list] = {}
        self._measurements: list[str] = []
        self._cells = False

    def _begin(self, out) -> None:
        self._sink, self._writer, self._columns = out, None, {}

    def _open(self, measurements: list[str], cells: bool) -> None:
        from wsi_ircr.slide.table import column_name

        pa = self._pa
        self._measurements, self._cells = measurements, cells
        fields = [pa.field("id", pa.string()), pa.field("geometry", pa.binary()),
                  pa.field("centroid_x", pa.float64()), pa.field("centroid_y", pa.float64())]
        fields += [pa.field(column_name(m), pa.float64()) for m in measurements]
        geometry = ["geometry"]
        if cells:
            fields.append(pa.field("cell_geometry", pa.binary()))
            geometry.append("cell_geometry")
        schema = pa.schema(fields, metadata={b"geo": json.dumps(geo_metadata(geometry)).encode()})
        self._writer = self._pa.parquet.ParquetWriter(self._sink, schema, compression="zstd")
        self._columns = {f.name: [] for f in fields}

    def write(self, nuclei) -> None:
        """Append a tile's nuclei; a row group goes out every ``row_group`` rows."""
        self._require_open()
        if self._writer is None:
            self._open(list(nuclei.measurements), nuclei.cells_xy is not None)
        if not len(nuclei):
            return
        from wsi_ircr.slide.table import column_name

        columns = self._columns
        columns["id"].extend(nuclei.ids)
        columns["geometry"].extend(shapely.to_wkb(np.asarray(nuclei.polygons_xy, dtype=object)).tolist())
        columns["centroid_x"].extend(nuclei.centroids_xy[:, 0].tolist())
        columns["centroid_y"].extend(nuclei.centroids_xy[:, 1].tolist())
        for name in self._measurements:
            values = nuclei.measurements[name]
            columns[column_name(name)].extend(np.where(np.isfinite(values), values, np.nan).tolist())
        if self._cells:
            columns["cell_geometry"].extend(shapely.to_wkb(np.asarray(nuclei.cells_xy, dtype=object)).tolist())
        self.count += len(nuclei)
        if len(columns["id"]) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self._columns and self._columns["id"]:
            table = self._pa.Table.from_pydict(self._columns, schema=self._writer.schema)
            self._writer.write_table(table, row_group_size=self.row_group)
            self._columns = {name: [] for name in self._columns}

    def _end(self) -> None:
        if self._writer is None:
            self._open([], False)
        self._flush()
        self._writer.close()
        self._writer = None

    def _discard(self) -> None:
        self._writer, self._columns = None, {}
