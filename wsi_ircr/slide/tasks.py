"""Pure, idempotent tile tasks that run on Dask workers (any process, any order).

Each task is keyed by (slide fingerprint, model hash, first tile) and leaves its result
as one file per tile under the run's ``work/`` folder, written atomically, so a rerun
skips what is already there.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_ircr.slide.grid import Tile

_PREDICTORS: dict[tuple, object] = {}


def result_path(results_dir: str | Path, tile: Tile) -> Path:
    """Where the owned instances of ``tile`` are stored."""
    return Path(results_dir) / f"r{int(tile[0]):05d}_c{int(tile[1]):05d}.pkl"


def load_result(results_dir: str | Path, tile: Tile):
    """The ``TileInstances`` saved for ``tile``."""
    with open(result_path(results_dir, tile), "rb") as f:
        return pickle.load(f)


def _worker_threads() -> int:
    """Concurrent tasks on this worker (1 outside a Dask worker)."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def get_predictor(model_path: str | None, device: str):
    """The worker's Predictor for this model and device, loaded once per process.

    On the CPU, torch gets cores / concurrent tasks threads so tasks do not oversubscribe.
    """
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    key = (model_path, device)
    if key not in _PREDICTORS:
        predictor = Predictor(load_checkpoint(model_path), device=device)
        if predictor.device.type == "cpu":
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // _worker_threads()))
        _PREDICTORS[key] = predictor
    return _PREDICTORS[key]


@dataclass
class BatchReport:
    """What a task did: instances per tile and seconds per stage (summed over its tiles)."""

    counts: dict[Tile, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def write_tiles(store_path: str, indices: list[int], reader) -> BatchReport:
    """Read tiles ``indices`` of the store from the slide (OpenSlide decode + resampling)."""
    from wsi_ircr.slide.store import write_tile

    t0 = time.perf_counter()
    for i in indices:
        write_tile(store_path, i, reader)
    return BatchReport(seconds={"read_decode": time.perf_counter() - t0})


def segment_tiles(store_path: str, indices: list[int], model_path: str | None, device: str, results_dir: str,
                  on_truncated: str = "drop") -> BatchReport:
    """Segment tiles ``indices`` of the store and save each tile's owned instances.

    Stages timed: ``tile_load`` (zarr read + decompression), ``inference`` (network),
    ``postprocess`` (watershed, ownership, measurements, outlines).
    """
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.model.postprocess import instances_from_maps
    from wsi_ircr.slide.stitch import owned_instances, tile_instances
    from wsi_ircr.slide.store import TileStore

    report = BatchReport(seconds={"tile_load": 0.0, "inference": 0.0, "postprocess": 0.0})
    t0 = time.perf_counter()
    store = TileStore.open(store_path)
    images = np.stack([store.read(i) for i in indices])
    t1 = time.perf_counter()
    predictor = get_predictor(model_path, device)
    probs, hvs = predictor.predict_maps(images)
    t2 = time.perf_counter()
    for i, image, prob, hv in zip(indices, images, probs, hvs):
        tile = store.tiles[i]
        labels = instances_from_maps(prob, hv, predictor.postprocess)
        owned = owned_instances(labels, store.grid, tile, on_truncated=on_truncated)
        instances = tile_instances(owned, store.grid, tile, image=image, np_prob=prob)
        with atomic_open(result_path(results_dir, tile), "wb") as f:
            pickle.dump(instances, f, protocol=pickle.HIGHEST_PROTOCOL)
        report.counts[tile] = instances.count
    t3 = time.perf_counter()
    report.seconds.update(tile_load=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
    return report
