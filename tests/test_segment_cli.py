"""``wsi-ircr segment`` / ``wsi-ircr tile`` through the command line: bad input is one line
on stderr with exit status 2 and leaves nothing behind, run-folder rules (finished,
unfinished, overwrite, tile then segment), several slides per command, lazy ``--help``,
and the README command on the bundled sample slide.

Commands run in this process (``wsi_ircr.cli.main``, stderr read at the file-descriptor
level, so OpenSlide's own messages count too); warnings logged during a failing command
count as stderr lines, as they would be in a fresh process without logging set up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli as wsi_ircr
from model_fixtures import synthetic_signal_model
from qupath_geojson import validate_qupath_geojson
from synthetic_slides import synthetic_he, write_aperio_svs

from wsi_ircr.cli import main
from wsi_ircr.model.checkpoint import bundled_model_path, file_hash, portable_name

pytestmark = pytest.mark.openslide
REPO = Path(__file__).resolve().parents[1]
SMALL_TILES = ["--core-px", "256", "--halo", "32", "--set", "max_nucleus_um=8", "--set", "threads_per_worker=1",
               "--quiet"]


def ok(*args, capfd) -> None:
    code, lines = wsi_ircr(*args, capfd=capfd)
    assert code == 0, lines


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return synthetic_signal_model(tmp_path_factory.mktemp("model") / "random.pt")


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A small Aperio SVS at 0.5 mpp (6 tissue tiles of 256 px at 0.25 mpp)."""
    image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    return write_aperio_svs(tmp_path_factory.mktemp("slides") / "he.svs", image, mpp=0.5)


def _tiff_without_resolution(path: Path) -> Path:
    import tifffile

    image, _ = synthetic_he((260, 300), n_nuclei=20, seed=1, radius_px=(4, 6))
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


# Errors of the whole command: exit 2 before any work, nothing written.
COMMAND_ERRORS = ["missing", "missing_folder", "folder_without_slides", "halo_below_nucleus", "cuda_without_gpu",
                  "output_is_a_file"]
# Errors of one slide: it fails alone (exit 1), recorded in OUT/cohort.csv, no run folder left.
SLIDE_ERRORS = ["text", "truncated_svs", "dicom", "no_mpp", "placeholder_dpi", "smaller_than_a_tile"]


