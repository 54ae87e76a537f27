"""Pure, idempotent tile tasks that run on Dask workers (any process, any order).

Tasks take paths, not open objects: each worker process opens the slide and loads the
model itself, once, and checks that they are the driver's (slide fingerprint, model file
hash). Each task leaves its result as one file per tile under the run's ``work/`` folder,
written atomically, so a rerun skips what is already there.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.slide.grid import Tile
from wsi_ircr.slide.plan import ExecutionPlan

log = logging.getLogger(__name__)
_PREDICTORS: dict[tuple, object] = {}
_READERS: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()  # tasks of one worker run in threads
MAX_OPEN_SLIDES = 4  # readers a worker process keeps open (concurrent slides of a cohort)


def result_path(results_dir: str | Path, tile: Tile) -> Path:
    """Where the owned instances of ``tile`` are stored."""
    return Path(results_dir) / f"r{int(tile[0]):05d}_c{int(tile[1]):05d}.pkl"


def load_result(results_dir: str | Path, tile: Tile):
    """The ``TileInstances`` saved for ``tile``."""
    with open(result_path(results_dir, tile), "rb") as f:
        return pickle.load(f)


# Torch CPU threads per task on this worker process, set once by the ``TorchThreads``
# worker plugin (wsi_ircr.slide.cluster); None = cores / this worker's concurrent tasks.
TORCH_THREADS: int | None = None


def _worker_threads() -> int:
    """Concurrent tasks on this worker (1 outside a Dask worker)."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def cpu_threads() -> int:
    """Torch threads for one task of this process (see ``TORCH_THREADS``)."""
    if TORCH_THREADS is not None:
        return TORCH_THREADS
    return max(1, len(os.sched_getaffinity(0)) // _worker_threads())


def _require_on_worker(path: str | None) -> None:
    """UserError when a file the driver found is missing on this worker."""
    if path is not None and not os.path.exists(path):
        import socket

        raise UserError(f"{path}: not found on the Dask worker on {socket.gethostname()}; workers need the slide, "
                        "model and output folder at the same paths (a shared filesystem)")


def get_predictor(model_path: str | None, model_hash: str, device: str, tta: int = 1, postprocess: str = "auto",
                  precision: str = "auto", engine: str = "auto"):
    """The worker's Predictor for this model file, device and test-time views, loaded once per process.

    Keyed by the file hash the driver saw, so a model file replaced at the same path is
    loaded anew; a worker that finds another file there (a changed or unshared file) raises
    a UserError. On the CPU, torch gets ``cpu_threads()`` at every call, so tasks do not
    oversubscribe and every task of a run computes with the same thread count (the float
    results of a convolution depend on it).
    """
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    key = (model_path, model_hash, device, tta, postprocess, precision, engine)
    with _CACHE_LOCK:
        if key in _PREDICTORS:
            return _with_cpu_threads(_PREDICTORS[key])
        _require_on_worker(model_path)
        checkpoint = load_checkpoint(model_path)
        if checkpoint.model_hash != model_hash:
            raise UserError(
                f"{checkpoint.path}: this worker's model file has hash {checkpoint.model_hash}, the driver's "
                f"{model_hash}; the file changed during the run or differs between machines: keep one copy on a "
                "shared filesystem"
            )
        predictor = Predictor(checkpoint, device=device, tta=tta, postprocess_backend=postprocess, precision=precision,
                              engine=engine)
        for old in [k for k in _PREDICTORS if k[0] == model_path and k[2:] == (device, tta, postprocess, precision, engine)]:
            del _PREDICTORS[old]
        _PREDICTORS[key] = predictor
        return _with_cpu_threads(predictor)


def preload_predictor(model_path: str | None, model_hash: str, plan: ExecutionPlan) -> None:
    """``get_predictor`` for ``plan`` ahead of the first task, with its engine's session made
    for this worker's threads; an error is left for the first task to raise."""
    try:
        predictor = get_predictor(model_path, model_hash, plan.device, plan.tta, plan.postprocess, plan.precision,
                                  plan.engine)
        prepare = getattr(predictor.net, "prepare", None)  # an engine's session (wsi_ircr.model.engines)
        if prepare is not None:
            prepare(cpu_threads())
    except Exception as e:  # noqa: BLE001 - the first task raises it again, with the slide's name
        log.debug("preloading the model failed: %s", e)


def _with_cpu_threads(predictor):
    """Set torch's CPU threads to ``cpu_threads()`` when ``predictor`` runs on the CPU."""
    if predictor.device.type == "cpu":
        import torch

        threads = cpu_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return predictor


def get_reader(slide_path: str, mpp: float | None, fingerprint: str):
    """The worker's reader of this slide, opened once per process; a UserError when the
    file this worker sees is not the driver's (another fingerprint)."""
    from wsi_ircr.slide.reader import open_slide

    key = (slide_path, mpp, fingerprint)
    with _CACHE_LOCK:
        if key in _READERS:
            return _READERS[key]
        _require_on_worker(slide_path)
        reader = open_slide(slide_path, mpp=mpp)
        if reader.fingerprint() != fingerprint:
            reader.close()
            raise UserError(
                f"{slide_path}: this worker's file differs from the driver's (fingerprint {reader.fingerprint()[:12]} "
                f"!= {fingerprint[:12]}); the slide changed during the run or differs between machines"
            )
        # keep the few latest slides; an evicted reader closes once no task holds it
        for old in [k for k in _READERS if k[0] == slide_path] + list(_READERS)[:-MAX_OPEN_SLIDES + 1]:
            _READERS.pop(old, None)
        _READERS[key] = reader
        return reader


@dataclass(frozen=True)
class SlideJob:
    """What a tile task of one slide needs, as plain paths and hashes (any worker, any folder).

    slide_path / mpp / fingerprint: the slide, its mpp override (None: metadata) and the
        driver's ``reader.fingerprint()``.
    store_path / results_dir: the run's tile store and per-tile results folder.
    store_spec: with a node-local store (``scratch_dir``), the store's attributes in the run
        folder, from which a worker creates its copy; ``store_path`` is then the scratch
        template its node expands (``wsi_ircr.slide.scratch``). None: ``store_path`` is shared.
    model_path / model_hash: the checkpoint (None: bundled) and the file hash the driver saw.
    plan: the execution plan (device, precision, batch, post-processing threads, ...).
    cells_um: grow a cell of up to this many um around every nucleus (0 = nuclei only).
    """

    slide_path: str
    mpp: float | None
    fingerprint: str
    store_path: str
    results_dir: str
    model_path: str | None
    model_hash: str
    plan: ExecutionPlan
    cells_um: float = 0.0
    store_spec: str | None = None


@dataclass
class BatchReport:
    """What a task did: instances and dropped nuclei per tile, seconds per stage (summed
    over its tiles), the worker process's resident memory (MiB), the larger of after the
    network and at the end, what the network ran with, the level-0 (x, y, w, h) boxes of
    broken slide tiles its tiles met and, for a node-local store, ``host:path`` of it."""

    counts: dict[Tile, int] = field(default_factory=dict)
    dropped: dict[Tile, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    ran: tuple = ()  # (device, precision, torch CPU threads, engine) the task's network ran with
    unreadable: set = field(default_factory=set)
    store: str | None = None


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def write_tiles(store_path: str, indices: list[int], slide_path: str, mpp: float | None,
                fingerprint: str) -> BatchReport:
    """Read tiles ``indices`` of the store from the slide (OpenSlide decode + resampling).

    ``mpp`` overrides the slide's level-0 mpp (None: its metadata); ``fingerprint`` is the
    driver's ``reader.fingerprint()``."""
    from wsi_ircr.slide.store import write_tile

    t0 = time.perf_counter()
    reader = get_reader(slide_path, mpp, fingerprint)
    for i in indices:
        write_tile(store_path, i, reader)
    return BatchReport(seconds={"read_decode": time.perf_counter() - t0}, rss_mb=_rss_mb())


def segment_batch(job: SlideJob, indices: list[int], boxes: list | None = None, on_truncated: str = "drop") -> BatchReport:
    """Tiles ``indices`` of the job's store, streamed in forward batches of ``job.plan.batch_tiles``;
    ``boxes``: per tile, the (r0, c0, r1, c1) of its window the network runs on
    (``crop.tissue_box``; None = every window whole).

    Stages (``wsi_ircr.slide.stream``, overlapping, bounded queues): load each tile (from the
    store, or read from the slide and stored once: a rerun reuses it) -> the network (and,
    with the torch post-processing backend, the instances, on the network's device) ->
    post-processing on the CPU (``segment_tile``: watershed unless done, ownership,
    measurements, outlines) and the tile's result saved atomically as soon as it is done.

    Busy seconds per stage: ``read_decode`` (slide reads, store writes), ``tile_load`` (store
    reads), ``inference``, ``postprocess``.
    """
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.slide.crop import full_box, predict_in_boxes
    from wsi_ircr.slide.segmentation import segment_tile
    from wsi_ircr.slide.store import TileStore, write_tile
    from wsi_ircr.slide.stream import Stage, stream

    if job.store_spec:
        from wsi_ircr.slide.scratch import node_store_name, open_scratch_store

        store = open_scratch_store(job.store_path, job.store_spec)
    else:
        store = TileStore.open(job.store_path)
    plan = job.plan
    predictor = get_predictor(job.model_path, job.model_hash, plan.device, plan.tta, plan.postprocess, plan.precision,
                              plan.engine)
    report = BatchReport(seconds={"read_decode": 0.0, "tile_load": 0.0, "inference": 0.0, "postprocess": 0.0},
                         store=node_store_name(store.path) if job.store_spec else None)
    box_of = dict(zip(indices, boxes or [full_box(store.grid)] * len(indices)))

    def load(batch: list[int]):
        images, unreadable = [], []
        for i in batch:
            t0 = time.perf_counter()
            if store.is_done(i):
                images.append(store.read(i))
                report.seconds["tile_load"] += time.perf_counter() - t0
            else:
                images.append(write_tile(store.path, i, get_reader(job.slide_path, job.mpp, job.fingerprint)))
                report.seconds["read_decode"] += time.perf_counter() - t0
            boxes = tuple(tuple(int(v) for v in b) for b in store.unreadable(i))
            unreadable.append((boxes, store.unreadable_mask(i, boxes)))
        return batch, np.stack(images), unreadable

    def infer(item):
        batch, images, unreadable = item
        _with_cpu_threads(predictor)  # torch's CPU threads are set per calling thread
        outputs = predict_in_boxes(predictor, images, [box_of[i] for i in batch])
        report.rss_mb = max(report.rss_mb, _rss_mb())  # images and maps of a batch or two are held here
        return batch, images, unreadable, outputs

    def post(item):
        batch, images, unreadable, outputs = item
        done = []
        for k, i in enumerate(batch):
            tile = store.tiles[i]
            broken, mask = unreadable[k]
            prob, hv, labels = outputs[k]
            instances = segment_tile(images[k], predictor, store.grid, tile, maps=(prob, hv), labels=labels,
                                     on_truncated=on_truncated, unreadable=mask,
                                     cell_px=job.cells_um / store.grid.mpp, box=box_of[i])
            instances.unreadable_xywh = broken  # kept with the result: the store may be on another node
            report.unreadable.update(broken)
            with atomic_open(result_path(job.results_dir, tile), "wb") as f:
                pickle.dump(instances, f, protocol=pickle.HIGHEST_PROTOCOL)
            done.append((tile, instances.count, instances.dropped))
        return done

    batches = [indices[k:k + plan.batch_tiles] for k in range(0, len(indices), plan.batch_tiles)]
    busy: dict[str, float] = {}
    stages = [Stage("load", load), Stage("inference", infer), Stage("postprocess", post, plan.post_threads)]
    for done in stream(batches, stages, depth=2, seconds=busy):
        for tile, count, dropped in done:
            report.counts[tile] = count
            report.dropped[tile] = dropped
    report.seconds.update(inference=busy["inference"], postprocess=busy["postprocess"])
    report.rss_mb = max(report.rss_mb, _rss_mb())
    report.ran = (predictor.device.type, predictor.precision,
                  cpu_threads() if predictor.device.type == "cpu" else 0, predictor.engine)
    return report
