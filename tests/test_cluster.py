"""Clusters: the SLURM job script dask-jobqueue generates, and torch threads per worker."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from wsi_ircr.cli import main
from wsi_ircr.errors import UserError
from wsi_ircr.slide import tasks
from wsi_ircr.slide.cluster import SLURM_CONFIG, WorkerSetup, load_slurm_config, local_client, slurm_cluster
from wsi_ircr.slide.config import SegmentConfig


def test_slurm_job_script_carries_the_config(tmp_path):
    pytest.importorskip("dask_jobqueue")
    path = tmp_path / "gpu.yaml"
    path.write_text("queue: gpu\naccount: lab\ncores: 16\nmemory: 64GB\ngpus: 2\nwalltime: '02:00:00'\n"
                    "setup: ['module load cuda/12.4', 'source /opt/wsi/.venv/bin/activate']\n"
                    "extra_directives: ['--constraint=a100']\n")
    cluster = slurm_cluster(load_slurm_config(path))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    for directive in ("-p gpu", "-A lab", "--cpus-per-task=16", "-t 02:00:00", "--gres=gpu:2", "--constraint=a100"):
        assert f"#SBATCH {directive}" in lines, (directive, script)
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/wsi/.venv/bin/activate")
    worker = next(line for line in lines if "dask_worker" in line)
    # one worker process per GPU, each with half the cores and one GPU unit per thread
    assert "--nworkers 2" in worker and "--nthreads 8" in worker and "--resources GPU=8" in worker


def test_shipped_slurm_config_loads_and_bad_keys_are_one_line(tmp_path):
    assert SLURM_CONFIG.is_file() and "wsi_ircr" in SLURM_CONFIG.parts  # installed with the package
    assert load_slurm_config().maximum_jobs >= load_slurm_config().minimum_jobs
    bad = tmp_path / "slurm.yaml"
    bad.write_text("queue: gpu\npartition: gpu\n")
    with pytest.raises(UserError, match=r"slurm.yaml: unknown key 'partition'; allowed keys: .*queue"):
        load_slurm_config(bad)
    bad.write_text("cores: 2\ngpus: 4\n")
    with pytest.raises(UserError, match="cores"):
        load_slurm_config(bad)


def test_cli_slurm_errors_are_one_line(tmp_path, capfd, monkeypatch):
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    bad = tmp_path / "slurm.yaml"
    bad.write_text("queues: gpu\n")
    monkeypatch.setitem(__import__("sys").modules, "dask_jobqueue", None)  # not installed
    for extra, words in [(["--cluster-config", str(bad)], "unknown key 'queues'"), ([], 'pip install "wsi-ircr[cluster]"')]:
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", str(slide), "-o", str(tmp_path / "out"), "--cluster", "slurm", *extra])
        err = capfd.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def _torch_threads() -> int:
    return tasks.cpu_threads()


def test_worker_processes_sharing_a_machine_do_not_oversubscribe():
    """Two worker processes of one thread each on this machine: each task's torch threads
    times the tasks that may run at once stay within the cores (before the plugin, every
    process took all cores)."""
    cores = len(os.sched_getaffinity(0))
    with local_client(SegmentConfig(workers=2, threads_per_worker=1)) as client:
        client.wait_for_workers(2)
        threads = client.run(_torch_threads)
        nthreads = client.nthreads()
    assert len(threads) == 2
    assert sum(threads[w] * nthreads[w] for w in threads) <= max(cores, 2)
    assert all(t == max(1, cores // 2) for t in threads.values())


def test_worker_setup_pins_one_gpu_per_process_and_fixed_threads(monkeypatch):
    monkeypatch.setattr(tasks, "TORCH_THREADS", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    worker = SimpleNamespace(name="SLURMCluster-3-1", state=SimpleNamespace(nthreads=4))
    WorkerSetup(cores_per_process=8, gpu_per_process=True).setup(worker)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5" and tasks.TORCH_THREADS == 2
    WorkerSetup(torch_threads=3).setup(worker)
    assert tasks.TORCH_THREADS == 3
    WorkerSetup().setup(SimpleNamespace(name="w", state=SimpleNamespace(nthreads=6)))
    assert tasks.TORCH_THREADS == 1  # an existing cluster: its --nthreads are the process's cores


def test_pipeline_recipes_are_valid_and_import_nothing_private():
    import re
    import subprocess
    from pathlib import Path

    pipelines = Path(__file__).resolve().parents[1] / "pipelines"
    assert load_slurm_config(pipelines / "slurm_gpu.yaml").worker_processes == 2
    assert subprocess.run(["bash", "-n", str(pipelines / "slurm_cohort.sh")]).returncode == 0
    for path in pipelines.glob("*.py"):
        private = re.findall(r"^\s*(?:from wsi_ircr[\w.]* import .*\b_\w+|import wsi_ircr[\w.]*\._\w+)", path.read_text(),
                             re.MULTILINE)
        assert not private, (path.name, private)


def test_segment_with_a_malformed_scheduler_address_is_one_line(tmp_path, capfd):
    slide = Path(__file__).resolve().parents[1] / "examples" / "cmu-1-small-region.svs"
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(slide), "-o", str(tmp_path / "out"), "--scheduler", "head"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "--scheduler head: not a scheduler address" in err and "tcp://HOST:PORT" in err, err
