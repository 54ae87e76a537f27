"""``wsi-ircr segment``: slide -> tissue -> tile grid -> zarr tiles -> Dask inference ->
owned instances per tile -> global ids -> streamed GeoJSON + CSV -> overlay + summary.

Each stage is a function with typed input and output. A run folder ``out/<stem>/`` holds
``run.json`` (slide fingerprint, model hash, resolved config) from the start and
``summary.json`` only once everything else is written: a folder with ``summary.json`` is a
finished run; one with only ``run.json`` is an unfinished run that the same command
resumes (tile store and per-tile results are reused).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open
from wsi_ircr.progress import Progress, note
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.grid import Tile, TileGrid
from wsi_ircr.slide.reader import SlideReader, open_slide, require_mpp
from wsi_ircr.slide.tissue import TissueMask, detect_tissue, full_mask

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
STORE_DIR = "tiles.zarr"
WORK_DIR = "work"
# Config keys left out of run.json: how a run is carried out (the model is in it by hash)
# and how the final export looks; they change neither the tile store nor the per-tile
# results that a resumed run reuses.
NOT_IN_RUN_KEY = ("model", "device", "batch_tiles", "workers", "threads_per_worker", "gzip", "overlay_crops")
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


def model_info(config: SegmentConfig) -> ModelInfo:
    """Load the checkpoint once on the driver to validate it and read its mpp and hash."""
    from wsi_ircr.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(config.model)
    path = str(ckpt.path.absolute()) if config.model else None
    return ModelInfo(path, ckpt.model_hash, ckpt.mpp, ckpt.describe())


def plan_slide(reader: SlideReader, config: SegmentConfig, model_mpp: float) -> SlidePlan:
    """Tissue mask and tile grid; refuses slides without mpp and a halo below the largest nucleus."""
    slide_mpp = require_mpp(reader)
    grid = TileGrid(reader.dimensions_xy, slide_mpp, model_mpp, config.core_px, config.halo_px)
    grid.check_halo(config.max_nucleus_um / model_mpp)
    if max(grid.shape_rc) < 2 * config.halo_px + 16:
        raise UserError(
            f"{reader.path}: {reader.dimensions_xy[0]}x{reader.dimensions_xy[1]} px at {slide_mpp:g} mpp is smaller than "
            f"one tile's halo ({grid.shape_rc[1]}x{grid.shape_rc[0]} px at the model's {model_mpp:g} mpp); "
            "segment an image of at least a few hundred pixels"
        )
    tissue = detect_tissue(reader, config.tissue_mpp) if config.tissue_mask else full_mask(reader, config.tissue_mpp)
    return SlidePlan(Path(reader.path), reader.fingerprint(), slide_mpp, reader.mpp_source, grid, tissue,
                     grid.tissue_tiles(tissue))


def _batches(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def dask_client(scheduler: str | None, config: SegmentConfig):
    """A client of the cluster at ``scheduler`` or of a new local cluster (no dashboard).

    The local cluster gets ``workers`` processes (0 = one per 4 cores; 1 = threads inside
    this process) of ``threads_per_worker`` threads (0 = all cores / workers); with
    ``device: cuda`` each worker declares ``resources={"GPU": threads}`` (tasks ask for 1).
    """
    import os

    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise UserError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({type(e).__name__}); start one with 'dask scheduler' or drop --scheduler") from None
        try:
            _check_workers(client, scheduler, config)
            yield client
        finally:
            client.close()
        return
    cores = os.cpu_count() or 1
    workers = config.workers or max(1, cores // 4)
    threads = config.threads_per_worker or max(1, cores // workers)
    # One GPU unit per thread: GPU tasks pin to the worker without queueing behind one
    # another, so each thread's CPU post-processing overlaps the others' inference.
    resources = {"GPU": threads} if config.device == "cuda" else None
    with warnings.catch_warnings():
        # the scheduler's HTTP server moves off a busy port 8787 with a warning on stderr
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=workers > 1,
                               dashboard_address=None, resources=resources, silence_logs=logging.CRITICAL)
    with cluster, Client(cluster) as client:
        yield client


def _check_workers(client, scheduler: str, config: SegmentConfig) -> None:
    """Refuse ``device: cuda`` on a cluster whose workers declare no GPU (its tasks would
    wait forever); say so when no worker has joined yet."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if not workers:
        note(f"--scheduler {scheduler}: no workers yet; tasks wait until some join")
    elif config.device == "cuda" and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
        raise UserError(f"--scheduler {scheduler}: --device cuda, but none of its {len(workers)} workers declares "
                        "a GPU; start GPU workers with 'dask worker ... --resources GPU=1'")