@pytest.mark.parametrize("case", COMMAND_ERRORS + SLIDE_ERRORS)
def test_bad_input_is_one_line_and_leaves_nothing(case, slide, random_model, tmp_path, shared_slides, capfd, caplog):
    options = list(SMALL_TILES)
    expect = None
    if case == "missing":
        target, expect = tmp_path / "nope.svs", "nope.svs: no such file or folder; check the path"
    elif case == "missing_folder":
        target, expect = f"{tmp_path / 'slides'}/", "slides: no such file or folder; check the path"
    elif case == "folder_without_slides":
        target, expect = tmp_path / "empty", "no slide"
        target.mkdir()
        (target / "notes.txt").write_text("not a slide\n")
    elif case == "text":
        target = tmp_path / "notes.svs"
        target.write_text("not a slide\n")
    elif case == "truncated_svs":
        target = tmp_path / "cut.svs"
        target.write_bytes(slide.read_bytes()[: slide.stat().st_size // 3])
    elif case == "dicom":
        target, expect = shared_slides / "small_dicom.dcm", "small_dicom.dcm"
    elif case == "no_mpp":
        target, expect = _tiff_without_resolution(tmp_path / "nompp.tiff"), "--mpp"
    elif case == "placeholder_dpi":
        import tifffile

        target, expect = tmp_path / "scan300.tiff", "84.67 um/px, a placeholder resolution); pass --mpp"
        tifffile.imwrite(target, synthetic_he((260, 300), n_nuclei=5, seed=2)[0], tile=(256, 256), photometric="rgb",
                         resolution=(300, 300), resolutionunit="INCH")
    elif case == "smaller_than_a_tile":
        target, expect = shared_slides / "small.svs", "16x16"
    elif case == "halo_below_nucleus":
        target, expect = slide, "--halo"
        options = ["--core-px", "256", "--halo", "16", "--quiet"]  # default max_nucleus_um 16 = 64 px
    elif case == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        target, expect = slide, "--device cuda"
        options.extend(["--device", "cuda"])
    else:
        target, expect = slide, "-o"
        (tmp_path / "out").write_text("a file where the output folder should go\n")
    out = tmp_path / "out"
    code, lines = wsi_ircr("segment", target, "-o", out, "--model", random_model, *options, capfd=capfd, caplog=caplog)
    assert code == (2 if case in COMMAND_ERRORS else 1), lines
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "Traceback" not in lines[0]
    if expect:
        assert expect in lines[0], lines[0]
    if case in COMMAND_ERRORS:
        assert not out.is_dir() or not any(out.rglob("*")), sorted(out.rglob("*"))
    else:
        assert sorted(p.name for p in out.iterdir()) == [".cohort.lock", "cohort.csv"], sorted(out.rglob("*"))
        [row] = _rows(out)
        assert row["slide"] == str(target.absolute()) and row["status"] == "failed"
        assert row["error"] == lines[0].removeprefix("error: ")


def _rows(out: Path) -> list[dict]:
    import csv

    with open(out / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_slide_without_mpp_runs_with_mpp_option(random_model, tmp_path, capfd):
    target = _tiff_without_resolution(tmp_path / "nompp.tiff")
    ok("segment", target, "-o", tmp_path / "out", "--model", random_model, "--mpp", "0.5", *SMALL_TILES, capfd=capfd)
    summary = json.loads((tmp_path / "out" / "nompp" / "summary.json").read_text())
    assert summary["mpp_source"] == "override" and summary["slide_mpp"] == 0.5
    assert summary["nuclei"] == validate_qupath_geojson(tmp_path / "out" / "nompp" / "nompp.geojson.gz") > 0


def test_a_real_process_prints_one_line_for_a_truncated_slide(slide, random_model, tmp_path):
    cut = tmp_path / "cut.svs"
    cut.write_bytes(slide.read_bytes()[:3000])
    proc = subprocess.run([sys.executable, "-m", "wsi_ircr", "segment", str(cut), "-o", str(tmp_path / "out"),
                           "--model", str(random_model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error:") and "cut.svs" in proc.stderr
    assert proc.stdout == f"0 of 1 slides done, 1 failed; see {tmp_path / 'out' / 'cohort.csv'}\n"


def test_finished_run_is_skipped_then_redone_with_overwrite_reusing_the_store(slide, random_model, tmp_path, capfd):
    """A rerun skips a finished slide; ``--overwrite`` recomputes it from the kept tile store;
    a finished run of other settings is refused (that slide fails) unless ``--overwrite``."""
    args = ["segment", slide, "-o", tmp_path, "--model", random_model, *SMALL_TILES]
    ok(*args, capfd=capfd)
    summary_path = tmp_path / "he" / "summary.json"
    first = summary_path.read_bytes()
    capfd.readouterr()
    main([str(a) for a in args])
    assert "1 of 1 slides done, 1 already finished" in capfd.readouterr().out
    assert summary_path.read_bytes() == first
    chunks = {p: p.stat().st_mtime_ns for p in (tmp_path / "he" / "tiles.zarr" / "tiles").rglob("*") if p.is_file()}
    ok(*args, "--overwrite", capfd=capfd)
    again = json.loads(summary_path.read_text())
    assert again["resumed"] is False and again["tiles"]["reused_results"] == 0
    assert again["tiles"]["reused_from_store"] == again["tiles"]["segmented"] > 0
    assert chunks == {p: p.stat().st_mtime_ns for p in (tmp_path / "he" / "tiles.zarr" / "tiles").rglob("*") if p.is_file()}
    assert again["nuclei"] == json.loads(first)["nuclei"] > 0
    code, lines = wsi_ircr(*args, "--set", "tissue_mask=false", capfd=capfd)
    assert code == 1 and len(lines) == 1 and "finished run with another tissue_mask" in lines[0], lines


def test_tile_then_segment_reuses_the_store(slide, random_model, tmp_path, capfd):
    """``tile`` has no --device; a later ``segment --device cpu`` on its folder resumes."""
    ok("tile", slide, "-o", tmp_path, "--model", random_model, *SMALL_TILES, capfd=capfd)
    out = tmp_path / "he"
    assert (out / "tiles.zarr").is_dir() and (out / "tissue.png").exists()
    assert not (out / "summary.json").exists() and not list(out.glob("*.geojson*"))
    ok("segment", slide, "-o", tmp_path, "--model", random_model, "--device", "cpu", *SMALL_TILES, capfd=capfd)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True
    assert summary["tiles"]["reused_from_store"] == summary["tiles"]["segmented"] > 0
    assert summary["config"]["device"] == "cpu"


def test_unfinished_run_with_another_config_is_refused(slide, random_model, tmp_path, capfd):
    ok("tile", slide, "-o", tmp_path, "--model", random_model, *SMALL_TILES, capfd=capfd)
    code, lines = wsi_ircr("segment", slide, "-o", tmp_path, "--model", random_model, *SMALL_TILES,
                           "--set", "tissue_mask=false", capfd=capfd)
    assert code == 1 and len(lines) == 1 and "unfinished run with another tissue_mask" in lines[0], lines
    assert not (tmp_path / "he" / "summary.json").exists()


def test_several_slides_per_command_get_distinct_folders(slide, random_model, tmp_path, capfd):
    """``x.1.svs`` and ``x.2.svs`` (e.g. TCGA names with a uuid part) are two runs; two
    files that would share a folder are refused before anything is written."""
    for name in ("x.1.svs", "x.2.svs"):
        (tmp_path / name).write_bytes(slide.read_bytes())
    ok("segment", tmp_path / "x.1.svs", tmp_path / "x.2.svs", "-o", tmp_path / "out", "--model", random_model,
       *SMALL_TILES, capfd=capfd)
    assert (tmp_path / "out" / "x.1" / "x.1.geojson.gz").exists()
    assert (tmp_path / "out" / "x.2" / "summary.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.1.svs").write_bytes(b"")
    code, lines = wsi_ircr("segment", tmp_path / "x.1.svs", tmp_path / "other" / "x.1.svs", "-o", tmp_path / "out2",
                           "--model", random_model, *SMALL_TILES, capfd=capfd)
    assert code == 2 and len(lines) == 1 and "x.1/" in lines[0], lines
    code, lines = wsi_ircr("segment", tmp_path / "x.1.svs", tmp_path / "x.1.svs", "-o", tmp_path / "out2",
                           "--model", random_model, *SMALL_TILES, capfd=capfd)
    assert code == 2 and len(lines) == 1 and "listed twice" in lines[0], lines
    assert not (tmp_path / "out2").exists()


def test_help_does_not_import_torch_dask_or_openslide():
    code = (
        "import sys\n"
        "from wsi_ircr.cli import main\n"
        "for argv in (['--help'], ['segment', '--help'], ['tile', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'dask', 'distributed', 'openslide', 'zarr', 'skimage') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--scheduler" in proc.stdout and "--core-px" in proc.stdout and "Commands:" in proc.stdout


@pytest.mark.slow
def test_readme_command_on_the_sample_slide(tmp_path, capfd):
    """The Quickstart: ``wsi-ircr segment examples/cmu-1-small-region.svs -o out/`` with the
    bundled model."""
    if not bundled_model_path().exists():
        pytest.skip(f"the bundled model {bundled_model_path().name} is not in wsi_ircr/weights yet")
    ok("segment", REPO / "examples" / "cmu-1-small-region.svs", "-o", tmp_path, "--quiet", capfd=capfd)
    out = tmp_path / "cmu-1-small-region"
    summary = json.loads((out / "summary.json").read_text())
    n = validate_qupath_geojson(out / "cmu-1-small-region.geojson.gz")
    assert summary["nuclei"] == n > 1000
    assert summary["model"]["hash"] == file_hash(bundled_model_path())
    assert summary["model"]["path"] == portable_name(bundled_model_path()) and not summary["model"]["path"].startswith("/")
    from PIL import Image

    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape[0] > 500 and overlay.std() > 10


@pytest.mark.slow  # a whole segment process killed mid-run, then run again
def test_killed_run_resumes_to_the_same_geojson(slide, random_model, tmp_path, capfd):
    """SIGKILL a real ``segment`` process once its first tile results are saved; the same
    command then resumes (tile store and saved tiles reused) and writes the GeoJSON of an
    uninterrupted run."""
    import gzip
    import signal
    import time

    args = [slide, "--model", random_model, *SMALL_TILES, "--set", "batch_tiles=1"]
    proc = subprocess.Popen([sys.executable, "-m", "wsi_ircr", "segment", "-o", tmp_path / "killed", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "killed" / "he" / "work"
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob("*.pkl")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert list(work.glob("*.pkl")), "no tile result was saved before the kill"
    assert not (tmp_path / "killed" / "he" / "summary.json").exists(), "the run finished before the kill"
    ok("segment", "-o", tmp_path / "killed", *args, capfd=capfd)
    ok("segment", "-o", tmp_path / "fresh", *args, capfd=capfd)
    summary = json.loads((tmp_path / "killed" / "he" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["tiles"]["reused_results"] >= 1
    killed, fresh = (gzip.decompress((tmp_path / k / "he" / "he.geojson.gz").read_bytes()) for k in ("killed", "fresh"))
    assert killed == fresh and json.loads(killed)["features"]


def test_tile_goes_on_after_a_bad_slide(slide, random_model, tmp_path, capfd):
    (tmp_path / "bad.svs").write_text("not a slide\n")
    code, lines = wsi_ircr("tile", tmp_path / "bad.svs", slide, "-o", tmp_path / "out", "--model", random_model,
                           *SMALL_TILES, capfd=capfd)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "bad.svs" in lines[0], lines
    assert (tmp_path / "out" / "he" / "tiles.zarr").is_dir() and not (tmp_path / "out" / "bad").exists()
