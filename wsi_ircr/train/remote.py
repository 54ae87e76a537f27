"""``wsi-ircr train --scheduler``: the whole training run as one task on a Dask cluster's worker.

The task asks for the GPU resource that GPU workers declare (``dask worker ... --resources
GPU=1``, as for ``segment``); with ``device: cpu`` it asks for none and runs on any worker.
Progress lines reach this command (and the worker's log); checkpoints go to the run folder,
which must be on a filesystem the worker shares. When a
worker is lost, Dask runs the task again elsewhere and it continues from the folder's
last.pt; when the client goes away the task stops after its current step, saving last.pt,
and ``--resume`` continues it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from wsi_ircr.train.config import TrainConfig

GPU = "GPU"  # the resource name GPU workers declare (see wsi_ircr.slide.cluster)


def task_resources(device: str, workers: dict) -> dict | None:
    """Resources the training task asks for: one GPU for ``cuda``, and for ``auto`` when some
    worker declares a GPU; None (any worker) for ``cpu`` or an ``auto`` cluster without GPUs.

    Args:
        device: ``TrainConfig.device``.
        workers: ``client.scheduler_info()["workers"]`` (address -> info with ``resources``).
    """
    if device == "cpu":
        return None
    if device == "cuda" or any(w.get("resources", {}).get(GPU) for w in workers.values()):
        return {GPU: 1}
    return None


def _released(key: str) -> Callable[[], bool]:
    """On a worker: a callable telling whether the scheduler no longer wants task ``key``."""
    from distributed import get_worker

    worker = get_worker()

    def released() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    return released


def _say_to_client(key: str) -> Callable[[str], None]:
    """On a worker: progress lines go to the worker's stderr and, as events of topic ``key``, to
    the client that submitted task ``key``."""
    from distributed import get_worker

    from wsi_ircr.train.loop import say_on_stderr

    worker = get_worker()

    def say(line: str) -> None:
        say_on_stderr(line)
        worker.log_event(key, line)

    return say


def train_task(cfg: TrainConfig, out_dir: str, base_dir: str, resume: bool, key: str | None = None) -> dict:
    """Run on a worker: ``loop.train`` into ``out_dir``. A last.pt there that the client did
    not ask to resume was written by an earlier attempt of this task (a lost worker): it is
    resumed. With ``key`` (the task's own), progress also goes to the client and the run stops
    once the scheduler releases the task."""
    from wsi_ircr.train.loop import say_on_stderr, train

    out = Path(out_dir)
    stop, say = (_released(key), _say_to_client(key)) if key else (None, say_on_stderr)
    return train(cfg, out, base_dir=Path(base_dir), resume=resume or (out / "last.pt").exists(), stop=stop, say=say)


def train_on_cluster(address: str, cfg: TrainConfig, out_dir: Path, base_dir: Path, *, resume: bool,
                     echo: Callable[[str], None] = lambda line: None) -> dict:
    """Submit the run to the scheduler at ``address`` and wait for its summary (``loop.train``).

    An address that does not answer, or ``device: cuda`` with no GPU worker: UserError.
    """
    from wsi_ircr.slide.cluster import scheduler_client

    with scheduler_client(address, cfg.device) as client:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        resources = task_resources(cfg.device, workers)
        key = f"wsi-ircr-train-{uuid.uuid4().hex[:12]}"
        client.subscribe_topic(key, lambda event: echo(event[1]))
        future = client.submit(train_task, cfg, str(Path(out_dir).absolute()), str(Path(base_dir).absolute()), resume,
                               key, key=key, pure=False, resources=resources)
        where = "a worker with a GPU" if resources else "any worker"
        echo(f"training on {address} ({where}); checkpoints in {out_dir}")
        return future.result()
