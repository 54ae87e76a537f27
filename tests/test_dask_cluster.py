"""The same slide on the default local cluster and on a real ``dask scheduler`` + ``dask worker``
started here on 127.0.0.1 gives the same nuclei."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he, write_pyramidal_tiff

pytestmark = [pytest.mark.distributed, pytest.mark.openslide]
TILES = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster():
    dask_cli = Path(sys.executable).parent / "dask"
    if not dask_cli.exists() and shutil.which("dask") is None:
        pytest.skip("the dask command-line tool is not installed")
    dask_cli = str(dask_cli if dask_cli.exists() else shutil.which("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(1.0)
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_remote_cluster_matches_local(cluster, tmp_path):
    image, _ = synthetic_he((360, 420), n_nuclei=40, seed=5)
    model = signal_checkpoint(tmp_path / "random.pt", image)
    slide = write_pyramidal_tiff(tmp_path / "s.tiff", image, mpp=0.5, n_levels=2, compression="deflate")
    results = {}
    # one task at a time with all cores for torch on both sides: the same arithmetic
    for name, extra in (("local", ["--set", "threads_per_worker=1"]), ("remote", ["--scheduler", cluster])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(slide), "-o", str(out), "--model", str(model), "--quiet",
               *TILES, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with gzip.open(out / "s" / "s.geojson.gz", "rt") as f:
            results[name] = json.load(f)["features"]
        summary = json.loads((out / "s" / "summary.json").read_text())
        workers = [k for k in summary["peak_rss_mb"] if k.startswith("worker")]
        assert workers and (name == "local" or all("127.0.0.1" in w for w in workers))
    assert len(results["local"]) > 10
    assert results["local"] == results["remote"]


def test_unreachable_scheduler_is_one_line(tmp_path):
    image = np.full((300, 300, 3), 240, np.uint8)
    slide = write_pyramidal_tiff(tmp_path / "s.tiff", image, mpp=0.25, n_levels=1)
    cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(slide), "-o", str(tmp_path / "o"),
           "--scheduler", f"tcp://127.0.0.1:{_free_port()}", *TILES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
