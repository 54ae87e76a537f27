"""Issue 20 item 6 (benchmarks/experiments/item6.py): the unlabelled pool leaves out every tile another study scores on."""

from __future__ import annotations

import json

from benchmarks.experiments import adapt, item6, recipe


def fake_shared(root):
    """Empty image files named as the NuInsSeg and CryoNuSeg folders of ../shared/data."""
    names = {"nuinsseg-spleen": [f"human_spleen_{i:02d}" for i in range(1, 35)],
             "cryonuseg-frozen": [f"Human_{organ}_{i:02d}" for organ in ("AdrenalGland", "Larynx", "Mediastinum", "Pancreas", "Pleura",
                                                                          "Skin", "Testes", "Thymus", "ThyroidGland") for i in (1, 2, 3)][:28]}
    for folder, stems in names.items():
        (root / folder / "images").mkdir(parents=True)
        for stem in stems:
            (root / folder / "images" / f"{stem}.png").write_bytes(b"")
    return names


def test_the_pool_leaves_out_the_adapt_studys_test_and_val_tiles_and_the_recipes_held_out_tiles(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt, "SHARED", tmp_path / "shared")
    names = fake_shared(tmp_path / "shared")
    described = item6.build_pool(tmp_path / "pool")
    held_out = recipe.source_val([])
    linked = {p.stem for p in (tmp_path / "pool" / "images").iterdir()}
    assert linked == {s for d in described.values() for s in d["stems"]}
    for target, (recipe_key, licence) in item6.SOURCES.items():
        split = adapt.split(target)
        stems = set(described[target]["stems"])
        assert stems and stems <= set(names[adapt.TARGETS[target]["folder"]])
        assert not stems & (set(split["test"]) | set(split["val"]) | set(held_out[recipe_key][3]))
        assert stems == set(split["unlabelled"]) - set(held_out[recipe_key][3])
        assert described[target]["licence"] == licence
    assert set(described) == {"nuinsseg", "cryonuseg"}  # never CoNSeP
    assert all((tmp_path / "pool" / "images" / f"{s}.png").is_symlink() for s in linked)  # links, never copies
    assert json.loads((tmp_path / "pool" / "pool.json").read_text()) == described
