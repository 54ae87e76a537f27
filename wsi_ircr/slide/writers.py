"""The nuclei outputs: one protocol, one registry of formats.

Every writer is a context manager (open; ``write(nuclei)`` once per tile; close: the file
appears under its name only when the block ends without an exception) and counts what it
wrote. The pipeline builds each tile's ``TileNuclei`` once (level-0 outlines, ids,
centroids, every measurement) and hands it to every writer that ``outputs`` names::

    with open_writers(["geojson", "parquet"], folder, stem, gzip=True) as writers:
        for tile in tiles:
            nuclei = tile_nuclei(instances, grid, offset, namespace)
            for writer in writers.values():
                writer.write(nuclei)

Adding a format is one class with ``write`` (on ``io.atomic.StreamWriter``) and one
``FORMATS`` entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from wsi_ircr.errors import UserError

if TYPE_CHECKING:
    from shapely.geometry import Polygon

    from wsi_ircr.slide.grid import TileGrid
    from wsi_ircr.slide.stitch import TileInstances


@dataclass
class TileNuclei:
    """One tile's nuclei, ready to write: n nuclei in level-0 (x, y) pixels.

    ids: feature ids (UUIDs). polygons_xy: n shapely Polygons. centroids_xy: float64 (n, 2).
    measurements: QuPath measurement name -> float64 (n,) (``table.nucleus_measurements``;
        with cells also "Nucleus: ...", "Cell: ...", "Cytoplasm: ..." ones).
    cells_xy: n cell outlines (Polygons) when cells were grown, else None.
    """

    ids: list[str]
    polygons_xy: list[Polygon]
    centroids_xy: np.ndarray
    measurements: dict[str, np.ndarray] = field(default_factory=dict)
    cells_xy: list[Polygon] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> dict[str, float]:
        """The measurements of nucleus ``i``."""
        return {name: float(values[i]) for name, values in self.measurements.items()}

    def subset(self, keep: np.ndarray) -> TileNuclei:
        """The nuclei where bool (n,) ``keep`` holds."""
        index = np.flatnonzero(keep)
        return TileNuclei([self.ids[i] for i in index], [self.polygons_xy[i] for i in index], self.centroids_xy[index],
                          {k: v[index] for k, v in self.measurements.items()},
                          None if self.cells_xy is None else [self.cells_xy[i] for i in index])


def tile_nuclei(instances: TileInstances, grid: TileGrid, offset: int, namespace: str | None = None) -> TileNuclei:
    """A tile's owned instances as ``TileNuclei``: outlines and centroids in level-0 pixels,
    ``nucleus_measurements``, and ids ``feature_uuid(namespace, offset + i + 1)`` (reruns
    reproduce them; uuid4 without a namespace)."""
    import uuid as uuid_module

    from wsi_ircr.slide.geojson import feature_uuid
    from wsi_ircr.slide.polygons import to_level0
    from wsi_ircr.slide.table import nucleus_measurements

    n = instances.count
    measured = nucleus_measurements(instances.features, grid.mpp, grid.slide_mpp)
    cells = getattr(instances, "cell_polygons", None)  # results saved by earlier versions have no cells
    if cells is not None:
        from wsi_ircr.slide.cells import cell_measurements

        measured.update(cell_measurements(instances.cell_features, grid.mpp))
    measurements = {name: np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).copy()
                    for name, values in measured.items()}
    ids = [feature_uuid(namespace, offset + i + 1) if namespace is not None else str(uuid_module.uuid4())
           for i in range(n)]
    return TileNuclei(ids, [to_level0(p, grid) for p in instances.polygons],
                      grid.target_to_level0_xy(instances.centroid_rc).reshape(n, 2), measurements,
                      None if cells is None else [to_level0(p, grid) for p in cells])


class NucleiWriter(Protocol):
    """What the pipeline needs of an output format."""

    path: Path
    count: int

    def __enter__(self) -> NucleiWriter: ...

    def __exit__(self, exc_type, exc, tb) -> bool: ...

    def write(self, nuclei: TileNuclei) -> None: ...


@dataclass(frozen=True)
class OutputFormat:
    """A format of ``outputs``: its file name in the slide's folder and how to open its writer."""

    name: str
    file_name: Callable[[str, bool], str]  # (slide stem, gzip) -> file name
    open: Callable[[Path], NucleiWriter]
    what: str


def _geojson(path: Path) -> NucleiWriter:
    from wsi_ircr.slide.geojson import GeoJSONWriter

    return GeoJSONWriter(path)


def _csv(path: Path) -> NucleiWriter:
    from wsi_ircr.slide.table import NucleiTableWriter

    return NucleiTableWriter(path)


def _parquet(path: Path) -> NucleiWriter:
    from wsi_ircr.slide.parquet import GeoParquetWriter

    return GeoParquetWriter(path)


FORMATS = {
    "geojson": OutputFormat("geojson", lambda stem, gzip: f"{stem}.geojson" + (".gz" if gzip else ""), _geojson,
                            "QuPath objects (detections, or cells with --cells)"),
    "csv": OutputFormat("csv", lambda stem, gzip: "nuclei.csv", _csv, "one row per nucleus, no outlines"),
    "parquet": OutputFormat("parquet", lambda stem, gzip: "nuclei.parquet", _parquet,
                            "GeoParquet: one row per nucleus with its outline (WKB)"),
}


def check_outputs(outputs) -> tuple[str, ...]:
    """The ``outputs`` names, checked (unknown or none: UserError; parquet without pyarrow: UserError)."""
    names = tuple(outputs)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise UserError(f"outputs {','.join(names) or '(none)'}: expected one or more of {', '.join(FORMATS)}, "
                        "e.g. --outputs geojson,parquet")
    if "parquet" in names:
        from wsi_ircr.slide.parquet import require_pyarrow

        require_pyarrow()
    return names


def output_names(outputs, stem: str, gzip: bool) -> dict[str, str]:
    """Format name -> file name in the slide's folder."""
    return {name: FORMATS[name].file_name(stem, gzip) for name in outputs}


@contextlib.contextmanager
def open_writers(outputs, folder: Path, stem: str, gzip: bool) -> Iterator[dict[str, NucleiWriter]]:
    """The open writers of ``outputs`` in ``folder``: all files appear together at the end of
    the block, none when it raises."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(FORMATS[name].open(folder / file))
               for name, file in output_names(outputs, stem, gzip).items()}
