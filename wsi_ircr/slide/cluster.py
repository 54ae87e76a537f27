"""Where tile tasks run: one registry of cluster backends (``BACKENDS``: name -> class).

A backend says what it gives before it starts (``size() -> plan.ClusterSize``) and starts
workers for a resolved ``plan.ExecutionPlan`` (``start(plan)``, a context manager giving a
Dask client). ``open_cluster`` is the only caller: it resolves the plan from the size and
registers the ``WorkerSetup`` plugin, which fixes once per worker process how many torch
threads a task uses and, on GPU nodes with several worker processes, which GPU each sees.

Backends: ``local`` (a Dask cluster on this machine), ``scheduler`` (an existing cluster,
``--scheduler tcp://HOST:PORT``), ``slurm`` (dask-jobqueue jobs; its settings are the one
dataclass ``SlurmConfig``, from ``--cluster-config``). A new backend is a class with the
same three members (``__init__(config, option)``, ``size``, ``start``) added to ``BACKENDS``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from wsi_ircr.errors import UserError
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.plan import ClusterSize, ExecutionPlan, resolve_plan, torch_threads_per_task

# distributed always starts a scheduler's HTTP server (health and metrics routes; the dashboard
# too unless told not to), by default on port 8787 of the scheduler's own address: without the
# dashboard and on a free port of 127.0.0.1 it clashes with no other scheduler and opens nothing
# to the network.
SCHEDULER_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
CONNECT_TIMEOUT_S = 10  # how long a client tries to reach an existing scheduler (--scheduler)
SLURM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cluster" / "slurm.yaml"


@dataclass(frozen=True)
class SlurmConfig:
    """SLURM worker jobs started through dask-jobqueue (``configs/cluster/slurm.yaml``).

    queue / account / qos: partition (``-p``), account (``-A``) and quality of service
        (``--qos``); null = the site's default.
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
    qos: str | None = None
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

    @property
    def threads_per_process(self) -> int:
        """Threads (and cores) of each worker process: the job's cores shared by its processes."""
        return max(1, self.cores // self.worker_processes)


def load_slurm_config(path: str | Path | None = None, overrides=()) -> SlurmConfig:
    """The SLURM config at ``path`` (default: the packaged ``configs/cluster/slurm.yaml``)."""
    from wsi_ircr.config import resolve_config

    return resolve_config(SlurmConfig, path or SLURM_CONFIG, overrides)


class WorkerSetup(WorkerPlugin):
    """Worker plugin: torch threads per task and (with ``gpu_per_process``) the GPU of each
    worker process, fixed once when the worker starts.

    ``cores_per_process``: the cores this worker process may use (the node's cores / the
    worker processes sharing it). None (an existing cluster, whose layout this command does
    not know) = the worker's own ``--nthreads``, so a node of N processes started with
    ``dask worker --nworkers N`` (each ``cores / N`` threads, Dask's default) is never
    oversubscribed. ``torch_threads`` > 0 fixes the threads per task instead.

    ``preload``: (model path or None, model hash, plan): the worker loads that model's
    predictor in a background thread as soon as it starts (``tasks.preload_predictor``), so
    the first tile task does not wait for it while the driver plans the first slide.
    """

    name = "wsi-ircr-worker-setup"

    def __init__(self, cores_per_process: int | None = None, gpu_per_process: bool = False, torch_threads: int = 0,
                 preload: tuple | None = None):
        self.cores_per_process = cores_per_process
        self.gpu_per_process = gpu_per_process
        self.torch_threads = torch_threads
        self.preload = preload

    @classmethod
    def for_plan(cls, plan: ExecutionPlan, model=None) -> WorkerSetup:
        """The plugin of ``plan``; ``model`` (a ``pipeline.ModelInfo``): preload its predictor."""
        preload = None if model is None else (model.path, model.hash, plan)
        return cls(plan.cores_per_worker or None, plan.gpu_per_process, plan.torch_threads, preload)

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
        if self.preload is not None:
            import threading

            self._preloading = threading.Thread(target=tasks.preload_predictor, args=self.preload,
                                                name="wsi-ircr-preload", daemon=True)
            self._preloading.start()

    def teardown(self, worker) -> None:
        """Wait for the preload thread: a daemon thread still inside torch when the process
        exits is killed mid-call, and the C++ runtime aborts the process (exit status -6)."""
        preloading = getattr(self, "_preloading", None)
        if preloading is not None:
            preloading.join()


class LocalBackend:
    """A new Dask cluster on this machine (no dashboard): ``workers`` processes (0 = one
    per 4 cores; 1 = threads inside this process) of ``threads_per_worker`` threads (0 = all
    cores / workers); on CUDA each worker declares ``resources={"GPU": threads}`` (tasks ask
    for 1), so one thread's post-processing overlaps another's inference."""

    name = "local"

    def __init__(self, config: SegmentConfig, option: str | Path | None = None):
        if option is not None:
            raise UserError("--cluster-config is for --cluster slurm; drop it or add --cluster slurm")
        self.config = config

    def size(self) -> ClusterSize:
        import torch

        cores = len(os.sched_getaffinity(0))
        workers = self.config.workers or max(1, cores // 4)
        threads = self.config.threads_per_worker or max(1, cores // workers)
        return ClusterSize(self.name, workers, threads, max(1, cores // workers), torch.cuda.is_available(), local=True,
                           no_gpu="no CUDA GPU is visible to torch; use --device cpu or auto")

    @contextmanager
    def start(self, plan: ExecutionPlan):
        from distributed import Client, LocalCluster

        resources = {"GPU": plan.threads_per_worker} if plan.device == "cuda" else None
        cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker,
                               processes=plan.workers > 1, dashboard_address=None, scheduler_kwargs=SCHEDULER_HTTP,
                               resources=resources, silence_logs=logging.CRITICAL)
        with cluster, Client(cluster) as client:
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


def _workers(client) -> dict:
    return client.scheduler_info(n_workers=-1).get("workers", {})


def client_size(client, backend: str = "scheduler") -> ClusterSize:
    """What the workers of a running cluster give now (GPU: whether one declares ``GPU``;
    None while no worker has joined)."""
    workers = _workers(client)
    threads = [int(w.get("nthreads", 1)) for w in workers.values()]
    gpu = any(w.get("resources", {}).get("GPU") for w in workers.values()) if workers else None
    return ClusterSize(backend, len(workers), max(threads, default=1), None, gpu, local=False,
                       no_gpu="start GPU workers with 'dask worker ... --resources GPU=1'")


@contextmanager
def scheduler_client(address: str, device: str = "auto"):
    """A client of the existing Dask scheduler at ``address`` (a malformed or silent address:
    UserError; so is ``device: cuda`` when none of its workers declares a GPU)."""
    from distributed import Client

    from wsi_ircr.progress import note

    check_address(address)
    try:
        client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"--scheduler {address}: cannot reach a Dask scheduler there ({type(e).__name__}); "
                        "start one with 'dask scheduler' or drop --scheduler") from None
    try:
        size = client_size(client)
        if size.gpu is None:
            note(f"--scheduler {address}: no workers yet; tasks wait until some join")
        elif device == "cuda" and not size.gpu:
            raise UserError(f"--scheduler {address}: --device cuda, but none of its {size.processes} workers declares "
                            "a GPU; start GPU workers with 'dask worker ... --resources GPU=1'")
        yield client
    finally:
        client.close()


class SchedulerBackend:
    """An existing Dask cluster at ``option`` (``tcp://HOST:PORT``): sized by the workers that
    have joined when this command connects."""

    name = "scheduler"

    def __init__(self, config: SegmentConfig, option: str):
        self.config, self.address = config, option
        self._client = self._session = None

    def size(self) -> ClusterSize:
        self._session = scheduler_client(self.address, self.config.device)
        self._client = self._session.__enter__()
        return client_size(self._client)

    @contextmanager
    def start(self, plan: ExecutionPlan):
        try:
            yield self._client
        finally:
            self.close()

    def close(self) -> None:
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = self._client = None


def _jobqueue():
    """The dask_jobqueue module, or a UserError saying how to install it."""
    try:
        import dask_jobqueue
    except ImportError:
        raise UserError("--cluster slurm needs dask-jobqueue: pip install \"wsi-ircr[cluster]\"") from None
    return dask_jobqueue


def slurm_job_options(slurm: SlurmConfig) -> dict:
    """dask-jobqueue's job options for ``slurm``: GPU jobs run one worker process per GPU,
    each declaring ``resources={"GPU": its threads}``."""
    extra_args = ["--resources", f"GPU={slurm.threads_per_process}"] if slurm.gpus else []
    directives = (([f"--gres=gpu:{slurm.gpus}"] if slurm.gpus else []) + ([f"--qos={slurm.qos}"] if slurm.qos else [])
                  + list(slurm.extra_directives))
    return dict(queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=slurm.worker_processes,
                memory=slurm.memory, walltime=slurm.walltime, job_extra_directives=directives, worker_extra_args=extra_args,
                job_script_prologue=list(slurm.setup), local_directory=slurm.local_directory,
                log_directory=slurm.log_directory, interface=slurm.interface)


def slurm_cluster(slurm: SlurmConfig):
    """A dask-jobqueue ``SLURMCluster`` (not scaled yet) for ``slurm``."""
    return _jobqueue().SLURMCluster(**slurm_job_options(slurm), scheduler_options=dict(SCHEDULER_HTTP),
                                    silence_logs="error")


def slurm_job_script(slurm: SlurmConfig, scheduler: str = "tcp://SCHEDULER:PORT") -> str:
    """The job script a worker job of ``slurm`` runs, without starting a scheduler or submitting."""
    from dask_jobqueue.slurm import SLURMJob

    _jobqueue()
    return SLURMJob(scheduler=scheduler, name="dask-worker", **slurm_job_options(slurm)).job_script()


def _memory_mb(text: str) -> float | None:
    """``"32GB"`` / ``"500M"`` / ``"21694"`` (sinfo's MB) -> MB; None when unreadable."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "K": 2**-10, "M": 1, "G": 2**10, "T": 2**20}[m.group(2).upper()]


def slurm_partition_report(slurm: SlurmConfig) -> list[str]:
    """What ``sinfo`` says of the partition ``slurm`` asks for, and where the jobs would not fit
    (one line each); a line saying why when there is no SLURM here."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return ["sinfo / sbatch: not on PATH; run `wsi-ircr cluster check` on a SLURM login node"]
    done = subprocess.run(["sinfo", "-h", "-o", "%P|%a|%l|%D|%c|%m|%G"], capture_output=True, text=True, timeout=60)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return [f"sinfo: {last.removeprefix('sinfo: ')}"]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 6]
    names = [r[0].rstrip("*") for r in rows]
    wanted = slurm.queue or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    if wanted not in names:
        return [f"partition {slurm.queue or '(default)'}: not found; sinfo lists {', '.join(names) or 'none'}: "
                "set queue in the SLURM config"]
    _, avail, limit, nodes, cpus, memory, gres = rows[names.index(wanted)]
    name = wanted
    lines = [f"partition {name}: {avail}, time limit {limit}, {nodes} nodes of {cpus} CPUs, {memory} MB, gres {gres}"]
    if avail != "up":
        lines.append(f"warning: partition {name} is {avail}: jobs will wait")
    if cpus.isdigit() and slurm.cores > int(cpus):
        lines.append(f"warning: cores {slurm.cores} > the {cpus} CPUs of a node: jobs never start; lower cores")
    need, have = _memory_mb(slurm.memory), _memory_mb(memory.rstrip("+"))
    if need and have and need > have:
        lines.append(f"warning: memory {slurm.memory} > the {memory} MB of a node: jobs never start; lower memory")
    if slurm.gpus and "gpu" not in gres:
        lines.append(f"warning: gpus {slurm.gpus} but the nodes of {name} list no GPU (gres {gres}); choose a GPU partition")
    return lines


class SlurmBackend:
    """SLURM worker jobs through dask-jobqueue, scaling between ``minimum_jobs`` and
    ``maximum_jobs``; its settings: ``SlurmConfig`` at ``option`` (default: the packaged
    ``configs/cluster/slurm.yaml``)."""

    name = "slurm"

    def __init__(self, config: SegmentConfig, option: str | Path | None = None):
        self.slurm = load_slurm_config(option)

    def size(self) -> ClusterSize:
        slurm = self.slurm
        threads = slurm.threads_per_process
        return ClusterSize(self.name, slurm.maximum_jobs * slurm.worker_processes, threads, threads, slurm.gpus > 0, local=False,
                           gpu_per_process=slurm.gpus > 0,
                           no_gpu="set gpus: 1 (or more) in the SLURM config (--cluster-config)")

    @contextmanager
    def start(self, plan: ExecutionPlan):
        from distributed import Client

        cluster = slurm_cluster(self.slurm)
        try:
            cluster.adapt(minimum_jobs=self.slurm.minimum_jobs, maximum_jobs=self.slurm.maximum_jobs)
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()


BACKENDS = {"local": LocalBackend, "scheduler": SchedulerBackend, "slurm": SlurmBackend}
CLUSTERS = tuple(name for name in BACKENDS if name != "scheduler")  # what --cluster starts


def backend_for(config: SegmentConfig, scheduler: str | None = None, cluster: str = "local",
                cluster_config: str | Path | None = None):
    """The backend a command asked for: ``--scheduler ADDRESS`` or ``--cluster NAME [--cluster-config FILE]``."""
    if scheduler and cluster != "local":
        raise UserError(f"--scheduler and --cluster {cluster}: pass one of them")
    if scheduler:
        return SchedulerBackend(config, scheduler)
    if cluster not in CLUSTERS:
        raise UserError(f"--cluster {cluster}: expected one of {', '.join(CLUSTERS)}")
    return BACKENDS[cluster](config, cluster_config)


@contextmanager
def open_cluster(config: SegmentConfig, backend=None, checkpoint=None, preload: bool = False):
    """``(client, plan)``: the plan resolved from ``config`` and what ``backend`` (default: a
    local cluster) gives, then its workers started with the ``WorkerSetup`` plugin.
    ``checkpoint``: the loaded model, a ``pipeline.ModelInfo`` (its metadata may decide the
    precision); ``preload``: every worker loads its predictor as soon as it starts."""
    backend = backend or LocalBackend(config)
    size = backend.size()
    try:
        plan = resolve_plan(config, size, checkpoint)
    except BaseException:
        getattr(backend, "close", lambda: None)()  # a backend that connected in size()
        raise
    with backend.start(plan) as client:
        client.register_plugin(WorkerSetup.for_plan(plan, checkpoint if preload else None), name=WorkerSetup.name)
        yield client, plan


@contextmanager
def local_client(config: SegmentConfig):
    """A client of a new local cluster for ``config`` (``LocalBackend``)."""
    with open_cluster(config) as (client, _):
        yield client
