"""Faults with real processes on 127.0.0.1: a worker SIGKILLed mid-cohort, the driver
SIGKILLed mid-cohort, and a corrupt slide in the cohort."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from local_dask import dask_processes, wait_until
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he, write_aperio_svs, write_pyramidal_tiff

pytestmark = [pytest.mark.distributed, pytest.mark.openslide, pytest.mark.slow]
# batch_tiles=1 and one task in flight per worker thread: the cohort lasts long enough to be hit
OPTIONS = ["--core-px", "256", "--halo", "32", "--no-tissue-mask", "--set", "max_nucleus_um=8", "--set", "batch_tiles=1",
           "--set", "torch_threads=1", "--quiet"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """(folder of slides a.svs, b.tiff, c.tiff and corrupt d.svs, model path)."""
    root = tmp_path_factory.mktemp("faults")
    slides = root / "slides"
    slides.mkdir()
    a, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    write_aperio_svs(slides / "a.svs", a, mpp=0.5)
    for name, seed in (("b", 4), ("c", 6)):
        image, _ = synthetic_he((400, 480), n_nuclei=60, seed=seed, radius_px=(4, 6))
        write_pyramidal_tiff(slides / f"{name}.tiff", image, mpp=0.25, n_levels=2)
    (slides / "d.svs").write_bytes((slides / "a.svs").read_bytes()[:4000])
    model = signal_checkpoint(root / "m.pt", a[:256, :256])
    return slides, model


def _segment(slides: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wsi_ircr", "segment", str(slides), "-o", str(out), "--model",
                             str(model), *OPTIONS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(out: Path) -> dict[str, str]:
    with open(out / "cohort.csv", newline="") as f:
        return {Path(r["slide"]).name: r["status"] for r in csv.DictReader(f)}


def _nuclei(out: Path, stem: str) -> bytes:
    return gzip.decompress((out / stem / f"{stem}.geojson.gz").read_bytes())


EXPECTED = {"a.svs": "done", "b.tiff": "done", "c.tiff": "done", "d.svs": "failed"}


def test_worker_killed_mid_cohort_gives_the_clean_result(cohort, tmp_path):
    """SIGKILL one of two worker processes once tiles are being saved: its tasks run again
    elsewhere; the nuclei (ids and geometry) equal those of a clean run; d.svs fails alone."""
    from distributed import Client

    slides, model = cohort
    with dask_processes(tmp_path, n_workers=2) as address:
        clean = _segment(slides, model, tmp_path / "clean", "--scheduler", address)
        assert clean.wait(timeout=600) == 1, clean.communicate()
        killed = _segment(slides, model, tmp_path / "killed", "--scheduler", address)
        wait_until(lambda: list((tmp_path / "killed").glob("*/work/*.pkl")), killed, "a tile was saved")
        with Client(address, timeout="10s") as client:
            pid = next(iter(client.run(os.getpid).values()))
        os.kill(pid, signal.SIGKILL)
        finished_before = [p.parent.name for p in (tmp_path / "killed").glob("*/summary.json")]
        out, err = killed.communicate(timeout=600)
    assert killed.returncode == 1, err
    assert len(finished_before) < 3, "every slide had finished before the kill"
    assert out.startswith("3 of 4 slides done, 1 failed")
    assert _rows(tmp_path / "killed") == EXPECTED
    for stem in ("a", "b", "c"):
        assert _nuclei(tmp_path / "killed", stem) == _nuclei(tmp_path / "clean", stem), stem


def test_driver_killed_mid_cohort_resumes_with_the_same_command(cohort, tmp_path):
    """SIGKILL the driver once a.svs is finished and b has saved tiles: the same command
    skips a.svs (untouched), reuses b's saved tiles, and gives a clean run's nuclei."""
    slides, model = cohort
    out = tmp_path / "out"
    args = ["--set", "tasks_in_flight=1", "--set", "threads_per_worker=1"]
    driver = _segment(slides, model, out, *args)
    wait_until(lambda: (out / "a" / "summary.json").exists() and list((out / "b" / "work").glob("*.pkl")), driver,
                "a.svs finished and b.tiff started")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "b" / "summary.json").exists()
    a_summary = (out / "a" / "summary.json").stat().st_mtime_ns
    saved_b = len(list((out / "b" / "work").glob("*.pkl")))
    again = _segment(slides, model, out, *args)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 1, stderr
    assert stdout.startswith("3 of 4 slides done, 1 already finished, 1 failed"), stdout
    assert (out / "a" / "summary.json").stat().st_mtime_ns == a_summary
    summary_b = __import__("json").loads((out / "b" / "summary.json").read_text())
    assert summary_b["resumed"] is True and summary_b["tiles"]["reused_results"] >= saved_b >= 1
    assert _rows(out) == EXPECTED
    fresh = tmp_path / "fresh"
    shutil.copytree(slides, tmp_path / "slides_copy")
    clean = _segment(tmp_path / "slides_copy", model, fresh, *args)
    clean.communicate(timeout=600)
    for stem in ("a", "b", "c"):
        assert _nuclei(out, stem) == _nuclei(fresh, stem), stem