def _run_tasks(client, label: str, func, batches: list[list[int]], args: tuple, progress: bool, gpu: bool) -> list:
    """Submit ``func(args[0], batch, *args[1:])`` per batch, gather as they finish (with a
    progress bar), in any order.

    Task keys are ``<label>-<run token>-<first index>``: unique to this call, so runs that
    share a cluster (another output folder, another config, a copy of the slide) never
    collide on a key and receive each other's task.
    """
    from distributed import as_completed

    if not batches:
        return []
    resources = {"GPU": 1} if gpu else None
    token = uuid.uuid4().hex[:12]
    sizes = {}
    for batch in batches:
        future = client.submit(func, args[0], batch, *args[1:], key=f"{label}-{token}-{batch[0]}",
                               resources=resources, pure=False)
        sizes[future] = len(batch)
    reports = []
    with Progress(label, sum(sizes.values()), enabled=progress) as bar:
        for future, report in as_completed(list(sizes), with_results=True):
            reports.append(report)
            bar.update(sizes[future])
    return reports


def write_store(client, plan: SlidePlan, mpp_override: float | None, store_path: Path, progress: bool
                ) -> tuple[dict[str, float], int]:
    """Stage: the zarr tile store (resumes a matching store). Workers open the slide
    themselves from ``plan.slide_path`` (with ``mpp_override``).

    Returns:
        Summed task seconds, and the number of tiles that were already in the store.
    """
    from wsi_ircr.slide.store import create_tile_store
    from wsi_ircr.slide.tasks import write_tiles

    store = create_tile_store(store_path, plan.grid, plan.tiles, fingerprint=plan.fingerprint,
                              slide_name=plan.slide_path.name)
    pending = store.pending()
    reports = _run_tasks(client, "tiles", write_tiles, _batches(pending, 4),
                         (str(store_path), str(plan.slide_path), mpp_override, plan.fingerprint), progress, gpu=False)
    return {"read_decode": sum(r.seconds["read_decode"] for r in reports)}, store.n_tiles - len(pending)


def segment_store(client, plan: SlidePlan, store_path: Path, work_dir: Path, model: ModelInfo, config: SegmentConfig,
                  progress: bool) -> tuple[dict[Tile, int], dict[str, float], int]:
    """Stage: inference + post-processing of every tile without a saved result.

    Returns:
        Instances per tile, summed task seconds per step, and the number of tiles whose
        result was already saved (by an interrupted run).
    """
    from wsi_ircr.slide.store import TileStore
    from wsi_ircr.slide.tasks import load_result, result_path, segment_tiles

    work_dir.mkdir(parents=True, exist_ok=True)
    store = TileStore.open(store_path)
    counts: dict[Tile, int] = {}
    pending = []
    for i, tile in enumerate(store.tiles):
        if result_path(work_dir, tile).exists():
            counts[tile] = load_result(work_dir, tile).count
        else:
            pending.append(i)
    reports = _run_tasks(client, "segment", segment_tiles, _batches(pending, config.batch_tiles),
                         (str(store_path), model.path, model.hash, config.device, str(work_dir)), progress,
                         gpu=config.device == "cuda")
    seconds = {"tile_load": 0.0, "inference": 0.0, "postprocess": 0.0}
    for report in reports:
        counts.update(report.counts)
        for k in seconds:
            seconds[k] += report.seconds[k]
    return counts, seconds, len(store.tiles) - len(pending)


