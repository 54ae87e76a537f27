"""QuPath cells: nuclei grown without crossing their neighbours, measured, disjoint across tiles."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from wsi_ircr.errors import UserError
from wsi_ircr.slide.cells import CellPartition, cell_features, check_cell_halo, grow_cells
from wsi_ircr.slide.writers import TileNuclei


def test_cells_grow_to_the_distance_and_stop_at_neighbours():
    labels = np.zeros((40, 60), np.int32)
    labels[18:22, 10:14] = 5   # owned
    labels[18:22, 20:24] = 7   # owned, 6 px to the right of 5
    labels[18:22, 50:54] = 9   # a halo nucleus, not owned
    owned = np.where(labels == 5, 1, np.where(labels == 7, 2, 0)).astype(np.int32)
    cells = grow_cells(labels, owned, cell_px=4)
    assert set(np.unique(cells)) == {0, 1, 2}  # the halo nucleus has no cell here
    assert (cells[owned > 0] == owned[owned > 0]).all()  # every cell holds its nucleus
    # between the two nuclei (cols 14..19) the pixels split at the middle
    assert (cells[20, 14:17] == 1).all() and (cells[20, 17:20] == 2).all()
    assert cells[20, 5] == 0 and cells[20, 6] == 1  # 4 px left of nucleus 5, no further
    assert (cells[20, 46:50] == 0).all()  # the halo nucleus competes: its side stays free of cell 2


def test_cell_features_hold_areas_and_stains():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)
    image[10:16, 10:16] = (60, 30, 120)  # a dark purple nucleus
    owned = np.zeros((30, 30), np.int32)
    owned[10:16, 10:16] = 1
    cells = grow_cells(owned, owned, 3)
    features = cell_features(owned, cells, image, np.array([1]))
    assert features["cell_area"][0] == (cells == 1).sum() and features["cytoplasm_area"][0] == (cells == 1).sum() - 36
    assert features["Nucleus: Hematoxylin std"][0] == pytest.approx(0.0, abs=1e-6)  # one colour
    assert features["Nucleus: Hematoxylin mean"][0] > features["Cytoplasm: Hematoxylin mean"][0]
    assert set(features) >= {f"{c}: {s} {m}" for c in ("Nucleus", "Cytoplasm", "Cell") for s in ("Hematoxylin", "Eosin")
                             for m in ("mean", "std")}


def test_halo_check_names_the_fix():
    check_cell_halo(64, 40, 10, 0.25)
    with pytest.raises(UserError, match=r"--cells 5 um needs a halo .* \(80 px at 0.25 mpp\), but halo_px=64; use --halo 96"):
        check_cell_halo(64, 40, 20, 0.25)


def _tile(cells, nuclei) -> TileNuclei:
    n = len(nuclei)
    return TileNuclei([str(k) for k in range(n)], list(nuclei), np.zeros((n, 2)), {}, list(cells))


def test_partition_makes_cells_of_neighbouring_tiles_disjoint():
    partition = CellPartition()
    assert partition.add((0, 0), _tile([box(0, 0, 10, 10)], [box(3, 3, 6, 6)])) == []  # held: neighbours to come
    # tile (0, 1) saw its nucleus reach 0.5 px into tile (0, 0)'s cell, and a nucleus the first tile grew over
    ready = partition.add((0, 1), _tile([box(8, 0, 18, 10), box(7, 0, 10, 2)], [box(9.5, 3, 15, 6), box(8, 0.5, 9, 1.5)]))
    assert ready == []
    ready = partition.add((1, 1), _tile([], []))  # the last neighbour of (0, 0) has come
    assert [t for t, _ in ready] == [(0, 0)]
    rest = partition.flush()
    assert [t for t, _ in rest] == [(0, 1), (1, 1)]
    first, second = ready[0][1], rest[0][1]
    cells = first.cells_xy + second.cells_xy
    nuclei = first.polygons_xy + second.polygons_xy
    assert all(shapely.is_valid(c) and c.contains(n) for c, n in zip(cells, nuclei))
    assert all(cells[i].intersection(cells[j]).area < 1e-9 for i in range(3) for j in range(i + 1, 3))
    assert not first.cells_xy[0].contains(box(8, 0.5, 9, 1.5))  # the swallowed nucleus is taken back
    assert second.cells_xy[0].area > second.polygons_xy[0].area  # cells still grow where free


def test_partition_within_one_tile_keeps_other_nuclei_free():
    partition = CellPartition()
    partition.add((0, 0), _tile([box(0, 0, 10, 10), box(6, 0, 16, 10)], [box(2, 2, 7, 8), box(9, 2, 14, 8)]))
    [(_, tile)] = partition.flush()
    cells, nuclei = tile.cells_xy, tile.polygons_xy
    assert cells[0].intersection(cells[1]).area == 0
    assert cells[0].contains(nuclei[0]) and cells[1].contains(nuclei[1])
    assert cells[0].intersection(nuclei[1]).area == 0


def test_a_nucleus_found_by_two_tiles_is_written_once():
    partition = CellPartition()
    partition.add((0, 0), _tile([box(0, 0, 12, 12)], [box(2, 2, 10, 10)]))
    partition.add((0, 1), _tile([box(1, 1, 11, 11), box(20, 0, 30, 10)], [box(3, 3, 9, 9), box(22, 2, 28, 8)]))
    tiles = dict(partition.flush())
    assert len(tiles[(0, 0)]) == 1 and tiles[(0, 1)].ids == ["1"]  # the copy inside (0, 0)'s nucleus is left out
