"""``--cluster slurm`` against a real one-node SLURM cluster on 127.0.0.1 (``slurm_cluster``):
worker jobs submitted by dask-jobqueue, run by slurmd, released at the end; the nuclei equal
a local run's. Skipped, saying why, where SLURM cannot be installed or started."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from broken_slides import intact_and_broken
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he, write_aperio_svs

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.openslide]
TILES = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--set", "torch_threads=1", "--quiet",
         "--set", "max_unreadable_fraction=0.5"]  # c.tiff: one broken tile of 9 is 11 % of its tissue
LIVE = "PENDING,RUNNING,CONFIGURING,COMPLETING"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """(folder of a.svs, b.svs and c.tiff with one broken tile, model path)."""
    root = tmp_path_factory.mktemp("slurm-cohort")
    slides = root / "slides"
    image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    slides.mkdir()
    write_aperio_svs(slides / "a.svs", image, mpp=0.5)
    write_aperio_svs(slides / "b.svs", image[:, ::-1].copy(), mpp=0.5)
    big, _ = synthetic_he((768, 768), n_nuclei=120, seed=5, radius_px=(4, 6), tissue_fraction=0.9)
    _, broken = intact_and_broken(root / "c", big, 0.25, 1, (1, 1))
    broken.rename(slides / "c.tiff")
    return slides, signal_checkpoint(root / "m.pt", image[:256, :256])


def segment(slides: Path, model: Path, out: Path, *extra: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_ircr", "segment", str(slides), "-o", str(out), "--model",
                           str(model), *TILES, *extra], capture_output=True, text=True, timeout=timeout_s)


def slurm_config(path: Path, **settings) -> Path:
    """A ``--cluster-config`` for this machine: 1-core jobs, every socket on 127.0.0.1 (``interface: lo``)."""
    values = {"queue": "debug", "cores": 1, "memory": "2GB", "minimum_jobs": 0, "maximum_jobs": 2,
              "walltime": "'00:10:00'", "interface": "lo", "log_directory": str(path.parent / "logs"), **settings}
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def rows(out: Path) -> dict[str, dict]:
    with open(out / "cohort.csv", newline="") as f:
        return {Path(r["slide"]).name: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory) -> Path:
    slides, model = cohort
    out = tmp_path_factory.mktemp("local") / "out"
    done = segment(slides, model, out, "--set", "threads_per_worker=1")
    assert done.returncode == 0, done.stderr
    return out


def test_a_cohort_on_real_slurm_jobs_equals_a_local_run(slurm_cluster, cohort, local_run, tmp_path):
    slides, model = cohort
    before = set(slurm_cluster.queue())
    out = tmp_path / "out"
    done = segment(slides, model, out, "--cluster", "slurm", "--cluster-config", str(slurm_config(tmp_path / "slurm.yaml")))
    assert done.returncode == 0, (done.stdout, done.stderr, slurm_cluster.logs())
    assert done.stdout.startswith("3 of 3 slides done"), done.stdout
    assert "c.tiff: 1 broken tiles could not be read" in done.stderr
    table = rows(out)
    assert [table[s]["status"] for s in ("a.svs", "b.svs", "c.tiff")] == ["done"] * 3
    assert table["c.tiff"]["unreadable_regions"] == "1"
    for stem in ("a", "b", "c"):
        assert (out / stem / "nuclei.csv").read_bytes() == (local_run / stem / "nuclei.csv").read_bytes(), stem
    jobs = {j: v for j, v in slurm_cluster.queue().items() if j not in before}
    assert jobs and {name for _, name in jobs.values()} == {"dask-worker"}, jobs
    assert len(jobs) <= 2  # maximum_jobs
    assert not slurm_cluster.queue(LIVE), "worker jobs left running after the command ended"
    assert {state for j, state in slurm_cluster.finished().items() if j in jobs} <= {"CANCELLED", "COMPLETED"}
    scripts = sorted((tmp_path / "logs").glob("*.err"))
    assert scripts, "no job log"


def test_a_worker_job_cancelled_mid_cohort_changes_no_nucleus(slurm_cluster, cohort, local_run, tmp_path):
    """``scancel`` of a running worker job once the first tiles are saved: its tasks run again on
    the other job or a new one, the command ends normally and the nuclei are a local run's. The
    tile stores are on per-job scratch (``--scratch .../$SLURM_JOB_ID``, as a node's local disk):
    the job that takes over builds its own from the slide."""
    slides, model = cohort
    before = set(slurm_cluster.queue())
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    config = slurm_config(tmp_path / "slurm.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "wsi_ircr", "segment", str(slides), "-o", str(out), "--model",
                             str(model), *TILES, "--set", "batch_tiles=1", "--cluster", "slurm", "--cluster-config",
                             str(config), "--scratch", f"{scratch}/$SLURM_JOB_ID"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        running: list[int] = []
        while not (running and list(out.glob("*/work/*.pkl"))):
            assert proc.poll() is None and time.monotonic() < deadline, ("ended before a job was cancelled",
                                                                         proc.communicate())
            running = [j for j, (state, _) in slurm_cluster.queue("RUNNING").items() if j not in before]
            time.sleep(0.2)
        slurm_cluster.run("scancel", str(running[0]))
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (stdout, stderr, slurm_cluster.logs())
    assert stdout.startswith("3 of 3 slides done"), stdout
    jobs = {str(j) for j in slurm_cluster.queue() if j not in before}
    for stem in ("a", "b", "c"):
        assert (out / stem / "nuclei.csv").read_bytes() == (local_run / stem / "nuclei.csv").read_bytes(), stem
        stores = json.loads((out / stem / "summary.json").read_text())["tiles"]["scratch_stores"]
        used = {Path(s.split(":", 1)[1]).relative_to(scratch).parts[0] for s in stores}
        assert used and used <= jobs and not (out / stem / "tiles.zarr").exists(), (stem, stores, jobs)
    deadline = time.monotonic() + 30
    while running[0] not in slurm_cluster.finished() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.finished()[running[0]] == "CANCELLED"
    assert not slurm_cluster.queue(LIVE)


def test_jobs_killed_by_their_memory_limit_fail_the_slide_in_one_line(slurm_cluster, cohort, tmp_path):
    """Worker jobs of 300 MB (less than torch and the model need): slurmd kills each one; the
    command ends (no hang) with a line saying what to do, in its output and in cohort.csv."""
    slides, model = cohort
    before = set(slurm_cluster.queue())
    only_a = tmp_path / "slides"
    only_a.mkdir()
    (only_a / "a.svs").symlink_to(slides / "a.svs")
    config = slurm_config(tmp_path / "slurm.yaml", memory="300MB", maximum_jobs=1)
    done = segment(only_a, model, tmp_path / "out", "--cluster", "slurm", "--cluster-config", str(config))
    assert done.returncode == 1, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a.svs: the Dask workers running its tiles kept dying" in errors[0], done.stderr
    assert "give each worker more memory" in rows(tmp_path / "out")["a.svs"]["error"]
    jobs = {j: s for j, s in slurm_cluster.finished().items() if j not in before}
    assert jobs and set(jobs.values()) == {"FAILED"}, jobs
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.err"))
    assert "Exceeded job memory limit" in logs
    assert not slurm_cluster.queue(LIVE)


SLOW_TASKS = '''
import time

import wsi_ircr.slide.tasks as tasks

real = tasks.segment_batch


def segment_batch(*args, **kwargs):
    """The tile task, 4 s slower (so that a cohort outlasts a job's one-minute time limit)."""
    time.sleep(4)
    return real(*args, **kwargs)


tasks.segment_batch = segment_batch
'''


def test_a_job_past_its_time_limit_is_replaced_and_nothing_is_lost(slurm_cluster, cohort, local_run, tmp_path):
    """Worker jobs of one minute (``walltime``), tile tasks slowed down so the cohort outlasts
    one: SLURM ends the job (TIMEOUT), the adaptive cluster starts another, the nuclei are a
    local run's."""
    slides, model = cohort
    before = set(slurm_cluster.queue())
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_TASKS)
    config = slurm_config(tmp_path / "slurm.yaml", walltime="'00:01:00'", maximum_jobs=1,
                          setup=f"['export PYTHONPATH={slow}']")
    done = segment(slides, model, tmp_path / "out", "--set", "batch_tiles=1", "--cluster", "slurm", "--cluster-config",
                   str(config), timeout_s=900)
    assert done.returncode == 0, (done.stdout, done.stderr, slurm_cluster.logs())
    assert done.stdout.startswith("3 of 3 slides done"), done.stdout
    for stem in ("a", "b", "c"):
        assert (tmp_path / "out" / stem / "nuclei.csv").read_bytes() == (local_run / stem / "nuclei.csv").read_bytes()
    jobs = {j: s for j, s in slurm_cluster.finished().items() if j not in before}
    assert "TIMEOUT" in jobs.values() and len(jobs) >= 2, jobs
    assert not slurm_cluster.queue(LIVE)
