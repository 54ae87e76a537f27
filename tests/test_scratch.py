"""Tile stores on node-local scratch (``scratch_dir`` / ``--scratch``): a cache each worker
keeps for itself, recreated from the slide where it is missing, removed when the slide ends;
the nuclei are those of a run with the store in the output folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from broken_slides import intact_and_broken
from cli_run import run_cli, run_main
from model_fixtures import signal_checkpoint
from synthetic_slides import synthetic_he

from wsi_ircr.errors import UserError
from wsi_ircr.slide.cohort import segment_slides
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.grid import TileGrid
from wsi_ircr.slide.pipeline import model_info
from wsi_ircr.slide.run_folder import RunFolder
from wsi_ircr.slide.scratch import SCRATCH_SUBDIR, expand_scratch, open_scratch_store, prepare_store, scratch_template

pytestmark = pytest.mark.openslide
# 1-thread torch fp32 tasks, 1-tile batches (tasks spread over workers); the broken tile is a quarter of c's tissue
SMALL = {"core_px": 256, "halo_px": 32, "max_nucleus_um": 8.0, "threads_per_worker": 1, "torch_threads": 1,
         "batch_tiles": 1, "max_unreadable_fraction": 0.5, "engine": "torch", "precision": "fp32"}
BOX = (256, 256, 256, 256)  # level-0 x, y, w, h of c.tiff's broken tile


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[list[Path], Path]:
    """([c.tiff: 2 x 2 tiles, level-0 tile (1, 1) broken, 2 levels: only the tile reads meet it], model)."""
    root = tmp_path_factory.mktemp("scratch-cohort")
    image, _ = synthetic_he((512, 512), n_nuclei=60, seed=5, radius_px=(4, 6), tissue_fraction=0.9)
    _, broken = intact_and_broken(root / "c", image, 0.25, 2, (1, 1))
    return [broken.rename(root / "c.tiff")], signal_checkpoint(root / "m.pt", image[:256, :256])


def config(model: Path, **changes) -> SegmentConfig:
    return SegmentConfig(**SMALL, model=str(model), **changes)


def left_in(scratch: Path) -> list[Path]:
    """What a run left under ``scratch`` (the folder itself may stay)."""
    return sorted(scratch.rglob("*")) if scratch.exists() else []


def assert_same_nuclei(out: Path, reference: Path) -> None:
    for stem in ("c",):
        assert (out / stem / "nuclei.csv").read_bytes() == (reference / stem / "nuclei.csv").read_bytes(), stem
        mine, theirs = (json.loads((o / stem / "summary.json").read_text()) for o in (out, reference))
        assert mine["nuclei"] == theirs["nuclei"] and mine["unreadable"] == theirs["unreadable"], stem


def test_unusable_scratch_folders_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WSI_IRCR_NO_SUCH_VAR", raising=False)
    afile = tmp_path / "file"
    afile.write_text("")
    for scratch, words in [("$WSI_IRCR_NO_SUCH_VAR/x", "$WSI_IRCR_NO_SUCH_VAR is not set there"),
                           ("scratch", "not an absolute path"), (f"{afile}/sub", "cannot create the folder")]:
        with pytest.raises(UserError, match="scratch_dir") as e:
            expand_scratch(scratch)
        assert words in str(e.value) and "\n" not in str(e.value), e.value
    monkeypatch.setenv("WSI_IRCR_SCRATCH", str(tmp_path / "node"))
    assert expand_scratch("$WSI_IRCR_SCRATCH/x") == tmp_path / "node" / "x" and (tmp_path / "node" / "x").is_dir()


def test_cli_refuses_an_unusable_scratch_before_any_slide(cohort, tmp_path, capfd):
    slides, model = cohort
    afile = tmp_path / "file"
    afile.write_text("")
    code, lines = run_cli("segment", slides[0], "-o", tmp_path / "out", "--model", model, "--core-px", "256",
                          "--halo", "32", "--set", "max_nucleus_um=8", "--quiet", "--scratch", f"{afile}/sub",
                          capfd=capfd)
    assert code == 2 and len(lines) == 1 and "scratch_dir" in lines[0] and "cannot create the folder" in lines[0], lines
    assert not (tmp_path / "out" / "c").exists()


def test_a_half_store_on_scratch_is_replaced_and_a_written_tile_kept(cohort, tmp_path, monkeypatch):
    """A store folder without its metadata (a removal or a killed task half done) is never taken
    for a store: it is created anew; a store with written tiles is reused as it is."""
    slides, _ = cohort
    from wsi_ircr.slide.pipeline import plan_slide
    from wsi_ircr.slide.reader import open_slide
    from wsi_ircr.slide.store import write_tile

    monkeypatch.setenv("WSI_IRCR_SCRATCH", str(tmp_path / "node"))
    folder = RunFolder(tmp_path / "out" / "c")
    folder.work_dir.mkdir(parents=True)
    with open_slide(slides[0]) as reader:
        plan = plan_slide(reader, SegmentConfig(**SMALL), 0.25)
        template, spec, stored = prepare_store(folder, plan, "c.tiff", "$WSI_IRCR_SCRATCH")
        assert template == scratch_template("$WSI_IRCR_SCRATCH", folder) and stored == 0
        assert template.startswith("$WSI_IRCR_SCRATCH/") and not folder.store_path.exists()
        here = tmp_path / "node" / SCRATCH_SUBDIR / Path(template).parent.name / "tiles.zarr"
        (here / "tiles" / "c" / "0").mkdir(parents=True)  # chunks without metadata
        store = open_scratch_store(template, spec)
        assert store.path == here and store.n_done == 0 and store.tiles == plan.tiles
        assert TileGrid.from_dict(json.loads(Path(spec).read_text())["grid"]) == plan.grid
        write_tile(store.path, 0, reader)
        assert open_scratch_store(template, spec).n_done == 1


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(client, [scratch of worker 0, of worker 1]): two worker processes on 127.0.0.1 whose
    ``$WSI_IRCR_SCRATCH`` differ, as two nodes' local disks do."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from wsi_ircr.slide.cluster import WorkerSetup

    root = tmp_path_factory.mktemp("nodes")
    scratch = [root / "node0", root / "node1"]
    workers = {i: {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": {"WSI_IRCR_SCRATCH": str(d)},
                                            "dashboard": False, "silence_logs": 50}}
               for i, d in enumerate(scratch)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False,
                                               "dashboard_address": "127.0.0.1:0"}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=50) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(WorkerSetup(torch_threads=1), name=WorkerSetup.name)  # as open_cluster does
        yield client, scratch


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """The cohort segmented with the store in the output folder (by this process's worker
    threads: 1 torch thread per task gives every cluster's nuclei)."""
    from wsi_ircr.slide.cluster import local_client

    slides, model = cohort
    out = tmp_path_factory.mktemp("reference")
    with local_client(config(model)) as client:
        report = segment_slides(slides, out, config(model), client, model_info(config(model)))
    assert report.done == slides, report.failed
    return out


def test_two_workers_each_with_its_own_scratch_give_the_same_nuclei(cohort, two_nodes, reference, tmp_path):
    slides, model = cohort
    client, scratch = two_nodes
    cfg = config(model, scratch_dir="$WSI_IRCR_SCRATCH")
    report = segment_slides(slides, tmp_path, cfg, client, model_info(cfg))
    assert report.done == slides, report.failed
    assert_same_nuclei(tmp_path, reference)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["unreadable"]["boxes_xywh"] == [list(BOX)]
    stores = summary["tiles"]["scratch_stores"]
    assert len(stores) == 2 and {Path(s.split(":", 1)[1]).parents[2] for s in stores} == set(scratch), stores
    assert summary["outputs"]["tile_store"] is None and not (tmp_path / "c" / "tiles.zarr").exists()
    assert not (tmp_path / "c" / "work").exists()
    assert all(d.is_dir() for d in scratch) and left_in(scratch[0]) == left_in(scratch[1]) == []


def test_a_scratch_unusable_on_the_workers_fails_the_slide_in_one_line(cohort, two_nodes, tmp_path):
    """The driver cannot see a remote worker's environment: the worker's line names the folder,
    the variable and its host, in the output and cohort.csv; nothing is left in the output folder
    but the unfinished run."""
    slides, model = cohort
    client, _ = two_nodes
    cfg = config(model, scratch_dir="$WSI_IRCR_SCRATCH_UNSET/tiles")
    report = segment_slides(slides, tmp_path, cfg, client, model_info(cfg))
    error = report.failed[slides[0]]
    assert "scratch_dir $WSI_IRCR_SCRATCH_UNSET/tiles" in error and "$WSI_IRCR_SCRATCH_UNSET is not set there" in error
    assert "\n" not in error and error in (tmp_path / "cohort.csv").read_text()
    assert not (tmp_path / "c" / "tiles.zarr").exists() and not (tmp_path / "c" / "summary.json").exists()


def test_a_scratch_store_gone_between_attempts_is_rebuilt_to_the_same_nuclei(cohort, two_nodes, reference, tmp_path,
                                                                             monkeypatch):
    """Attempt 1 fails on a late tile of c (a task on an in-process worker): its results so far
    stay in the output folder and its scratch stores are removed; attempt 2 rebuilds the store
    from the slide for the missing tiles and gives the nuclei (and broken-tile boxes) of the
    reference run. One task in flight: no other task of c is running when it fails."""
    from wsi_ircr.slide import segmentation
    from wsi_ircr.slide.cluster import local_client

    slides, model = cohort
    scratch = tmp_path / "node"
    cfg = config(model, scratch_dir=str(scratch), tasks_in_flight=1)
    real, calls = segmentation.segment_tile, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    out = tmp_path / "out"
    with local_client(cfg) as client:
        monkeypatch.setattr(segmentation, "segment_tile", failing)
        first = segment_slides(slides, out, cfg, client, model_info(cfg))
        assert list(first.failed) == [slides[0]] and "node lost" in first.failed[slides[0]]
        saved = list((out / "c" / "work").glob("*.pkl"))
        assert 0 < len(saved) < 4 and left_in(scratch) == []
        for path in saved:  # every tile's window meets the broken tile: its box is kept with the result
            with open(path, "rb") as f:
                assert pickle.load(f).unreadable_xywh == (BOX,), path
        monkeypatch.setattr(segmentation, "segment_tile", real)
        second = segment_slides(slides, out, cfg, client, model_info(cfg))
    assert second.done == [slides[0]], second.failed
    summary = json.loads((out / "c" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["tiles"]["reused_results"] == len(saved)
    assert_same_nuclei(out, reference)
    assert left_in(scratch) == [] and not (out / "c" / "tiles.zarr").exists()


def test_cluster_check_says_where_the_tile_stores_go(capsys):
    pytest.importorskip("dask_jobqueue")
    code, out, err = run_main(["cluster", "check", "--scratch", "$TMPDIR"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("# tile stores:"))
    assert "node-local $TMPDIR/wsi-ircr/<stem>-<id>/tiles.zarr on each worker" in line and "$TMPDIR expanded" in line
    code, out, _ = run_main(["cluster", "check"], capsys)
    assert "# tile stores: OUT/<stem>/tiles.zarr on the shared output folder" in out
