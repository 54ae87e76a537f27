"""RunFolder: the states of OUT/<stem>/ (new, unfinished, finished) and their transitions."""

from __future__ import annotations

import json

import pytest

from wsi_ircr.errors import UserError
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.run_folder import RunFolder, run_key, run_stem


def key(**config) -> dict:
    return run_key("s.svs", "f" * 32, "m" * 16, SegmentConfig(**config))


def test_stems_keep_uuid_parts_and_drop_ome():
    assert run_stem("/a/TCGA-AA-3.8F9A.svs") == "TCGA-AA-3.8F9A" and run_stem("x.ome.tiff") == "x"


def test_new_unfinished_finished_and_overwrite(tmp_path):
    folder = RunFolder.for_slide(tmp_path, "/data/s.svs")
    assert folder.path == tmp_path / "s" and not folder.finished(key())
    assert folder.prepare(key()) is False and json.loads(folder.run_file.read_text()) == key()
    assert folder.prepare(key(device="cpu", batch_tiles=8)) is True  # how a run is carried out is not in the key
    with pytest.raises(UserError, match=r"unfinished run with another halo_px \(64 -> 96\); pass --overwrite"):
        folder.prepare(key(halo_px=96))
    folder.store_path.mkdir()
    (folder.store_path / "chunk").write_text("kept")
    folder.work_dir.mkdir()
    folder.finish({"nuclei": 3})
    assert not folder.work_dir.exists() and folder.summary() == {"nuclei": 3}
    assert folder.finished(key())
    folder.summary_file.write_text("{trunc")
    (folder.path / ".s.geojson.gz.x1.partial").write_text("half")  # a killed export's temporary file
    assert not folder.finished(key()) and folder.prepare(key()) is True  # redone from its saved parts
    assert not list(folder.path.glob(".*partial"))
    folder.finish({"nuclei": 3})
    older = {**key(), "wsi_ircr": "0.0.1"}
    folder.run_file.write_text(json.dumps(older))
    assert folder.finished(key())  # made by another wsi-ircr version: still finished
    with pytest.raises(UserError, match="finished run with another core_px"):
        folder.finished(key(core_px=512))
    assert folder.prepare(key(core_px=512), overwrite=True) is False
    assert sorted(p.name for p in folder.path.iterdir()) == ["run.json", "tiles.zarr"]
    assert (folder.store_path / "chunk").read_text() == "kept"


def test_folders_that_are_not_runs_are_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a wsi-ircr run folder"):
        RunFolder(tmp_path / "s").prepare(key())
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        RunFolder(tmp_path / "f").prepare(key())
