"""Configuration of ``wsi-ircr segment`` and ``wsi-ircr tile``.

The defaults are the dataclass's; ``wsi_ircr/configs/segment/default.yaml`` (shipped in
the package, ``configs/segment/`` in a checkout) lists them with comments and a test keeps
the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SegmentConfig:
    """Knobs of the whole-slide pipeline; tile sizes are in model pixels (at the model's mpp).

    core_px / halo_px: each tile owns a core and is read with a halo on every side; an
        instance belongs to the tile whose core holds its centroid, so the halo must exceed
        the largest nucleus (``max_nucleus_um``) for every nucleus to be seen whole.
    tissue_mask / tissue_mpp: detect tissue at this low resolution and skip empty tiles.
    skip_glass: run the network on each tile's box around the tissue mask (plus 64 px of
        context; ``wsi_ircr.slide.crop``), not on the glass of the rest of the tile; false =
        every tile whole.
    tta: test-time augmentation: the network's maps are averaged over this many of the 8
        flips / transposes of each tile (1, 2, 4 or 8; the network's cost grows in proportion).
    batch_tiles: tiles per forward batch of the network (0 = 1 on the CPU, where a small
        working set per forward stays in the process's heap instead of being paged in anew
        every batch: ``wsi_ircr.slide.memory``; 2 on CUDA).
    task_tiles: tiles per tile task, streamed through load -> network -> post-processing
        in forward batches (0 = ``batch_tiles`` on the CPU, where concurrent tasks keep
        every core busy; 8 x ``batch_tiles`` on CUDA, where one task feeds the GPU).
    post_threads: threads of a tile task post-processing on the CPU (0 = 1 on the CPU,
        4 on CUDA).
    postprocess: the watershed: "torch" (batched, on the network's device), "skimage"
        (the reference, on the CPU) or "auto" (torch on CUDA, skimage on the CPU, where
        it is the faster: benchmarks/postprocess.md).
    precision: the network's arithmetic: fp32, bf16 (autocast, weights fp32), int8 (CPU,
        the ``cpu-fast`` extra) or auto: the fastest one the checkpoint proves accurate on
        the device (``wsi_ircr.model.precision.resolve_precision``; a checkpoint that records
        nothing: bf16 where native, CUDA or a CPU with AVX512-BF16 / AMX, else fp32).
    engine: what runs the network: torch, onnxruntime or openvino (CPU, fp32 / int8, the
        ``cpu-fast`` extra), or auto: the preferred installed engine where it applies, else torch.
    tasks_in_flight: tile tasks submitted at once over all slides of a command, so memory
        stays flat however large the cohort (0 = twice the cluster's worker threads).
    workers / threads_per_worker: the local Dask cluster (0 = from the CPU count).
    torch_threads: CPU threads of torch per tile task (0 = the worker process's cores / its
        concurrent tasks); results are reproducible across clusters for a fixed value.
    max_unreadable_fraction: a slide with broken tiles is segmented around them; it fails
        when the unreadable area exceeds this fraction of its tissue area.
    gzip: write ``<stem>.geojson.gz`` (QuPath opens it by drag and drop) or plain.
    outputs: the nuclei files written (``wsi_ircr.slide.writers.FORMATS``): "geojson"
        (QuPath), "csv" (``nuclei.csv``), "parquet" (GeoParquet ``nuclei.parquet``, the
        ``parquet`` extra).
    cells_um: > 0 writes QuPath cells: every nucleus grown by up to this many um without
        crossing its neighbours' cells, with cell and cytoplasm measurements
        (``wsi_ircr.slide.cells``; the halo must exceed the largest nucleus plus twice it).
    roi: a QuPath GeoJSON export of annotations (level-0 px): tiles are planned on these
        regions instead of the tissue mask, and only nuclei whose centroid lies in one are
        written (``wsi_ircr.slide.roi``; one slide per command).
    min_area_um2 / min_score: nuclei smaller than this area or with a lower score are left
        out of every output (0 = keep all; README: what each trades).
    scratch_dir: keep each slide's tile store on node-local disk instead of ``OUT/<stem>/``:
        a folder whose ``~`` and ``$VARS`` are expanded on each worker when its task runs
        (e.g. ``$TMPDIR``); a cache each node recreates from the slide where it is missing,
        removed when the slide ends (``wsi_ircr.slide.scratch``; ``segment`` only, null = off).

    The ``auto`` / ``0`` rules are applied in one place, ``wsi_ircr.slide.plan.resolve_plan``.
    """

    model: str | None = None
    mpp: float | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tta: Literal[1, 2, 4, 8] = 1
    core_px: int = 896
    halo_px: int = 64
    max_nucleus_um: float = 16.0
    tissue_mask: bool = True
    tissue_mpp: float = 8.0
    skip_glass: bool = True
    batch_tiles: int = 0
    task_tiles: int = 0
    post_threads: int = 0
    postprocess: Literal["auto", "skimage", "torch"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    tasks_in_flight: int = 0
    workers: int = 1
    threads_per_worker: int = 0
    torch_threads: int = 0
    max_unreadable_fraction: float = 0.05
    gzip: bool = True
    overlay_crops: int = 3
    outputs: tuple[str, ...] = ("geojson", "csv")
    cells_um: float = 0.0
    roi: str | None = None
    min_area_um2: float = 0.0
    min_score: float = 0.0
    scratch_dir: str | None = None

    def __post_init__(self):
        if self.core_px < 64 or self.core_px % 16:
            raise ValueError(f"core_px must be a multiple of 16 and >= 64, got {self.core_px}")
        if self.halo_px < 0 or self.halo_px % 16:
            raise ValueError(f"halo_px must be a multiple of 16 and >= 0, got {self.halo_px}")
        if self.mpp is not None and self.mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ValueError(f"max_unreadable_fraction must be within 0..1, got {self.max_unreadable_fraction}")
        if self.cells_um < 0:
            raise ValueError(f"cells_um must be >= 0, got {self.cells_um}")
        if self.min_area_um2 < 0 or not 0 <= self.min_score <= 1:
            raise ValueError(f"min_area_um2 must be >= 0 and min_score in [0, 1], got {self.min_area_um2}, {self.min_score}")
        if self.scratch_dir is not None and not self.scratch_dir.strip():
            raise ValueError("scratch_dir must be a folder (e.g. '$TMPDIR') or null")
        if self.tissue_mpp <= 0 or self.max_nucleus_um <= 0:
            raise ValueError("tissue_mpp and max_nucleus_um must be > 0")
        if min(self.batch_tiles, self.workers, self.threads_per_worker, self.torch_threads, self.overlay_crops,
               self.tasks_in_flight, self.task_tiles, self.post_threads) < 0:
            raise ValueError("batch_tiles, workers, threads_per_worker, torch_threads, tasks_in_flight, "
                             "task_tiles, post_threads, overlay_crops must be >= 0")
