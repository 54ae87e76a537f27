"""The stages of ``wsi-ircr segment`` for one slide, each a function with typed input and
output: plan (tissue mask, tile grid) -> [tile tasks, see ``tasks`` and ``cohort``] ->
export (global ids, streamed GeoJSON + CSV) -> previews (overlay, tissue) -> summary.

How slides are scheduled (one task graph for a cohort), where tasks run (``cluster``) and
the run folder's states (``run_folder``) live in their own modules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.plan import ExecutionPlan
from wsi_ircr.slide.reader import SlideReader, require_mpp, unreadable_boxes
from wsi_ircr.slide.run_folder import STORE_DIR, RunFolder
from wsi_ircr.slide.roi import Regions, load_regions
from wsi_ircr.slide.tissue import TissueMask, detect_tissue, full_mask, mask_shape_rc

log = logging.getLogger(__name__)

# At most this many centroids (every k-th nucleus) are kept to place the overlay crops.
CROP_SAMPLE = 100_000


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know of the model (the workers load it themselves).

    ``path`` is absolute (workers may run in another folder); None = the bundled model.
    """

    path: str | None
    hash: str
    mpp: float
    description: dict
    meta: dict = field(default_factory=dict, repr=False, compare=False)  # the checkpoint's metadata


@dataclass(frozen=True)
class SlidePlan:
    """A slide's tissue mask and the tiles to segment at the model's mpp."""

    slide_path: Path
    fingerprint: str
    slide_mpp: float
    mpp_source: str
    grid: TileGrid
    tissue: TissueMask
    tiles: list[Tile]
    bounds_offset_xy: tuple[int, int] = (0, 0)  # where the slide's (0, 0) lies in OpenSlide's level 0
    unreadable_xywh: frozenset = frozenset()  # level-0 boxes the tissue detection could not read
    regions: Regions | None = None  # --roi: the regions planned on instead of the tissue mask


def model_info(config: SegmentConfig) -> ModelInfo:
    """Load the checkpoint once on the driver to validate it and read its mpp and hash."""
    from wsi_ircr.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(config.model)
    path = str(ckpt.path.absolute()) if config.model else None
    return ModelInfo(path, ckpt.model_hash, ckpt.mpp, ckpt.describe(), ckpt.meta)


def check_settings(config: SegmentConfig, model: ModelInfo) -> None:
    """UserError, before any slide is opened, when the halo is below the largest nucleus at
    the model's mpp or an output cannot be written (every slide would fail the same way)."""
    from wsi_ircr.slide.writers import check_outputs

    check_outputs(config.outputs)
    check_cells(config, model.mpp)
    if config.roi:
        load_regions(config.roi, (float("inf"), float("inf")))  # the file's own errors, before any slide
    TileGrid((1, 1), model.mpp, model.mpp, config.core_px, config.halo_px).check_halo(config.max_nucleus_um / model.mpp)


def check_cells(config: SegmentConfig, model_mpp: float) -> None:
    """UserError when ``cells_um`` needs a larger halo than ``halo_px``."""
    if config.cells_um > 0:
        from wsi_ircr.slide.cells import check_cell_halo

        check_cell_halo(config.halo_px, config.max_nucleus_um / model_mpp, config.cells_um / model_mpp, model_mpp)


