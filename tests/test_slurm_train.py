"""``wsi-ircr train --scheduler`` on a worker started as a real SLURM job (``slurm_cluster``):
the job is cancelled mid-run, a new worker job joins, and the run resumes from last.pt."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_dask import dask_cli, free_port, stop, wait_until
from test_train import SMALL, _history_steps, write_tiles

from wsi_ircr.model.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LOG_STEPS = '''
import os
import time


def dask_setup(worker):
    """Log the step every ``train_step`` starts at (and slow steps down, so a cancel lands mid-run)."""
    from wsi_ircr.train.loop import Trainer

    real = Trainer.train_step

    def step(self):
        with open(os.environ["STEP_LOG"], "a") as f:
            f.write(f"{self.step} ")
        time.sleep(0.5)
        return real(self)

    Trainer.train_step = step
'''


def submit_worker(cluster, address: str, preload: Path, log: Path, steps_log: Path) -> int:
    """A dask worker as a SLURM job (1 core, 2 GB); its job id."""
    command = (f"STEP_LOG={steps_log} {sys.executable} -m distributed.cli.dask_worker {address} --nthreads 1 "
               f"--host 127.0.0.1 --no-dashboard --preload {preload}")
    out = cluster.run("sbatch", "--parsable", "-J", "train-worker", "-c", "1", "--mem=2G", "-o", str(log), "--wrap", command)
    return int(out.strip().split(";")[0])


def test_train_on_a_slurm_worker_resumes_after_its_job_is_cancelled(slurm_cluster, tmp_path):
    images, labels = write_tiles(tmp_path / "lab", [f"t{i}" for i in range(4)])
    preload, steps1, steps2 = tmp_path / "log_steps.py", tmp_path / "steps1.log", tmp_path / "steps2.log"
    preload.write_text(LOG_STEPS)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    out = tmp_path / "run"
    train = None
    try:
        first = submit_worker(slurm_cluster, address, preload, tmp_path / "worker1.log", steps1)
        train = subprocess.Popen([sys.executable, "-m", "wsi_ircr", "train", "--images", str(images), "--labels",
                                  str(labels), "--out", str(out), "--steps", "10", *SMALL, "--set", "data.val=[t3]",
                                  "--set", "tune_postprocess=false", "--scheduler", address],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        wait_until(lambda: (out / "last.pt").exists() and len(steps1.read_text().split()) >= 4, train, "a checkpoint", poll_s=0.2)
        slurm_cluster.run("scancel", str(first))
        submit_worker(slurm_cluster, address, preload, tmp_path / "worker2.log", steps2)
        stdout, stderr = train.communicate(timeout=300)
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        stop([scheduler])
    assert train.returncode == 0, (stdout, stderr)
    before, after = ([int(s) for s in path.read_text().split()] for path in (steps1, steps2))
    assert before == list(range(len(before))) and len(before) < 10, before  # the first job, cancelled mid-run
    assert after and after[0] % 2 == 0 and after[0] <= len(before), (before, after)  # the last checkpoint...
    assert after == list(range(after[0], 10)), after  # ...on which the second job went on
    assert load_checkpoint(out / "last.pt").train_state["step"] == 10 and _history_steps(out / "model.pt") == [2, 4, 6, 8, 10]
    deadline = time.monotonic() + 30
    while first not in slurm_cluster.finished() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.finished()[first] == "CANCELLED"
