"""QuPath cells (``--cells DISTANCE_UM``): each nucleus grown by up to a distance without
crossing its neighbours' cells, the convention of QuPath's cell detection.

In a tile task every nucleus of the read window (owned or not) grows at once
(``skimage.segmentation.expand_labels``: a pixel within the distance of several nuclei goes
to the nearest), so a nucleus near the core's edge competes with the neighbours its tile
sees in the halo; the halo must therefore exceed the largest nucleus plus twice the distance
(``cell_halo_px``). Measurements: area and shape of cell and cytoplasm (cell minus nucleus),
and mean and standard deviation of haematoxylin and eosin (colour deconvolution,
``skimage.color.rgb2hed``, Ruifrok & Johnston's H&E vectors) in nucleus, cytoplasm and cell.

On the driver, ``CellPartition`` makes the cells of neighbouring tiles disjoint (two tiles
may segment a nucleus near their border a little differently), so no two cells overlap
anywhere and every cell still contains its nucleus.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

from wsi_ircr.errors import UserError

STAINS = {"Hematoxylin": 0, "Eosin": 1}  # rgb2hed channels
COMPARTMENTS = ("Nucleus", "Cytoplasm", "Cell")
DUPLICATE_FRACTION = 0.5  # a nucleus with less than this share outside an earlier tile's nuclei is that nucleus again


def cell_halo_px(max_nucleus_px: float, cell_px: float) -> float:
    """Halo (target px) a tile needs for cells: the largest nucleus plus twice the growth
    (a cell reaches ``cell_px`` beyond its nucleus, and so may a neighbour competing for it)."""
    return max_nucleus_px + 2 * cell_px


def check_cell_halo(halo_px: int, max_nucleus_px: float, cell_px: float, mpp: float) -> None:
    """UserError when the halo is too small for cells of ``cell_px``."""
    need = cell_halo_px(max_nucleus_px, cell_px)
    if halo_px < need:
        suggest = (math.ceil(need) // 16 + 1) * 16
        raise UserError(f"--cells {cell_px * mpp:g} um needs a halo of at least the largest nucleus plus twice the growth "
                        f"({math.ceil(need)} px at {mpp:g} mpp), but halo_px={halo_px}; use --halo {suggest} or a "
                        "smaller --cells")


def _stats(labels: np.ndarray, values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of ``values`` over the pixels of each label in ``ids`` (NaN for none)."""
    n = int(max(labels.max(initial=0), ids.max(initial=0))) + 1
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n)[ids].astype(np.float64)
    total = np.bincount(flat, weights=values.ravel(), minlength=n)[ids]
    squares = np.bincount(flat, weights=values.ravel() ** 2, minlength=n)[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean, std


def grow_cells(labels: np.ndarray, owned: np.ndarray, cell_px: float) -> np.ndarray:
    """int32 (h, w): the cells of the owned nuclei (``owned`` ids), grown from every nucleus
    of the window (``labels``) at once by up to ``cell_px`` pixels."""
    from skimage.segmentation import expand_labels

    grown = expand_labels(np.asarray(labels), distance=float(cell_px))
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    inside = owned > 0
    lut[labels[inside]] = owned[inside]
    return lut[grown]


def cell_features(owned: np.ndarray, cells: np.ndarray, image: np.ndarray | None, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per owned nucleus ``ids``: "cell_area", "cytoplasm_area" (px^2), "cell_perimeter" (px),
    "cell_solidity", "cell_circularity", and "<Compartment>: <Stain> mean|std" (optical density)."""
    from wsi_ircr.morphology import instance_features

    shape = instance_features(cells, None, features=("area", "perimeter", "solidity", "circularity"))
    order = {int(label): i for i, label in enumerate(shape["label"])}
    pick = np.array([order[int(i)] for i in ids], np.int64)
    nucleus_area = np.bincount(owned.ravel(), minlength=int(ids.max(initial=0)) + 1)[ids]
    out = {"cell_area": shape["area"][pick], "cell_perimeter": shape["perimeter"][pick],
           "cell_solidity": shape["solidity"][pick], "cell_circularity": shape["circularity"][pick]}
    out["cytoplasm_area"] = out["cell_area"] - nucleus_area
    cytoplasm = np.where(owned > 0, 0, cells)
    if image is not None:
        from skimage.color import rgb2hed

        hed = rgb2hed(image)
        for stain, channel in STAINS.items():
            for compartment, labels in zip(COMPARTMENTS, (owned, cytoplasm, cells)):
                mean, std = _stats(labels, hed[..., channel], ids)
                out[f"{compartment}: {stain} mean"], out[f"{compartment}: {stain} std"] = mean, std
    return out


def cell_measurements(features: dict[str, np.ndarray], mpp: float) -> dict[str, np.ndarray]:
    """QuPath measurement names and physical units for ``cell_features``."""
    out = {"Cell: Area um^2": features["cell_area"] * mpp**2, "Cytoplasm: Area um^2": features["cytoplasm_area"] * mpp**2,
           "Cell: Perimeter um": features["cell_perimeter"] * mpp, "Cell: Solidity": features["cell_solidity"],
           "Cell: Circularity": features["cell_circularity"]}
    out.update({k: v for k, v in features.items() if ": " in k})
    return out


class CellPartition:
    """Makes the cells of a slide disjoint as its tiles are exported in row-major order.

    Two tiles see a nucleus near their border differently (segmented from another window),
    so their cells may overlap. A tile is held back until every neighbour has come (its cells
    can reach only into adjacent tiles), so one row of tiles is held at most. When a tile
    comes: its nuclei give up any sliver they share with held nuclei (one lying mostly
    inside a held nucleus is that nucleus found twice and is left out); held cells give up
    what they cover of its nuclei (a nucleus is never cytoplasm of another cell); its cells
    are their raster outline joined with their nucleus, minus the held cells, the cells
    before them in the tile and the tile's other nuclei. Every cell then contains its
    nucleus and no two cells overlap.
    """

    def __init__(self):
        self._held: dict[tuple[int, int], object] = {}

    def add(self, tile: tuple[int, int], nuclei) -> list:
        """Take a tile's ``writers.TileNuclei`` (with cells); return the [(tile, nuclei)] now final."""
        r, c = tile
        near = [self._held[t] for t in ((r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)) if t in self._held]
        held_cells = [(other, k) for other in near for k in range(len(other))]
        held_nuclei = [other.polygons_xy[k] for other, k in held_cells]
        if held_nuclei and len(nuclei):
            tree = shapely.STRtree(held_nuclei)
            keep = np.ones(len(nuclei), bool)
            for k, nucleus in enumerate(nuclei.polygons_xy):
                hits = tree.query(nucleus, predicate="intersects")
                if len(hits):
                    rest = _largest(shapely.difference(nucleus, shapely.union_all([held_nuclei[h] for h in hits])))
                    keep[k] = rest is not None and rest.area >= DUPLICATE_FRACTION * nucleus.area
                    nuclei.polygons_xy[k] = rest if keep[k] else nucleus
            if not keep.all():  # the same nucleus found by two tiles: the earlier tile's stays
                nuclei = nuclei.subset(keep)
        if len(nuclei) > 1:  # outlines simplified apart may overlap by a sliver
            tree = shapely.STRtree(list(nuclei.polygons_xy))
            for k, nucleus in enumerate(list(nuclei.polygons_xy)):
                before = [nuclei.polygons_xy[h] for h in tree.query(nucleus, predicate="intersects") if h < k]
                if before:
                    nuclei.polygons_xy[k] = _largest(shapely.difference(nucleus, shapely.union_all(before))) or nucleus
        if held_cells and len(nuclei):
            own = shapely.STRtree(nuclei.polygons_xy)
            for other, k in held_cells:
                hits = own.query(other.cells_xy[k], predicate="intersects")
                if len(hits):
                    cut = shapely.difference(other.cells_xy[k], shapely.union_all([nuclei.polygons_xy[h] for h in hits]))
                    other.cells_xy[k] = _holding(shapely.union(cut, other.polygons_xy[k]), other.polygons_xy[k])
        nuclei.cells_xy = self._cells(nuclei, [other.cells_xy[k] for other, k in held_cells])
        self._held[tile] = nuclei
        ready = sorted(t for t in self._held if (r, c) >= (t[0] + 1, t[1] + 1))
        return [(t, self._held.pop(t)) for t in ready]

    def flush(self) -> list:
        """The tiles still held, in row-major order (after the last tile)."""
        out = [(t, self._held[t]) for t in sorted(self._held)]
        self._held.clear()
        return out

    @staticmethod
    def _cells(nuclei, held: list) -> list:
        earlier = shapely.STRtree(held) if held else None
        own = shapely.STRtree(nuclei.polygons_xy) if len(nuclei) else None
        out = np.empty(len(nuclei), dtype=object)  # the cells made so far (one vectorised test each, no tree rebuilt)
        for k, (cell, nucleus) in enumerate(zip(nuclei.cells_xy, nuclei.polygons_xy)):
            cell = shapely.union(cell, nucleus)
            blocked = [held[h] for h in earlier.query(cell, predicate="intersects")] if earlier is not None else []
            blocked += list(out[:k][shapely.intersects(out[:k], cell)])
            blocked += [nuclei.polygons_xy[h] for h in own.query(cell, predicate="intersects") if h != k]
            if blocked:
                cell = _holding(shapely.union(shapely.difference(cell, shapely.union_all(blocked)), nucleus), nucleus)
            out[k] = cell
        return list(out)


def _holding(geometry, nucleus):
    """The polygon part of ``geometry`` that holds ``nucleus`` (a connected part of it)."""
    from shapely.geometry import Polygon

    geometry = shapely.make_valid(geometry)
    point = nucleus.representative_point()
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, Polygon) and p.area > 0]
    return next((p for p in parts if p.contains(point)), None) or max(parts, key=lambda p: p.intersection(nucleus).area)


def _largest(geometry):
    """The largest polygon part of ``geometry`` (a valid Polygon), None when it has none."""
    from shapely.geometry import Polygon

    geometry = shapely.make_valid(geometry)
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, Polygon) and p.area > 0]
    return max(parts, key=lambda p: p.area) if parts else None