def plan_slide(reader: SlideReader, config: SegmentConfig, model_mpp: float) -> SlidePlan:
    """Tissue mask and tile grid; refuses slides without mpp and a halo below the largest nucleus."""
    slide_mpp = require_mpp(reader)
    grid = TileGrid(reader.dimensions_xy, slide_mpp, model_mpp, config.core_px, config.halo_px)
    grid.check_halo(config.max_nucleus_um / model_mpp)
    check_cells(config, model_mpp)
    if max(grid.shape_rc) < 2 * config.halo_px + 16:
        raise UserError(
            f"{reader.path}: {reader.dimensions_xy[0]}x{reader.dimensions_xy[1]} px at {slide_mpp:g} mpp is smaller than "
            f"one tile's halo ({grid.shape_rc[1]}x{grid.shape_rc[0]} px at the model's {model_mpp:g} mpp); "
            "segment an image of at least a few hundred pixels"
        )
    regions = None
    if config.roi:
        regions = load_regions(config.roi, reader.dimensions_xy)
        shape_rc = mask_shape_rc(reader, config.tissue_mpp)
        tissue = TissueMask(regions.mask(shape_rc, config.tissue_mpp, slide_mpp), config.tissue_mpp)
    elif config.tissue_mask:
        tissue = detect_tissue(reader, config.tissue_mpp)
    else:
        tissue = full_mask(reader, config.tissue_mpp)
    return SlidePlan(Path(reader.path), reader.fingerprint(), slide_mpp, reader.mpp_source, grid, tissue,
                     grid.tissue_tiles(tissue), reader.bounds_offset_xy, frozenset(unreadable_boxes(reader)), regions)


def forward_boxes(plan: SlidePlan, tiles: list[Tile], skip_glass: bool = True) -> list[tuple[int, int, int, int]]:
    """Per tile of ``tiles``: the box of its read window the network runs on (``crop.tissue_box``
    of the plan's tissue mask or regions; the whole window when ``skip_glass`` is off)."""
    from wsi_ircr.slide.crop import full_box, tissue_boxes

    return tissue_boxes(plan.grid, plan.tissue, tiles) if skip_glass else [full_box(plan.grid)] * len(tiles)


def unreadable_report(boxes_xywh, tissue_area_mm2: float, slide_mpp: float) -> dict:
    """``summary.json``'s ``unreadable``: the level-0 boxes of broken slide tiles, how many, their
    area (union, mm^2) and that area as a fraction of the tissue area (at most 1)."""
    from shapely.geometry import box
    from shapely.ops import unary_union

    boxes = sorted(tuple(int(v) for v in b) for b in boxes_xywh)
    if not boxes:
        return {"regions": 0, "area_mm2": 0.0, "tissue_fraction": 0.0, "boxes_xywh": []}
    area_mm2 = unary_union([box(x, y, x + w, y + h) for x, y, w, h in boxes]).area * (slide_mpp / 1000) ** 2
    return {"regions": len(boxes), "area_mm2": area_mm2, "tissue_fraction": area_mm2 / max(tissue_area_mm2, area_mm2),
            "boxes_xywh": [list(b) for b in boxes]}


def check_unreadable(plan: SlidePlan, unreadable: dict, max_fraction: float) -> None:
    """UserError when the slide's unreadable area exceeds ``max_fraction`` of its tissue."""
    if unreadable["tissue_fraction"] <= max_fraction:
        return
    x, y = unreadable["boxes_xywh"][0][:2]
    raise UserError(
        f"{plan.slide_path}: {100 * unreadable['tissue_fraction']:.1f} % of the tissue could not be read "
        f"({unreadable['regions']} broken tiles, {unreadable['area_mm2']:.4f} mm^2, the first at level-0 ({x}, {y})), "
        f"more than max_unreadable_fraction {max_fraction:g}; re-copy or re-scan the slide, or pass "
        "--set max_unreadable_fraction=1 to keep what could be read"
    )


def select_nuclei(nuclei, config: SegmentConfig, regions: Regions | None = None):
    """The nuclei that pass the filters ``min_area_um2`` and ``min_score`` (0 = off) and,
    with ``regions``, whose centroid lies in one."""
    from wsi_ircr.slide.table import AREA_UM, SCORE

    keep = np.ones(len(nuclei), bool)
    if regions is not None and len(nuclei):
        keep &= regions.inside(nuclei.centroids_xy)
    if config.min_area_um2 > 0:
        keep &= nuclei.measurements[AREA_UM] >= config.min_area_um2
    if config.min_score > 0:
        keep &= ~(nuclei.measurements[SCORE] < config.min_score)  # a nucleus without a score is kept
    return nuclei if keep.all() else nuclei.subset(keep)


