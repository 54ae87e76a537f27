"""``wsi-ircr cluster check``: the SLURM config, plan, partition and job script, nothing submitted."""

from __future__ import annotations

import os

import pytest
from cli_run import run_main

GPU_CONFIG = """queue: gpu
account: lab
qos: high
cores: 16
memory: 64GB
gpus: 2
walltime: "08:00:00"
maximum_jobs: 8
setup: ["module load cuda/12.4", "source ~/wsi/.venv/bin/activate"]
extra_directives: ["--constraint=a100"]
local_directory: /scratch/$USER
"""


def check(capsys, *args: str) -> tuple[int, str, str]:
    return run_main(["cluster", "check", *args], capsys)


def test_the_job_script_of_a_gpu_partition_is_printed_and_nothing_submitted(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "sinfo"):  # stand-ins that record any call
        (bin_dir / name).write_text(f"#!/bin/sh\necho called >> {tmp_path}/{name}.calls\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "gpu.yaml"
    config.write_text(GPU_CONFIG)
    code, out, err = check(capsys, "--cluster-config", str(config), "--set", "maximum_jobs=4")
    assert code == 0, err
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --qos=high", "#SBATCH --gres=gpu:2",
                 "#SBATCH --cpus-per-task=16", "#SBATCH -t 08:00:00", "#SBATCH --constraint=a100",
                 "module load cuda/12.4", "source ~/wsi/.venv/bin/activate"):
        assert line in out.splitlines(), line
    assert "--nworkers 2" in out and "--resources GPU=8" in out and "--local-directory /scratch/$USER" in out
    assert "# plan: 0 to 4 jobs as tiles wait, each 2 worker process(es) of 8 threads, one GPU each" in out
    assert "qos: high" in out
    assert not (tmp_path / "sbatch.calls").exists()  # nothing submitted


def test_a_bad_slurm_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("cores: 0\n")
    code, out, err = check(capsys, "--cluster-config", str(config))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.yaml" in err and "cores" in err, err


@pytest.mark.slow
@pytest.mark.distributed
def test_the_partition_is_read_from_a_real_slurm(slurm_cluster, tmp_path, capsys):
    config = tmp_path / "slurm.yaml"
    config.write_text(f"queue: debug\ncores: 64\nmemory: 2TB\ngpus: 1\nlog_directory: {tmp_path}\n")
    code, out, err = check(capsys, "--cluster-config", str(config))
    assert code == 0, err
    assert f"# partition debug: up, time limit infinite, 1 nodes of {slurm_cluster.cpus} CPUs" in out
    assert "# warning: cores 64 >" in out and "# warning: memory 2TB >" in out and "# warning: gpus 1 but" in out
    config.write_text("queue: nope\n")
    assert "# partition nope: not found; sinfo lists debug" in check(capsys, "--cluster-config", str(config))[1]