def export_nuclei(plan: SlidePlan, counts: dict[Tile, int], work_dir: Path, geojson_path: Path, table_path: Path,
                  namespace: str) -> tuple[int, np.ndarray]:
    """Stage: global ids by prefix sum, then stream every tile's nuclei (row-major) to the
    GeoJSON and CSV, one tile in memory at a time.

    Returns:
        The number of nuclei written, and float64 (<= CROP_SAMPLE, 2) level-0 (x, y)
        centroids of every k-th nucleus (all of them when there are few), enough to find
        where nuclei are densest without holding them all.
    """
    from wsi_ircr.slide.geojson import GeoJSONWriter
    from wsi_ircr.slide.stitch import assign_global_ids
    from wsi_ircr.slide.table import NucleiTableWriter, export_tile
    from wsi_ircr.slide.tasks import load_result

    offsets = assign_global_ids(counts)
    stride = max(1, -(-sum(counts.values()) // CROP_SAMPLE))
    sample = [np.zeros((0, 2))]
    with GeoJSONWriter(geojson_path) as geojson, NucleiTableWriter(table_path) as table:
        for tile in sorted(counts):
            if not counts[tile]:
                continue
            instances = load_result(work_dir, tile)
            export_tile(instances, plan.grid, offsets[tile], geojson, table, namespace=namespace)
            global_ids = offsets[tile] + 1 + np.arange(instances.count)
            sample.append(plan.grid.target_to_level0_xy(instances.centroid_rc[global_ids % stride == 0]))
    return geojson.count, np.concatenate(sample)


def _level0_polygons(plan: SlidePlan, counts: dict[Tile, int], work_dir: Path,
                     window_xy: tuple[int, int, int, int] | None = None):
    """Every nucleus polygon (level-0 x, y), one tile in memory at a time; with a level-0
    window (x0, y0, x1, y1) only the tiles whose read window meets it are loaded."""
    from wsi_ircr.slide.polygons import to_level0
    from wsi_ircr.slide.tasks import load_result

    side = plan.grid.tile_px * plan.grid.scale
    for tile in sorted(counts):
        if not counts[tile]:
            continue
        if window_xy is not None:
            x, y = plan.grid.origin_xy(tile)
            if x >= window_xy[2] or y >= window_xy[3] or x + side <= window_xy[0] or y + side <= window_xy[1]:
                continue
        for polygon in load_result(work_dir, tile).polygons:
            yield to_level0(polygon, plan.grid)


def render_previews(reader: SlideReader, plan: SlidePlan, counts: dict[Tile, int], work_dir: Path,
                    centroids_xy: np.ndarray, out_dir: Path, n_crops: int) -> None:
    """Stage: ``tissue.png`` and ``overlay.png`` (thumbnail with tissue and nuclei outlines,
    plus full-resolution crops where the level-0 (x, y) ``centroids_xy`` are densest)."""
    from wsi_ircr.slide.overlay import pick_crop_windows, polygons_in_window, render_mask_png, render_overlay

    render_mask_png(plan.tissue.mask, out_dir / "tissue.png")
    thumb = reader.thumbnail(2048)
    scale = thumb.shape[1] / reader.dimensions_xy[0]
    crop_px = max(64, int(round(384 * 0.5 / plan.slide_mpp)))
    windows = pick_crop_windows(centroids_xy, crop_px, n_crops, reader.dimensions_xy)
    crops = []
    for x0, y0, x1, y1 in windows:
        image = reader.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        polygons = _level0_polygons(plan, counts, work_dir, (x0, y0, x1, y1))
        crops.append((image, polygons_in_window(polygons, (x0, y0, x1, y1))))
    render_overlay(out_dir / "overlay.png", thumb, plan.tissue.mask, _level0_polygons(plan, counts, work_dir), scale,
                   crops, windows)


def _peak_rss_mb(client) -> dict[str, float]:
    """Peak resident memory of this process and of every worker process, MiB."""

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    peaks = {"driver": peak()}
    try:
        peaks.update({f"worker {addr}": mb for addr, mb in client.run(peak).items()})
    except (OSError, TimeoutError):
        pass
    return peaks


def run_stem(slide_path: str | Path) -> str:
    """Name of a slide's run folder: the file name without its extension (nor ``.ome``).

    ``TCGA-...-DX1.8F9A....svs`` keeps its uuid part, so distinct slides get distinct folders.
    """
    name = Path(slide_path).name
    stem = Path(name).stem
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return stem or name


def check_distinct_stems(slide_paths) -> None:
    """UserError if two slides of one command would share a run folder (or one is listed twice)."""
    seen: dict[str, Path] = {}
    for path in map(Path, slide_paths):
        stem = run_stem(path)
        if stem in seen:
            if seen[stem].absolute() == path.absolute():
                raise UserError(f"{path} is listed twice; list each slide once")
            raise UserError(f"{seen[stem]} and {path} would both write OUT/{stem}/; rename one or run them with different -o")
        seen[stem] = path


def run_key(plan: SlidePlan, model: ModelInfo, config: SegmentConfig) -> dict:
    """What ``run.json`` holds: what a resumed run must share with the unfinished one."""
    import wsi_ircr

    settings = {k: v for k, v in to_dict(config).items() if k not in NOT_IN_RUN_KEY}
    return {"slide": plan.slide_path.name, "fingerprint": plan.fingerprint, "model_hash": model.hash,
            "config": settings, "wsi_ircr": wsi_ircr.__version__}


def prepare_run_dir(out_dir: Path, run_key: dict, overwrite: bool) -> bool:
    """Create, resume or refuse ``out_dir``; returns True when resuming an unfinished run."""
    run_file, summary = out_dir / RUN_FILE, out_dir / SUMMARY_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another -o")
    ours = run_file.exists() or summary.exists()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not ours:
            raise UserError(f"{out_dir}: exists and is not a wsi-ircr run folder; choose another -o")
        if overwrite:
            shutil.rmtree(out_dir)
        elif summary.exists():
            raise UserError(f"{out_dir}: holds a finished run; pass --overwrite to redo it or choose another -o")
        else:
            try:
                previous = json.loads(run_file.read_text())
            except ValueError:
                previous = None
            if previous != run_key:
                raise UserError(f"{out_dir}: holds an unfinished run {_difference(previous, run_key)}; "
                                "pass --overwrite to start over or choose another -o")
            return True
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(run_file) as f:
            json.dump(run_key, f, indent=1)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the run folder ({e.strerror or e}); choose another -o") from None
    return False


def _difference(previous, current: dict) -> str:
    """What differs between two run keys, for the refusal message."""
    if not isinstance(previous, dict):
        return "whose run.json is unreadable"
    if previous.get("fingerprint") != current["fingerprint"]:
        return f"of another slide ({previous.get('slide')})"
    if previous.get("model_hash") != current["model_hash"]:
        return f"of another model (hash {previous.get('model_hash')})"
    old, new = previous.get("config") or {}, current["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
        return "with another " + ", ".join(f"{k} ({old.get(k)} -> {new.get(k)})" for k in keys)
    return f"of wsi-ircr {previous.get('wsi_ircr')}"


@dataclass(frozen=True)
class Run:
    """An opened slide, its plan and its run folder."""

    reader: SlideReader
    plan: SlidePlan
    out_dir: Path
    stem: str
    resumed: bool
    plan_seconds: float


def start_run(slide_path: str | Path, out_root: Path, config: SegmentConfig, model: ModelInfo, *,
              overwrite: bool = False, progress: bool = True) -> Run:
    """Open the slide, plan its tiles and create (or resume) ``out_root/<stem>/``.

    Paths are made absolute: workers may run in another folder or on another machine."""
    t = time.perf_counter()
    reader = open_slide(Path(slide_path).absolute(), mpp=config.mpp)
    try:
        plan = plan_slide(reader, config, model.mpp)
        plan_seconds = time.perf_counter() - t
        stem = run_stem(plan.slide_path)
        out_dir = Path(out_root).absolute() / stem
        resumed = prepare_run_dir(out_dir, run_key(plan, model, config), overwrite)
    except BaseException:
        reader.close()
        raise
    if progress:
        state = "resuming" if resumed else "starting"
        note(f"{state} {plan.slide_path.name}: {reader.dimensions_xy[0]}x{reader.dimensions_xy[1]} px at "
             f"{plan.slide_mpp:g} mpp ({plan.mpp_source}) -> model {model.mpp:g} mpp; tissue "
             f"{plan.tissue.area_mm2:.2f} mm^2; {len(plan.tiles)} of {plan.grid.n_tiles} tiles")
    return Run(reader, plan, out_dir, stem, resumed, plan_seconds)


def tile_slide(slide_path: str | Path, out_root: Path, config: SegmentConfig, client, model: ModelInfo, *,
               overwrite: bool = False, progress: bool = True) -> Run:
    """``wsi-ircr tile``: tissue mask and tile store only (``segment`` later resumes from them)."""
    from wsi_ircr.slide.overlay import render_mask_png

    run = start_run(slide_path, out_root, config, model, overwrite=overwrite, progress=progress)
    run.reader.close()
    render_mask_png(run.plan.tissue.mask, run.out_dir / "tissue.png")
    write_store(client, run.plan, config.mpp, run.out_dir / STORE_DIR, progress)
    return run


def segment_slide(slide_path: str | Path, out_root: Path, config: SegmentConfig, client, model: ModelInfo, *,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Run every stage for one slide into ``out_root/<stem>/``; returns the summary dict."""
    from wsi_ircr.versions import versions

    t_start = time.perf_counter()
    run = start_run(slide_path, out_root, config, model, overwrite=overwrite, progress=progress)
    plan, out_dir, stem, resumed = run.plan, run.out_dir, run.stem, run.resumed
    with run.reader as reader:  # closed whatever happens
        seconds: dict[str, float] = {"plan_tissue": run.plan_seconds}
        store_path, work_dir = out_dir / STORE_DIR, out_dir / WORK_DIR
        t = time.perf_counter()
        task_seconds, store_reused = write_store(client, plan, config.mpp, store_path, progress)
        seconds["tile_store"] = time.perf_counter() - t
        t = time.perf_counter()
        counts, segment_seconds, results_reused = segment_store(client, plan, store_path, work_dir, model, config,
                                                                progress)
        seconds["segment_wall"] = time.perf_counter() - t
        task_seconds.update(segment_seconds)
        t = time.perf_counter()
        suffix = ".geojson.gz" if config.gzip else ".geojson"
        n, centroids_xy = export_nuclei(plan, counts, work_dir, out_dir / f"{stem}{suffix}", out_dir / "nuclei.csv",
                                        namespace=f"{plan.fingerprint}:{model.hash}")
        seconds["stitch_export"] = time.perf_counter() - t
        t = time.perf_counter()
        render_previews(reader, plan, counts, work_dir, centroids_xy, out_dir, config.overlay_crops)
        seconds["overlay"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    area = plan.tissue.area_mm2
    summary = {
        "slide": str(plan.slide_path),
        "out_dir": str(out_dir),
        "fingerprint": plan.fingerprint,
        "dimensions_xy": list(reader.dimensions_xy),
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "model_mpp": model.mpp,
        "tissue_area_mm2": area,
        "tiles": {"total": plan.grid.n_tiles, "segmented": len(plan.tiles), "tile_px": plan.grid.tile_px,
                  "core_px": plan.grid.core_px, "halo_px": plan.grid.halo_px, "reused_from_store": store_reused,
                  "reused_results": results_reused},
        "nuclei": n,
        "nuclei_per_mm2": n / area if area > 0 else 0.0,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "task_seconds": {k: round(v, 3) for k, v in task_seconds.items()},
        "peak_rss_mb": _peak_rss_mb(client),
        "resumed": resumed,
        "outputs": {"geojson": f"{stem}{suffix}", "table": "nuclei.csv", "overlay": "overlay.png",
                    "tissue": "tissue.png", "tile_store": STORE_DIR},
        "model": model.description,
        "config": to_dict(config),
        "versions": versions(),
    }
    with atomic_open(out_dir / SUMMARY_FILE) as f:
        json.dump(summary, f, indent=1)
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary
