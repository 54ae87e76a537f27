"""``--cluster slurm`` end to end on this machine: stand-in ``sbatch`` / ``scancel`` commands
run dask-jobqueue's job scripts as local processes (no SLURM here), talking over 127.0.0.1."""

from __future__ import annotations

import csv
import os
import signal
import sys

import pytest
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he, write_aperio_svs

from wsi_ircr.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.openslide, pytest.mark.slow]

SBATCH = """#!/usr/bin/env bash
# stand-in for sbatch: run the job script as a local process group; print SLURM's reply
set -e
copy="{jobs}/job.$RANDOM$RANDOM.sh"
cp "$1" "$copy"
setsid bash "$copy" > "$copy.log" 2>&1 < /dev/null &
echo "$!" >> "{jobs}/pids"
echo "Submitted batch job $!"
"""
SCANCEL = """#!/usr/bin/env bash
for job in "$@"; do kill -TERM -- "-$job" 2>/dev/null || true; done
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", SBATCH.format(jobs=jobs)), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield jobs
    pids = (jobs / "pids").read_text().split() if (jobs / "pids").exists() else []
    for pid in pids:  # whatever the cluster did not cancel
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_cohort_on_slurm_jobs_started_and_released_by_the_cluster(fake_slurm, tmp_path, capfd):
    image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_svs(slides / "a.svs", image, mpp=0.5)
    write_aperio_svs(slides / "b.svs", image[:, ::-1].copy(), mpp=0.5)
    model = signal_checkpoint(tmp_path / "m.pt", image[:256, :256])
    config = tmp_path / "slurm.yaml"
    config.write_text("cores: 1\nmemory: 2GB\nminimum_jobs: 0\nmaximum_jobs: 2\nwalltime: '00:10:00'\ninterface: lo\n"
                      f"log_directory: {tmp_path / 'logs'}\n")
    try:
        main(["segment", str(slides), "-o", str(tmp_path / "out"), "--model", str(model), "--cluster", "slurm",
              "--cluster-config", str(config), "--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8",
              "--quiet"])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    assert code == 0, err
    assert out.startswith("2 of 2 slides done"), (out, err)
    with open(tmp_path / "out" / "cohort.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done", "done"]
    scripts = list(fake_slurm.glob("job.*.sh"))
    assert scripts, "no job was submitted"
    text = scripts[0].read_text()
    assert "#SBATCH --cpus-per-task=1" in text and "dask_worker tcp://127.0.0.1:" in text and sys.executable in text
