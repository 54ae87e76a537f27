"""Cohorts: one task graph over slides, failure isolation, cohort.csv across reruns, inputs."""

from __future__ import annotations

import csv
import gzip
import time
from pathlib import Path

import pytest
from model_fixtures import synthetic_signal_model
from synthetic_slides import synthetic_he, write_aperio_svs, write_pyramidal_tiff

from wsi_ircr.cli import main
from wsi_ircr.errors import UserError
from wsi_ircr.slide import cohort as cohort_mod
from wsi_ircr.slide import tasks
from wsi_ircr.slide.cluster import local_client
from wsi_ircr.slide.cohort import segment_slides
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.inputs import collect_slides
from wsi_ircr.slide.pipeline import model_info

pytestmark = pytest.mark.openslide
SMALL = {"core_px": 256, "halo_px": 32, "max_nucleus_um": 8.0, "threads_per_worker": 1, "batch_tiles": 1,
         "tissue_mask": False}
CLI = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--set", "threads_per_worker=1", "--quiet",
       "--no-tissue-mask"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return synthetic_signal_model(tmp_path_factory.mktemp("model") / "random.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """a.svs (6 tiles at the model's mpp), b.tiff (4 tiles) and a truncated c.svs."""
    root = tmp_path_factory.mktemp("cohort")
    a, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    write_aperio_svs(root / "a.svs", a, mpp=0.5)
    b, _ = synthetic_he((400, 480), n_nuclei=60, seed=4, radius_px=(4, 6))
    write_pyramidal_tiff(root / "b.tiff", b, mpp=0.25, n_levels=2)
    (root / "c.svs").write_bytes((root / "a.svs").read_bytes()[:4000])
    return root


@pytest.fixture(scope="module")
def client():
    with local_client(SegmentConfig(**SMALL)) as c:
        yield c


def rows(out: Path) -> dict[str, dict]:
    with open(out / "cohort.csv", newline="") as f:
        return {Path(r["slide"]).name: r for r in csv.DictReader(f)}


def geojson(out: Path, stem: str) -> bytes:
    return gzip.decompress((out / stem / f"{stem}.geojson.gz").read_bytes())


def test_collect_slides_from_files_folders_and_lists(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# cohort\n\n{folder / 'a.svs'}\nrelative/x.svs\n")
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "x.svs").write_bytes(b"")  # listed paths must exist (their content fails alone)
    got = collect_slides([folder / "b.tiff"], listing)
    assert got == [folder / "b.tiff", folder / "a.svs", tmp_path / "relative" / "x.svs"]
    listing.write_text(f"{folder}\n")  # a listed folder stands for its slides
    assert collect_slides([], listing) == [folder / "a.svs", folder / "b.tiff", folder / "c.svs"]
    assert collect_slides([folder]) == [folder / "a.svs", folder / "b.tiff", folder / "c.svs"]
    (tmp_path / "empty").mkdir()
    for args, words in [(([tmp_path / "empty"],), "no slide"), (([], tmp_path / "none.txt"), "--list"),
                        (([],), "no slides given"), (([folder / "a.svs", folder / "a.svs"],), "listed twice"),
                        (([tmp_path / "gone.svs"],), "gone.svs: no such file or folder")]:
        with pytest.raises(UserError, match=words):
            collect_slides(*args)
    (tmp_path / "a.tiff").write_bytes(b"")
    with pytest.raises(UserError, match=r"a.svs and .*a.tiff would both write OUT/a/"):
        collect_slides([folder / "a.svs", tmp_path / "a.tiff"])


def test_one_graph_bounded_in_flight_corrupt_slide_alone_and_the_table_kept(folder, model, client, tmp_path,
                                                                            monkeypatch):
    """Three slides, at most 2 tile tasks in flight: b is planned while a's tiles run and b's
    tiles start before a is exported (no barrier between slides), c (truncated) fails alone, and every done slide's GeoJSON is
    that of a run of it alone. cohort.csv keeps rows across commands into the same OUT."""
    config = SegmentConfig(**SMALL, model=str(model), tasks_in_flight=2)
    info = model_info(config)
    events, most = [], [0]
    submit, finish, plan = cohort_mod._Cohort._submit, cohort_mod.finish_slide, cohort_mod._Cohort._plan

    def spy_plan(self, slide):
        events.append(("plan", slide.stem, time.perf_counter()))
        return plan(self, slide)

    def spy_submit(self, run):
        events.append(("submit", run.folder.stem, time.perf_counter()))
        submit(self, run)
        most[0] = max(most[0], len(self.futures))

    def spy_finish(*args, **kwargs):
        summary = finish(*args, **kwargs)
        events.append(("exported", Path(summary["out_dir"]).name, time.perf_counter()))
        return summary

    monkeypatch.setattr(cohort_mod._Cohort, "_submit", spy_submit)
    monkeypatch.setattr(cohort_mod._Cohort, "_plan", spy_plan)
    monkeypatch.setattr(cohort_mod, "finish_slide", spy_finish)
    slides = collect_slides([folder])
    report = segment_slides(slides, tmp_path / "all", config, client, info)
    assert sorted(p.name for p in report.done) == ["a.svs", "b.tiff"] and list(report.failed) == [folder / "c.svs"]
    assert most[0] == 2
    first_b = min(t for kind, stem, t in events if kind == "submit" and stem == "b")
    a_exported = next(t for kind, stem, t in events if kind == "exported" and stem == "a")
    assert first_b < a_exported
    last_a = max(t for kind, stem, t in events if kind == "submit" and stem == "a")
    plan_b = next(t for kind, stem, t in events if kind == "plan" and stem == "b")
    assert plan_b < last_a  # b was planned in the background while a's tiles ran
    table = rows(tmp_path / "all")
    assert table["a.svs"]["status"] == table["b.tiff"]["status"] == "done"
    assert table["c.svs"]["status"] == "failed" and "c.svs" in table["c.svs"]["error"]
    assert int(table["a.svs"]["nuclei"]) == report.summaries[folder / "a.svs"]["nuclei"] > 0
    assert not (tmp_path / "all" / "c").exists()
    assert not list((tmp_path / "all").glob(".*partial"))

    alone = segment_slides([folder / "a.svs"], tmp_path / "alone", config, client, info)
    assert alone.done == [folder / "a.svs"]
    assert geojson(tmp_path / "all", "a") == geojson(tmp_path / "alone", "a")
    segment_slides([folder / "b.tiff"], tmp_path / "alone", config, client, info)
    assert set(rows(tmp_path / "alone")) == {"a.svs", "b.tiff"}  # the earlier command's row is kept
    assert geojson(tmp_path / "all", "b") == geojson(tmp_path / "alone", "b")


def test_a_task_error_fails_its_slide_alone(folder, model, client, tmp_path, monkeypatch):
    """Any exception in a tile task (not only user errors) fails that slide, not the command."""
    config = SegmentConfig(**SMALL, model=str(model))
    segment_batch = tasks.segment_batch

    def flaky(job, indices, *args):
        if job.slide_path.endswith("b.tiff"):
            raise RuntimeError("disk on fire")
        return segment_batch(job, indices, *args)

    monkeypatch.setattr(tasks, "segment_batch", flaky)
    report = segment_slides([folder / "a.svs", folder / "b.tiff"], tmp_path, config, client, model_info(config))
    assert report.done == [folder / "a.svs"]
    assert report.failed == {folder / "b.tiff": f"{folder / 'b.tiff'}: RuntimeError: disk on fire"}
    assert (tmp_path / "b" / "run.json").exists() and not (tmp_path / "b" / "summary.json").exists()
    monkeypatch.setattr(tasks, "segment_batch", segment_batch)
    again = segment_slides([folder / "a.svs", folder / "b.tiff"], tmp_path, config, client, model_info(config))
    assert again.skipped == [folder / "a.svs"] and again.done == [folder / "b.tiff"] and not again.failed
    assert rows(tmp_path)["b.tiff"]["status"] == "done"


def test_cli_list_with_a_missing_slide_is_one_line_before_any_work(folder, model, tmp_path, capfd):
    listing = folder / "list.txt"
    listing.write_text("a.svs\nmissing.svs\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--list", str(listing), "-o", str(tmp_path / "out"), "--model", str(model), *CLI])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and f"--list {listing}: {folder / 'missing.svs'}: no such file or folder" in err
    assert not (tmp_path / "out").exists()


def test_tta_reaches_the_network_and_is_part_of_the_run_key(folder, model, client, tmp_path):
    from wsi_ircr.slide.tasks import get_predictor

    plain = SegmentConfig(**SMALL, model=str(model))
    flipped = SegmentConfig(**SMALL, model=str(model), tta=2)
    info = model_info(plain)
    assert get_predictor(info.path, info.hash, "cpu", 2).tta == 2
    one = segment_slides([folder / "a.svs"], tmp_path / "one", plain, client, info)
    two = segment_slides([folder / "a.svs"], tmp_path / "two", flipped, client, info)
    assert two.summaries[folder / "a.svs"]["config"]["tta"] == 2
    assert geojson(tmp_path / "one", "a") != geojson(tmp_path / "two", "a")
    again = segment_slides([folder / "a.svs"], tmp_path / "one", flipped, client, info)
    assert "finished run with another tta (1 -> 2)" in again.failed[folder / "a.svs"]
    assert one.done == [folder / "a.svs"]


def test_cohort_table_keeps_rows_of_older_tables_and_refuses_foreign_files(tmp_path):
    from wsi_ircr.slide.cohort import CohortTable

    (tmp_path / "cohort.csv").write_text("slide,status,nuclei,seconds,error\n/d/old.svs,done,12,3.5,\n")
    table = CohortTable(tmp_path)
    table.record({"slide": "/d/new.svs", "status": "failed", "error": "bad"})
    assert rows(tmp_path)["old.svs"] == {"slide": "/d/old.svs", "status": "done", "nuclei": "12", "tissue_mm2": "",
                                         "nuclei_per_mm2": "", "slide_seconds_concurrent": "3.5", "run_wall_seconds": "",
                                         "unreadable_regions": "", "unreadable_mm2": "", "roi": "", "error": ""}
    assert rows(tmp_path)["new.svs"]["error"] == "bad"
    other = CohortTable(tmp_path)  # another command into the same OUT, opened before this one wrote
    table.record({"slide": "/d/third.svs", "status": "done"})
    other.record({"slide": "/d/fourth.svs", "status": "done"})
    assert set(rows(tmp_path)) == {"old.svs", "new.svs", "third.svs", "fourth.svs"}
    (tmp_path / "cohort.csv").write_text("name,value\nx,1\n")
    with pytest.raises(UserError, match="cohort.csv: not a cohort table"):
        CohortTable(tmp_path)
