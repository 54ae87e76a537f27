"""A trained checkpoint records its data sources (dataset, tile count, content hash, licence), never machine paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cli_run import run_main as run_cli
from test_train import IRCR, SMALL, write_tiles
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.train.provenance import describe_sources, folder_licence

REPO = Path(__file__).resolve().parents[1]
README = """# Labelled nuclei data

| folder | what | licence |
|---|---|---|
| `alpha/` | tiles | **CC BY 4.0** |
| `beta/` | tiles | CC BY-NC-SA 4.0 |
"""


def data_root(root: Path) -> Path:
    """``root/data``: datasets alpha and beta (licences in the README table), gamma (a Licence:
    line in its own README) and delta (no licence stated), each with images/ and labels/."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "README.md").write_text(README)
    for k, name in enumerate(("alpha", "beta", "gamma", "delta")):
        write_tiles(data / name, [f"{name}{i}" for i in range(3)], seed=10 * k)
    (data / "gamma" / "README.md").write_text("Source: somewhere.\n**Licence:** CC0 1.0 (public domain).\n")
    return data


def test_licences_come_from_the_data_readme_table_or_the_folders_own_readme(tmp_path):
    data = data_root(tmp_path)
    assert folder_licence(data / "alpha") == "CC BY 4.0"
    assert folder_licence(data / "beta") == "CC BY-NC-SA 4.0"
    assert folder_licence(data / "gamma") == "CC0 1.0 (public domain)"
    assert folder_licence(data / "delta") is None and folder_licence(data / "alpha" / "images") is None


def test_a_pool_of_links_is_described_per_dataset_and_the_hash_follows_the_contents(tmp_path):
    data = data_root(tmp_path)
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("alpha0", "alpha1"):
        (pool / f"{name}.png").symlink_to(data / "alpha" / "images" / f"{name}.png")
    (pool / "gamma2.png").symlink_to(data / "gamma" / "images" / "gamma2.png")
    tiles = sorted((p,) for p in pool.iterdir())
    sources = describe_sources({"unlabelled": tiles, "labelled": [(data / "delta" / "images" / "delta0.png",
                                                                   data / "delta" / "labels" / "delta0.png")]})
    by = {(s["role"], s["dataset"]): s for s in sources}
    assert set(by) == {("unlabelled", "alpha"), ("unlabelled", "gamma"), ("labelled", "delta/images")}
    assert (by["unlabelled", "alpha"]["tiles"], by["unlabelled", "alpha"]["licence"]) == (2, "CC BY 4.0")
    assert (by["unlabelled", "gamma"]["tiles"], by["unlabelled", "gamma"]["licence"]) == (1, "CC0 1.0 (public domain)")
    assert by["labelled", "delta/images"]["licence"] is None
    assert str(tmp_path) not in json.dumps(sources)
    before = by["unlabelled", "alpha"]["hash"]
    assert describe_sources({"unlabelled": tiles})[0]["hash"] == before  # the same files, the same hash
    Image.new("RGB", (96, 96)).save(data / "alpha" / "images" / "alpha1.png")
    assert describe_sources({"unlabelled": tiles})[0]["hash"] != before


def test_a_trained_and_packaged_model_carries_its_sources_and_their_licences(tmp_path, capsys):
    data = data_root(tmp_path)
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("beta0", "beta1", "gamma0"):
        (pool / f"{name}.png").symlink_to(next((data / name[:-1] / "images").glob(f"{name}.png")))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--images", data / "alpha" / "images", "--labels", data / "alpha" / "labels", "--out", out,
                            "--steps", "2", *SMALL, "--set", "data.val=[alpha2]", "--set", "tune_postprocess=false",
                            "--unlabelled", pool, "--quiet", *IRCR], capsys)
    assert code == 0, err
    sources = load_checkpoint(out / "model.pt").meta["sources"]
    assert {(s["role"], s["dataset"], s["tiles"], s["licence"]) for s in sources} == {
        ("labelled", "alpha", 2, "CC BY 4.0"), ("validation", "alpha", 1, "CC BY 4.0"),
        ("unlabelled", "beta", 2, "CC BY-NC-SA 4.0"), ("unlabelled", "gamma", 1, "CC0 1.0 (public domain)")}
    assert load_checkpoint(out / "last.pt").meta["sources"] == sources
    assert str(tmp_path) not in json.dumps(sources)
    packaged = tmp_path / "packaged.pt"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "package_model.py"), str(out / "model.pt"), str(packaged),
                    "--root", str(tmp_path)], check=True, capture_output=True)
    meta = load_checkpoint(packaged).meta
    assert meta["sources"] == sources
    assert meta["data"]["licences"] == {"alpha": "CC BY 4.0", "beta": "CC BY-NC-SA 4.0", "gamma": "CC0 1.0 (public domain)"}
