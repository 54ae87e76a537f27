"""The QuPath script (``qupath/wsi_ircr_segment.groovy``): QuPath cannot run here, so the
command it builds is read from the script and run as it is, on a synthetic slide, with and
without the region file it exports; the file it then imports is checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from model_fixtures import synthetic_signal_model
from qupath_geojson import validate_qupath_geojson
from synthetic_slides import synthetic_he, write_aperio_svs

from wsi_ircr.cli import main

pytestmark = pytest.mark.openslide
SCRIPT = Path(__file__).resolve().parents[1] / "qupath" / "wsi_ircr_segment.groovy"
# QPEx calls the script may use (documented in QuPath 0.4 / 0.5 scripting)
QUPATH_CALLS = {"getCurrentServer", "getSelectedObjects", "exportObjectsToGeoJson", "importObjectsFromFile",
                "fireHierarchyUpdate"}


def _groovy_list(text: str, values: dict) -> list[str]:
    """The items of a Groovy list literal: "strings" and names of ``values`` (with
    ``.toString()`` / ``.getAbsolutePath()``)."""
    items = []
    for token in re.findall(r'"[^"]*"|[A-Za-z_][\w.()]*', text):
        if token.startswith('"'):
            items.append(token[1:-1])
        else:
            items.append(str(values[token.split(".")[0]]))
    return items


def script_command(values: dict, cells: bool, roi: bool) -> tuple[list[str], str]:
    """The command the script runs for ``values`` of its names, and the result file it imports."""
    text = SCRIPT.read_text()
    base = re.search(r"^def command = \[(.*)\]$", text, re.M).group(1)
    command = _groovy_list(base, values)
    additions = re.findall(r"^if \((\w+) [^)]*\) command \+= \[(.*)\]$", text, re.M)
    assert [name for name, _ in additions] == ["CELLS_UM", "roiFile"]
    for (_, items), wanted in zip(additions, (cells, roi)):
        if wanted:
            command += _groovy_list(items, values)
    assert re.search(r"^command \+= EXTRA_ARGS$", text, re.M)
    result = re.search(r'^def resultFile = new File\(new File\(outDir, stem\), stem \+ "([^"]+)"\)$', text, re.M).group(1)
    return command + list(values["EXTRA_ARGS"]), str(Path(values["outDir"]) / values["stem"] / (values["stem"] + result))


def test_script_uses_only_documented_qupath_calls():
    text = SCRIPT.read_text()
    assert "QuPath 0.4 and 0.5" in text
    called = set(re.findall(r"\b(get\w+|export\w+|import\w+|fire\w+)\(", text))
    groovy_and_java = {"getURIs", "getAbsolutePath", "getName", "getProperty", "getParentFile"}
    assert called - groovy_and_java == QUPATH_CALLS


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("qupath")
    image, _ = synthetic_he((260, 300), n_nuclei=40, seed=3, radius_px=(4, 6))
    return write_aperio_svs(root / "he.ome.svs", image, mpp=0.5), synthetic_signal_model(root / "m.pt")


@pytest.mark.parametrize("cells, roi", [(False, False), (True, True)])
def test_the_command_it_builds_writes_the_file_it_imports(slide_and_model, tmp_path, capfd, cells, roi):
    slide, model = slide_and_model
    out = tmp_path / "out"
    roi_file = out / "he-roi.geojson"
    if roi:  # what exportObjectsToGeoJson(annotations, path, "FEATURE_COLLECTION") writes
        roi_file.parent.mkdir(parents=True)
        roi_file.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "id": "6f1f6f3c-5bd4-4f3e-9b1e-0c4d9b1f2a11",
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [150, 0], [150, 260], [0, 260], [0, 0]]]},
             "properties": {"objectType": "annotation", "name": "left"}}]}))
    values = {"WSI_IRCR": "wsi-ircr", "slidePath": str(slide), "outDir": str(out), "CELLS_UM": 2.0, "HALO_PX": 64,
              "roiFile": roi_file, "stem": "he",
              "EXTRA_ARGS": ["--model", str(model), "--core-px", "256", "--set", "max_nucleus_um=8", "--fp32",
                             "--set", "threads_per_worker=1", "--quiet"]}
    command, result = script_command(values, cells, roi)
    assert command[:3] == ["wsi-ircr", "segment", str(slide)] and "gzip=false" in command
    assert ("--cells" in command) == cells and ("--roi" in command) == roi
    capfd.readouterr()
    try:
        main(command[1:])
    except SystemExit as e:
        assert e.code in (0, None), capfd.readouterr().err
    n = validate_qupath_geojson(result, object_type="cell" if cells else "detection")
    summary = json.loads((Path(result).parent / "summary.json").read_text())
    assert n == summary["nuclei"] > 0 and summary["outputs"]["geojson"] == Path(result).name
    if roi:
        assert summary["regions"][0]["name"] == "left"


def test_stem_rule_matches_the_run_folder():
    from wsi_ircr.slide.run_folder import run_stem

    text = SCRIPT.read_text()
    assert 'stem.toLowerCase().endsWith(".ome")' in text and 'name.lastIndexOf(".")' in text
    for name in ("he.svs", "he.ome.tiff", "TCGA-1.8F9A.svs", "plain"):
        stem = name[: name.rindex(".")] if "." in name else name  # what the script computes
        stem = stem[:-4] if stem.lower().endswith(".ome") else stem
        assert stem == run_stem(name)
