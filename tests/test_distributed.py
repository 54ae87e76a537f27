"""``wsi-ircr segment --scheduler``: a real ``dask scheduler`` + ``dask worker`` started here
on 127.0.0.1 (worker in another working folder) gives the same nuclei as the default local
cluster, and concurrent runs sharing that cluster do not mix up their tasks."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from local_dask import dask_processes, free_port
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he, write_pyramidal_tiff

from wsi_ircr.cli import main
from wsi_ircr.slide import cluster

pytestmark = [pytest.mark.distributed, pytest.mark.openslide]
TILES = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--quiet"]


class Scheduler(str):
    """A scheduler address (``str``) that also knows its worker's working folder."""

    def __new__(cls, address: str, cwd: Path):
        self = super().__new__(cls, address)
        self.cwd = cwd
        return self


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Scheduler:
    """Address of a scheduler with one single-threaded worker whose working folder is not
    the test's (relative paths shipped to it would point elsewhere)."""
    elsewhere = tmp_path_factory.mktemp("worker_cwd")
    with dask_processes(elsewhere) as address:
        yield Scheduler(address, elsewhere)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding s.tiff (pyramidal TIFF, 0.5 mpp) and m.pt (an untrained checkpoint)."""
    root = tmp_path_factory.mktemp("job")
    image, _ = synthetic_he((260, 300), n_nuclei=30, seed=5, radius_px=(4, 6))
    write_pyramidal_tiff(root / "s.tiff", image, mpp=0.5, n_levels=2, compression="deflate")
    signal_checkpoint(root / "m.pt", image[:256, :256])
    return root


def _features(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["features"]


def _segment(*args: str) -> None:
    try:
        main(["segment", *map(str, args)])
    except SystemExit as e:
        assert e.code in (0, None), f"exit {e.code}"


def test_remote_cluster_matches_local_with_relative_paths(scheduler, workdir, monkeypatch, capfd):
    """Relative slide, model and output paths work on a worker that runs in another folder,
    and the features (uuid5 ids and coordinates) equal those of the local cluster."""
    monkeypatch.chdir(workdir)
    # the same torch threads per task on both sides: the same arithmetic
    _segment("s.tiff", "-o", "local", "--model", "m.pt", *TILES, "--set", "torch_threads=1")
    _segment("s.tiff", "-o", "remote", "--model", "m.pt", *TILES, "--set", "torch_threads=1", "--scheduler", scheduler)
    capfd.readouterr()
    local, remote = _features(Path("local/s/s.geojson.gz")), _features(Path("remote/s/s.geojson.gz"))
    assert len(local) > 10
    assert [f["id"] for f in local] == [f["id"] for f in remote]
    assert [f["geometry"] for f in local] == [f["geometry"] for f in remote]
    summary = json.loads(Path("remote/s/summary.json").read_text())
    assert summary["peak_rss_mb"]["workers"] > 50 and summary["peak_rss_mb"]["driver"] > 50
    assert not any(Path(scheduler.cwd).iterdir()), "the worker wrote into its own working folder"


def test_concurrent_runs_on_one_cluster_keep_their_own_results(scheduler, workdir, tmp_path):
    """Two commands at once on one cluster: the same slide into two folders with two tile
    sizes. Each run gets its own tiles (task keys must not collide)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_ircr.slide.cluster import scheduler_client
    from wsi_ircr.slide.cohort import segment_slides
    from wsi_ircr.slide.config import SegmentConfig
    from wsi_ircr.slide.pipeline import model_info

    configs = [SegmentConfig(model=str(workdir / "m.pt"), core_px=core, halo_px=32, max_nucleus_um=8)
               for core in (256, 384)]
    info = model_info(configs[0])
    slide = workdir / "s.tiff"
    with scheduler_client(scheduler, configs[0].device) as client, ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(
            lambda config: segment_slides([slide], tmp_path / str(config.core_px), config, client, info), configs))
    summaries = [report.summaries[slide] for report in reports]
    for core_px, summary in zip([256, 384], summaries):
        out = Path(summary["out_dir"])
        assert summary["tiles"]["core_px"] == core_px
        n_rows = len((out / "nuclei.csv").read_text().splitlines()) - 1
        assert summary["nuclei"] == len(_features(out / "s.geojson.gz")) == n_rows > 10


def test_unreachable_scheduler_is_one_line(workdir, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)  # the client gives up after its connect timeout
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(workdir / "s.tiff"), "-o", str(tmp_path), "--model", str(workdir / "m.pt"), *TILES,
              "--scheduler", f"tcp://127.0.0.1:{free_port()}"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: --scheduler") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_model_file_replaced_between_runs_is_reloaded(scheduler, workdir, tmp_path, capfd):
    """A model file replaced between runs (same path, new weights) is not served from the
    worker's cache of the old one: the second run's nuclei differ from the first's."""
    from wsi_ircr.model.checkpoint import file_hash

    model = tmp_path / "m.pt"
    shutil.copy(workdir / "m.pt", model)
    _segment(workdir / "s.tiff", "-o", tmp_path / "first", "--model", model, *TILES, "--scheduler", scheduler)
    image, _ = synthetic_he((256, 256), n_nuclei=20, seed=11)
    signal_checkpoint(model, image, seed=3)
    _segment(workdir / "s.tiff", "-o", tmp_path / "second", "--model", model, *TILES, "--scheduler", scheduler)
    capfd.readouterr()
    first, second = (_features(tmp_path / k / "s" / "s.geojson.gz") for k in ("first", "second"))
    assert len(second) > 10
    assert [f["geometry"] for f in second] != [f["geometry"] for f in first]
    summary = json.loads((tmp_path / "second" / "s" / "summary.json").read_text())
    assert summary["model"]["hash"] == file_hash(model)


def test_cuda_on_a_cluster_without_gpu_workers_is_refused(scheduler, workdir, tmp_path, capfd):
    """Tasks that need a GPU resource no worker has would wait forever: refused at once."""
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(workdir / "s.tiff"), "-o", str(tmp_path), "--model", str(workdir / "m.pt"), *TILES,
              "--device", "cuda", "--scheduler", scheduler])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--resources GPU=1" in err, err
    assert not any(tmp_path.iterdir())
