"""Where tile tasks run: a local Dask cluster, an existing scheduler, or SLURM jobs.

Every cluster gets the ``WorkerSetup`` plugin, which fixes once per worker process how
many torch threads a task uses (the process's cores / its concurrent tasks) and, on GPU
nodes with several worker processes, which GPU each process sees.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from wsi_ircr.errors import UserError
from wsi_ircr.slide.config import SegmentConfig

SLURM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cluster" / "slurm.yaml"
CLUSTERS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmConfig:
    """SLURM worker jobs started through dask-jobqueue (``configs/cluster/slurm.yaml``).

    queue / account: partition (``-p``) and account (``-A``); null = the site's default.
    cores / memory / walltime: per job. gpus: GPUs per job (``--gres=gpu:N``); each job
        then runs one worker process per GPU, each seeing only its own GPU.
    processes: worker processes per job without GPUs (cores are split between them).
    minimum_jobs / maximum_jobs: adaptive scaling bounds (jobs come and go with the work).
    setup: shell lines run before the worker starts (``module load ...``, ``source .venv/bin/activate``).
    extra_directives: more ``#SBATCH`` lines, e.g. ``--constraint=a100``.
    local_directory / log_directory: worker scratch space and job log folder (null = defaults).
    interface: network interface the scheduler and workers talk over (e.g. ``ib0``; null =
        the default route's).
    """

    queue: str | None = None
    account: str | None = None
    cores: int = 8
    memory: str = "32GB"
    gpus: int = 0
    processes: int = 1
    walltime: str = "04:00:00"
    minimum_jobs: int = 0
    maximum_jobs: int = 4
    setup: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None

    def __post_init__(self):
        if self.cores < 1 or self.gpus < 0 or self.processes < 1:
            raise ValueError("cores and processes must be >= 1 and gpus >= 0")
        if not 0 <= self.minimum_jobs <= self.maximum_jobs or self.maximum_jobs < 1:
            raise ValueError("need 0 <= minimum_jobs <= maximum_jobs and maximum_jobs >= 1")
        if self.cores < self.worker_processes:
            raise ValueError(f"cores ({self.cores}) must be at least one per worker process ({self.worker_processes})")

    @property
    def worker_processes(self) -> int:
        """Worker processes per job: one per GPU, else ``processes``."""
        return self.gpus or self.processes


def load_slurm_config(path: str | Path | None = None, overrides=()) -> SlurmConfig:
    """The SLURM config at ``path`` (default: the packaged ``configs/cluster/slurm.yaml``)."""
    from wsi_ircr.config import resolve_config

    return resolve_config(SlurmConfig, path or SLURM_CONFIG, overrides)


def torch_threads_per_task(cores_per_process: int, tasks_per_process: int) -> int:
    """Torch threads for one task: the process's cores / its concurrent tasks (at least 1)."""
    return max(1, cores_per_process // max(1, tasks_per_process))


class WorkerSetup(WorkerPlugin):
    """Worker plugin: torch threads per task and (with ``gpu_per_process``) the GPU of each
    worker process, fixed once when the worker starts.

    ``cores_per_process``: the cores this worker process may use (the node's cores / the
    worker processes sharing it). None (an existing cluster, whose layout this command does
    not know) = the worker's own ``--nthreads``, so a node of N processes started with
    ``dask worker --nworkers N`` (each ``cores / N`` threads, Dask's default) is never
    oversubscribed. ``torch_threads`` > 0 fixes the threads per task instead.
    """

    name = "wsi-ircr-worker-setup"

    def __init__(self, cores_per_process: int | None = None, gpu_per_process: bool = False, torch_threads: int = 0):
        self.cores_per_process = cores_per_process
        self.gpu_per_process = gpu_per_process
        self.torch_threads = torch_threads

    def setup(self, worker) -> None:
        from wsi_ircr.slide import tasks
        from wsi_ircr.slide.memory import limit_malloc_arenas

        limit_malloc_arenas()
        nthreads = worker.state.nthreads
        tasks.TORCH_THREADS = self.torch_threads or torch_threads_per_task(self.cores_per_process or nthreads, nthreads)
        if self.gpu_per_process:
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            suffix = str(worker.name).rsplit("-", 1)[-1]
            if visible and suffix.isdigit():  # dask worker --nworkers N names its processes <name>-0 .. -N-1
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(suffix) % len(visible)]


def _register(client, plugin: WorkerSetup) -> None:
    client.register_plugin(plugin, name=WorkerSetup.name)


@contextmanager
def local_client(config: SegmentConfig):
    """A client of a new local cluster (no dashboard).

    ``workers`` processes (0 = one per 4 cores; 1 = threads inside this process) of
    ``threads_per_worker`` threads (0 = all cores / workers); with ``device: cuda`` each
    worker declares ``resources={"GPU": threads}`` (tasks ask for 1), so one thread's
    post-processing overlaps another's inference.
    """
    from distributed import Client, LocalCluster

    cores = len(os.sched_getaffinity(0))
    workers = config.workers or max(1, cores // 4)
    threads = config.threads_per_worker or max(1, cores // workers)
    resources = {"GPU": threads} if config.device == "cuda" else None
    with warnings.catch_warnings():
        # the scheduler's HTTP server moves off a busy port 8787 with a warning on stderr
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=workers > 1,
                               dashboard_address=None, resources=resources, silence_logs=logging.CRITICAL)
    with cluster, Client(cluster) as client:
        _register(client, WorkerSetup(cores_per_process=max(1, cores // workers), torch_threads=config.torch_threads))
        yield client


def check_address(address: str) -> None:
    """UserError unless ``address`` reads as a scheduler address (``tcp://HOST:PORT``)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        parse_host_port(parse_address(address)[1])
    except ValueError as e:
        raise UserError(f"--scheduler {address}: not a scheduler address ({e}); pass tcp://HOST:PORT, "
                        "e.g. tcp://head:8786") from None


@contextmanager
def scheduler_client(address: str, config: SegmentConfig):
    """A client of the existing Dask scheduler at ``address`` (a malformed or silent address: UserError)."""
    from distributed import Client

    check_address(address)
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"--scheduler {address}: cannot reach a Dask scheduler there ({type(e).__name__}); "
                        "start one with 'dask scheduler' or drop --scheduler") from None
    try:
        _check_workers(client, address, config)
        _register(client, WorkerSetup(torch_threads=config.torch_threads))
        yield client
    finally:
        client.close()


def slurm_cluster(slurm: SlurmConfig, config: SegmentConfig):
    """A dask-jobqueue ``SLURMCluster`` (not scaled yet) for ``slurm``; GPU jobs run one
    worker process per GPU, each declaring ``resources={"GPU": its threads}``."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UserError("--cluster slurm needs dask-jobqueue: pip install \"wsi-ircr[cluster]\"") from None
    processes = slurm.worker_processes
    threads = max(1, slurm.cores // processes)
    extra_args = ["--resources", f"GPU={threads}"] if slurm.gpus else []
    directives = ([f"--gres=gpu:{slurm.gpus}"] if slurm.gpus else []) + list(slurm.extra_directives)
    return SLURMCluster(queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=processes,
                        memory=slurm.memory, walltime=slurm.walltime, job_extra_directives=directives,
                        worker_extra_args=extra_args, job_script_prologue=list(slurm.setup),
                        local_directory=slurm.local_directory, log_directory=slurm.log_directory,
                        interface=slurm.interface,
                        dashboard_address=None, scheduler_options={"dashboard_address": None},
                        silence_logs="error")


@contextmanager
def slurm_client(slurm: SlurmConfig, config: SegmentConfig):
    """A client of SLURM worker jobs that scale between ``minimum_jobs`` and ``maximum_jobs``."""
    from distributed import Client

    if config.device == "cuda" and not slurm.gpus:
        raise UserError("--device cuda on SLURM needs GPU jobs: set gpus: 1 (or more) in the SLURM config")
    cluster = slurm_cluster(slurm, config)
    try:
        cluster.adapt(minimum_jobs=slurm.minimum_jobs, maximum_jobs=slurm.maximum_jobs)
        with Client(cluster) as client:
            _register(client, WorkerSetup(cores_per_process=max(1, slurm.cores // slurm.worker_processes),
                                          gpu_per_process=slurm.gpus > 0, torch_threads=config.torch_threads))
            yield client
    finally:
        cluster.close()


def _check_workers(client, scheduler: str, config: SegmentConfig) -> None:
    """Refuse ``device: cuda`` on a cluster whose workers declare no GPU (its tasks would
    wait forever); say so when no worker has joined yet."""
    from wsi_ircr.progress import note

    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if not workers:
        note(f"--scheduler {scheduler}: no workers yet; tasks wait until some join")
    elif config.device == "cuda" and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
        raise UserError(f"--scheduler {scheduler}: --device cuda, but none of its {len(workers)} workers declares "
                        "a GPU; start GPU workers with 'dask worker ... --resources GPU=1'")


def connect(config: SegmentConfig, scheduler: str | None = None, cluster: str = "local",
            cluster_config: str | Path | None = None):
    """The context manager giving the client of the cluster a command asked for."""
    if scheduler and cluster != "local":
        raise UserError(f"--scheduler and --cluster {cluster}: pass one of them")
    if scheduler:
        return scheduler_client(scheduler, config)
    if cluster == "slurm":
        return slurm_client(load_slurm_config(cluster_config), config)
    if cluster_config is not None:
        raise UserError("--cluster-config is for --cluster slurm; drop it or add --cluster slurm")
    return local_client(config)


def total_threads(client) -> int:
    """Worker threads the cluster has now (0 while no worker has joined)."""
    return int(sum(client.nthreads().values()))
