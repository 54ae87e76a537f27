"""The execution plan: every ``auto`` / ``0`` setting of ``SegmentConfig`` resolved once.

A cluster backend (``wsi_ircr.slide.cluster``) says what it gives (``ClusterSize``);
``resolve_plan`` turns the config, that size and the model into an ``ExecutionPlan``. The
plan is what the workers receive (inside every ``SlideJob``) and what ``summary.json``
records, beside what the workers report they ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsi_ircr.errors import UserError
from wsi_ircr.slide.config import SegmentConfig

MIN_IN_FLIGHT = 4  # tile tasks kept submitted however few workers have joined


@dataclass(frozen=True)
class ClusterSize:
    """What a cluster backend gives, known before its workers start.

    processes / threads_per_process: worker processes (for an adaptive cluster, the most it
        starts) and the concurrent tasks of each.
    cores_per_process: CPU cores of one worker process (None: each worker's own threads,
        for a cluster whose layout this command does not know).
    gpu: whether the workers have a GPU (None: unknown, no worker has joined yet).
    local: the workers run on this machine (their CPU and GPU are the driver's).
    gpu_per_process: each worker process of a job is pinned to its own GPU.
    no_gpu: the one-line fix when ``device: cuda`` meets workers without a GPU.
    """

    backend: str
    processes: int
    threads_per_process: int
    cores_per_process: int | None
    gpu: bool | None
    local: bool
    gpu_per_process: bool = False
    no_gpu: str = "use --device cpu or auto"


@dataclass(frozen=True)
class ExecutionPlan:
    """What runs: no ``auto`` and no ``0`` left except where each worker decides.

    device: "cpu" or "cuda". precision: the network's arithmetic ("fp32", "bf16", ...;
        "auto" only for remote CPU workers, whose CPU this machine cannot see: each worker
        resolves it and reports what it ran). engine: what runs it ("torch", "onnxruntime",
        ...; "auto" for remote CPU workers, whose installed engines decide).
        postprocess: "skimage" or "torch".
    workers / threads_per_worker: worker processes (the most, for an adaptive cluster) and
        concurrent tile tasks of each. cores_per_worker: CPU cores of one worker process
        (0: each worker's own threads). torch_threads: torch CPU threads per tile task (0:
        each worker's cores / its threads). gpu_per_process: a worker process sees one GPU.
    batch_tiles / task_tiles / post_threads: forward batch, tiles per task and
        post-processing threads of a task. tasks_in_flight: tile tasks kept submitted.
    """

    backend: str
    device: str
    precision: str
    postprocess: str
    tta: int
    workers: int
    threads_per_worker: int
    cores_per_worker: int
    torch_threads: int
    gpu_per_process: bool
    batch_tiles: int
    task_tiles: int
    post_threads: int
    tasks_in_flight: int
    engine: str = "auto"

    @property
    def task_resources(self) -> dict | None:
        """Dask resources a tile task asks for (a GPU worker declares ``GPU`` = its threads)."""
        return {"GPU": 1} if self.device == "cuda" else None


def torch_threads_per_task(cores_per_process: int, tasks_per_process: int) -> int:
    """Torch threads for one task: the process's cores / its concurrent tasks (at least 1)."""
    return max(1, cores_per_process // max(1, tasks_per_process))


def resolve_device(requested: str, size: ClusterSize) -> str:
    """"cpu" or "cuda": ``auto`` takes the workers' GPU when they have one; ``cuda`` on
    workers without one is a UserError (a remote cluster whose workers are unknown yet is
    trusted)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {requested}: expected auto, cpu or cuda")
    if requested == "auto":
        return "cuda" if size.gpu else "cpu"
    if requested == "cuda" and size.gpu is False:
        raise UserError(f"--device cuda: the {size.backend} cluster's workers have no GPU; {size.no_gpu}")
    return requested


def plan_precision(requested: str, device: str, size: ClusterSize, checkpoint) -> str:
    """The network's precision (``model.precision.resolve_precision``; ``checkpoint``: the
    model, whose metadata may prove precisions; None: nothing proven). Remote CPU workers keep ``auto``: their CPU
    decides, and each task reports what it ran."""
    import torch

    from wsi_ircr.model.precision import resolve_precision

    if requested == "auto" and device == "cpu" and not size.local:
        return "auto"
    return resolve_precision(requested, torch.device(device), checkpoint)


def plan_engine(requested: str, precision: str, device: str, size: ClusterSize) -> str:
    """What runs the network (``model.precision.resolve_engine``); remote CPU workers keep
    ``auto`` (their installed engines decide) unless the precision is theirs to choose too."""
    import torch

    from wsi_ircr.model.precision import resolve_engine

    if precision == "auto" or (requested == "auto" and device == "cpu" and not size.local):
        return requested
    return resolve_engine(precision, torch.device(device), requested)


def resolve_plan(config: SegmentConfig, size: ClusterSize, checkpoint=None) -> ExecutionPlan:
    """The one place where the ``auto`` / ``0`` settings of ``config`` become numbers and names."""
    import torch

    from wsi_ircr.model.inference import choose_backend

    device = resolve_device(config.device, size)
    cuda = device == "cuda"
    batch_tiles = config.batch_tiles or (2 if cuda else 1)
    task_tiles = config.task_tiles or batch_tiles * (8 if cuda else 1)
    post_threads = config.post_threads or (4 if cuda else 1)
    cores = size.cores_per_process or 0
    torch_threads = config.torch_threads or (torch_threads_per_task(cores, size.threads_per_process) if cores else 0)
    in_flight = config.tasks_in_flight or max(MIN_IN_FLIGHT, 2 * size.processes * size.threads_per_process)
    precision = plan_precision(config.precision, device, size, checkpoint)
    return ExecutionPlan(
        backend=size.backend, device=device, precision=precision, engine=plan_engine(config.engine, precision, device, size),
        postprocess=choose_backend(torch.device(device), config.postprocess), tta=config.tta,
        workers=size.processes, threads_per_worker=size.threads_per_process, cores_per_worker=cores,
        torch_threads=torch_threads, gpu_per_process=size.gpu_per_process, batch_tiles=batch_tiles,
        task_tiles=task_tiles, post_threads=post_threads, tasks_in_flight=in_flight,
    )