def export_nuclei(plan: SlidePlan, counts: dict[Tile, int], work_dir: Path, out_dir: Path, stem: str,
                  config: SegmentConfig, namespace: str, on_tile=None) -> tuple[dict[str, str], int, np.ndarray]:
    """Stage: global ids by prefix sum, then stream every tile's nuclei (row-major) that pass
    the filters to the writers of ``config.outputs``, one tile in memory at a time, each
    tile's result read once.

    ``on_tile(nuclei)``, if given, also receives every non-empty tile's ``TileNuclei``
    (level-0 outlines; e.g. to draw the overlay in the same pass).

    Returns:
        Format name -> file name written, the number of nuclei written, and float64
        (<= CROP_SAMPLE, 2) level-0 (x, y) centroids of every k-th nucleus (all of them
        when there are few), enough to find where nuclei are densest without holding them all.
    """
    from wsi_ircr.slide.cells import CellPartition
    from wsi_ircr.slide.stitch import assign_global_ids
    from wsi_ircr.slide.tasks import load_result
    from wsi_ircr.slide.writers import open_writers, output_names, tile_nuclei

    offsets = assign_global_ids(counts)
    stride = max(1, -(-sum(counts.values()) // CROP_SAMPLE))
    sample = [np.zeros((0, 2))]
    n = 0
    partition = CellPartition()
    with open_writers(config.outputs, out_dir, stem, config.gzip) as writers:

        def write(nuclei) -> None:
            nonlocal n
            for writer in writers.values():
                writer.write(nuclei)
            sample.append(nuclei.centroids_xy[(n + np.arange(len(nuclei))) % stride == 0])
            n += len(nuclei)
            if plan.regions is not None:
                plan.regions.count(nuclei.centroids_xy)
            if on_tile is not None and len(nuclei):
                on_tile(nuclei)

        for tile in sorted(counts):
            if not counts[tile]:
                continue
            nuclei = select_nuclei(tile_nuclei(load_result(work_dir, tile), plan.grid, offsets[tile], namespace), config,
                                   plan.regions)
            # cells: a tile is written once its neighbours have come (no two cells overlap)
            for _, ready in partition.add(tile, nuclei) if nuclei.cells_xy is not None else [(tile, nuclei)]:
                write(ready)
        for _, ready in partition.flush():
            write(ready)
    return output_names(config.outputs, stem, config.gzip), n, np.concatenate(sample)


def _window_polygons(plan: SlidePlan, counts: dict[Tile, int], work_dir: Path, config: SegmentConfig,
                     window_xy: tuple[int, int, int, int]):
    """The polygons (level-0 x, y) of the exported nuclei of the tiles whose read window
    meets the level-0 window (x0, y0, x1, y1), one tile in memory at a time."""
    from wsi_ircr.slide.tasks import load_result
    from wsi_ircr.slide.writers import tile_nuclei

    side = plan.grid.tile_px * plan.grid.scale
    for tile in sorted(counts):
        if not counts[tile]:
            continue
        x, y = plan.grid.origin_xy(tile)
        if x >= window_xy[2] or y >= window_xy[3] or x + side <= window_xy[0] or y + side <= window_xy[1]:
            continue
        yield from select_nuclei(tile_nuclei(load_result(work_dir, tile), plan.grid, 0), config, plan.regions).polygons_xy


def start_overlay(reader: SlideReader, plan: SlidePlan):
    """The overlay canvas (slide thumbnail with the tissue outline) that ``export_nuclei``
    draws the nuclei on, tile by tile; ``(canvas, on_tile)``."""
    from wsi_ircr.slide.overlay import OverlayCanvas

    thumb = reader.thumbnail(2048)
    canvas = OverlayCanvas(thumb, plan.tissue.mask, thumb.shape[1] / reader.dimensions_xy[0])
    return canvas, lambda nuclei: canvas.draw_nuclei(nuclei.polygons_xy)


def render_previews(reader: SlideReader, plan: SlidePlan, counts: dict[Tile, int], work_dir: Path, canvas,
                    centroids_xy: np.ndarray, out_dir: Path, config: SegmentConfig) -> None:
    """Stage: ``tissue.png`` and ``overlay.png`` (the ``canvas`` with every nucleus drawn,
    plus full-resolution crops where the level-0 (x, y) ``centroids_xy`` are densest; only
    the tiles under the crops are read again)."""
    from wsi_ircr.slide.overlay import pick_crop_windows, polygons_in_window, render_mask_png, save_png

    render_mask_png(plan.tissue.mask, out_dir / "tissue.png")
    crop_px = max(64, int(round(384 * 0.5 / plan.slide_mpp)))
    windows = pick_crop_windows(centroids_xy, crop_px, config.overlay_crops, reader.dimensions_xy)
    crops = []
    for x0, y0, x1, y1 in windows:
        image = reader.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        polygons = _window_polygons(plan, counts, work_dir, config, (x0, y0, x1, y1))
        crops.append((image, polygons_in_window(polygons, (x0, y0, x1, y1))))
    save_png(canvas.finish(crops, windows), out_dir / "overlay.png")


def driver_rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@dataclass
class TileResults:
    """What the tile tasks of one slide reported, summed as they finish.

    counts / dropped: instances kept / dropped at the halo per tile; seconds: task seconds
    per stage; worker_rss_mb: largest worker resident memory at the end of one of its tasks;
    reused: tiles whose result an earlier, interrupted run had saved; ran: the (device,
    precision, torch threads, engine) tasks reported running with (``BatchReport.ran``);
    unreadable: level-0 (x, y, w, h) boxes of broken slide tiles the tiles met (saved
    results included); stores: ``host:path`` of the node-local stores tasks used.
    """

    counts: dict[Tile, int]
    dropped: dict[Tile, int]
    seconds: dict[str, float]
    worker_rss_mb: float = 0.0
    reused: int = 0
    ran: set = field(default_factory=set)
    unreadable: set = field(default_factory=set)
    stores: set = field(default_factory=set)

    def add(self, report) -> None:
        """Fold in one task's ``BatchReport``."""
        self.counts.update(report.counts)
        self.dropped.update(report.dropped)
        for k, v in report.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.worker_rss_mb = max(self.worker_rss_mb, report.rss_mb)
        if report.ran:
            self.ran.add(tuple(report.ran))
        self.unreadable |= report.unreadable
        if report.store:
            self.stores.add(report.store)


def summarise(plan: SlidePlan, folder: RunFolder, model: ModelInfo, config: SegmentConfig, execution: ExecutionPlan,
              results: TileResults,
              n_nuclei: int, seconds: dict[str, float], driver_rss_mb: float, resumed: bool, stored: int,
              files: dict[str, str], unreadable: dict | None = None) -> dict:
    """The slide's ``summary.json``."""
    from wsi_ircr.versions import versions

    area = plan.tissue.area_mm2
    return {
        "slide": str(plan.slide_path),
        "out_dir": str(folder.path),
        "fingerprint": plan.fingerprint,
        "dimensions_xy": list(plan.grid.slide_dimensions_xy),
        "bounds_offset_xy": list(plan.bounds_offset_xy),
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "model_mpp": model.mpp,
        "tissue_area_mm2": area,
        "tiles": {"total": plan.grid.n_tiles, "segmented": len(plan.tiles), "tile_px": plan.grid.tile_px,
                  "core_px": plan.grid.core_px, "halo_px": plan.grid.halo_px, "reused_from_store": stored,
                  "reused_results": results.reused, "scratch_stores": sorted(results.stores)},
        "nuclei": n_nuclei,
        "nuclei_per_mm2": n_nuclei / area if area > 0 else 0.0,
        "nuclei_dropped_at_halo": int(sum(results.dropped.values())),
        "regions": None if plan.regions is None else plan.regions.report(plan.slide_mpp),
        "unreadable": unreadable or unreadable_report((), area, plan.slide_mpp),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "task_seconds": {k: round(v, 3) for k, v in results.seconds.items()},
        "peak_rss_mb": {"driver": round(driver_rss_mb, 1), "workers": round(results.worker_rss_mb, 1)},
        "resumed": resumed,
        "outputs": {**files, "overlay": "overlay.png", "tissue": "tissue.png",
                    "tile_store": None if config.scratch_dir else STORE_DIR},  # scratch: on the worker nodes
        "model": model.description,
        "execution": {**asdict(execution), "ran": [dict(zip(("device", "precision", "torch_threads", "engine"), r))
                                                   for r in sorted(results.ran)]},
        "config": to_dict(config),
        "versions": versions(),
    }


def finish_slide(reader: SlideReader, plan: SlidePlan, folder: RunFolder, model: ModelInfo, config: SegmentConfig,
                 execution: ExecutionPlan, results: TileResults, seconds: dict[str, float], resumed: bool, stored: int, t_start: float,
                 rss_mb: float = 0.0, overlay: tuple | None = None) -> dict:
    """Stages after the tile tasks: export, previews, then ``summary.json`` (the run is
    finished from that moment) and returns the summary.

    ``seconds`` holds the stages timed so far, ``t_start`` is ``time.perf_counter()`` when
    the slide started and ``rss_mb`` the driver's largest resident memory seen so far for it;
    ``overlay``: ``start_overlay``'s result when it was made earlier (while the tiles ran)."""
    def unreadable() -> dict:
        boxes = plan.unreadable_xywh | results.unreadable | unreadable_boxes(reader)
        return unreadable_report(boxes, plan.tissue.area_mm2, plan.slide_mpp)

    check_unreadable(plan, unreadable(), config.max_unreadable_fraction)
    t = time.perf_counter()
    canvas, draw_tile = overlay or start_overlay(reader, plan)
    seconds["overlay"] = seconds.get("overlay", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    files, n, centroids_xy = export_nuclei(plan, results.counts, folder.work_dir, folder.path, folder.stem, config,
                                           namespace=f"{plan.fingerprint}:{model.hash}", on_tile=draw_tile)
    seconds["stitch_export"] = time.perf_counter() - t  # the overlay's nuclei are drawn in this pass
    rss = max(rss_mb, driver_rss_mb())
    t = time.perf_counter()
    render_previews(reader, plan, results.counts, folder.work_dir, canvas, centroids_xy, folder.path,
                    config)
    seconds["overlay"] += time.perf_counter() - t
    rss = max(rss, driver_rss_mb())
    seconds["total"] = time.perf_counter() - t_start
    summary = summarise(plan, folder, model, config, execution, results, n, seconds, rss, resumed, stored, files,
                        unreadable())
    folder.finish(summary)
    return summary


def tile_slide(slide_path: str | Path, out_root: str | Path, config: SegmentConfig, client, model: ModelInfo, *,
               overwrite: bool = False) -> tuple[RunFolder, SlidePlan]:
    """``wsi-ircr tile``: plan the slide, write ``tissue.png`` and the tile store (on the
    cluster of ``client``); a later ``segment`` of the same slide and settings resumes from
    them. A finished run is left as it is."""
    import uuid

    from wsi_ircr.slide.overlay import render_mask_png
    from wsi_ircr.slide.reader import open_slide
    from wsi_ircr.slide.run_folder import run_key
    from wsi_ircr.slide.store import create_tile_store
    from wsi_ircr.slide.tasks import write_tiles

    slide_path = Path(slide_path).absolute()
    folder = RunFolder.for_slide(out_root, slide_path)
    with open_slide(slide_path, mpp=config.mpp) as reader:
        key = run_key(slide_path.name, reader.fingerprint(), model.hash, config)
        finished = not overwrite and folder.finished(key)
        plan = plan_slide(reader, config, model.mpp)
    if finished:
        return folder, plan
    folder.prepare(key, overwrite)
    render_mask_png(plan.tissue.mask, folder.path / "tissue.png")
    store = create_tile_store(folder.store_path, plan.grid, plan.tiles, fingerprint=plan.fingerprint,
                              slide_name=slide_path.name, overwrite=overwrite)
    pending = store.pending()
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(write_tiles, str(folder.store_path), pending[i:i + 4], str(slide_path), config.mpp,
                             plan.fingerprint, key=f"tiles-{token}-{folder.stem}-{i}", pure=False)
               for i in range(0, len(pending), 4)]
    client.gather(futures)
    return folder, plan
