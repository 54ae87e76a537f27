"""The nuclei writers: one protocol (open, write a tile, close atomically), the GeoParquet
writer read back by pyarrow and geopandas, the ``outputs`` registry and the CLI's choice."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from wsi_ircr.errors import UserError
from wsi_ircr.slide.geojson import GeoJSONWriter
from wsi_ircr.slide.table import NucleiTableWriter, column_name
from wsi_ircr.slide.writers import FORMATS, TileNuclei, check_outputs, open_writers, output_names

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _nuclei(n: int, x0: float = 0.0, cells: bool = False, seed: int = 0) -> TileNuclei:
    rng = np.random.default_rng(seed)
    polygons = [box(x0 + 20 * i, 10, x0 + 20 * i + 8, 18) for i in range(n)]
    centroids = np.array([[p.centroid.x, p.centroid.y] for p in polygons]).reshape(n, 2)
    measurements = {"Area um^2": rng.uniform(5, 50, n), "Score": rng.uniform(0, 1, n), "Mean intensity": np.full(n, np.nan)}
    cells_xy = [p.buffer(2, join_style="mitre") for p in polygons] if cells else None
    return TileNuclei([f"00000000-0000-4000-8000-{i + int(x0):012d}" for i in range(n)], polygons, centroids,
                      measurements, cells_xy)


def test_geoparquet_streams_row_groups_and_reads_back(tmp_path):
    from wsi_ircr.slide.parquet import GeoParquetWriter

    tiles = [_nuclei(4, 0.0, seed=1), _nuclei(0, 100.0), _nuclei(3, 1000.0, seed=2)]
    path = tmp_path / "nuclei.parquet"
    with GeoParquetWriter(path, row_group=3) as out:
        for nuclei in tiles:
            out.write(nuclei)
    assert out.count == 7
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 7 and meta.num_row_groups >= 2
    table = pq.read_table(path)
    assert table.column_names == ["id", "geometry", "centroid_x", "centroid_y", "area_um2", "score", "mean_intensity"]
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"] is None and geo["version"].startswith("1.")
    expected = [p for t in tiles for p in t.polygons_xy]
    got = shapely.from_wkb(table.column("geometry").to_pylist())
    assert all(g.equals(e) for g, e in zip(got, expected))
    assert table.column("id").to_pylist() == [i for t in tiles for i in t.ids]
    np.testing.assert_allclose(table.column("area_um2").to_numpy(),
                               np.concatenate([t.measurements["Area um^2"] for t in tiles]))
    assert np.isnan(table.column("mean_intensity").to_numpy()).all()


def test_geopandas_reads_it_without_custom_code(tmp_path):
    gpd = pytest.importorskip("geopandas")
    from wsi_ircr.slide.parquet import GeoParquetWriter

    path = tmp_path / "nuclei.parquet"
    with GeoParquetWriter(path) as out:
        out.write(_nuclei(5, cells=True))
    frame = gpd.read_parquet(path)
    assert len(frame) == 5 and frame.geometry.name == "geometry" and frame.crs is None
    assert (frame.geometry.geom_type == "Polygon").all() and frame.geometry.is_valid.all()
    assert frame["cell_geometry"].iloc[0].contains(frame.geometry.iloc[0])  # a second geometry column
    assert frame.area.iloc[0] == pytest.approx(64.0)


def test_writers_are_atomic_and_share_one_protocol(tmp_path):
    nuclei = _nuclei(3)
    with pytest.raises(KeyError):
        with open_writers(("geojson", "csv", "parquet"), tmp_path, "s", gzip=True) as writers:
            for writer in writers.values():
                writer.write(nuclei)
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    with open_writers(("geojson", "csv", "parquet"), tmp_path, "s", gzip=False) as writers:
        for writer in writers.values():
            writer.write(nuclei)
    assert {w.count for w in writers.values()} == {3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.csv", "nuclei.parquet", "s.geojson"]
    assert isinstance(writers["geojson"], GeoJSONWriter) and isinstance(writers["csv"], NucleiTableWriter)
    assert output_names(("geojson",), "s", True) == {"geojson": "s.geojson.gz"}


def test_empty_parquet_has_the_base_columns(tmp_path):
    from wsi_ircr.slide.parquet import GeoParquetWriter

    with GeoParquetWriter(tmp_path / "n.parquet"):
        pass
    table = pq.read_table(tmp_path / "n.parquet")
    assert table.num_rows == 0 and table.column_names == ["id", "geometry", "centroid_x", "centroid_y"]


def test_outputs_are_checked(monkeypatch):
    assert set(FORMATS) == {"geojson", "csv", "parquet"}
    assert check_outputs(["parquet", "geojson"]) == ("parquet", "geojson")
    with pytest.raises(UserError, match="outputs shapefile: expected one or more of geojson, csv, parquet"):
        check_outputs(["shapefile"])
    with pytest.raises(UserError, match="expected one or more"):
        check_outputs([])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match=r'--outputs parquet needs pyarrow, which is not installed: pip install "wsi-ircr\[parquet\]"'):
        check_outputs(["parquet"])
    assert column_name("Cell: Area um^2") == "cell_area_um2" and column_name("Area px^2") == "area_px2"
