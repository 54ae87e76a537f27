"""Training: data split, crop sampling, the loop (supervised and full IRCR), resume, the CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import run_main as run_cli
from wsi_ircr.errors import UserError
from wsi_ircr.io.images import write_label_png
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.model.inference import Predictor, predict_maps_tensor
from wsi_ircr.train.config import DataConfig
from wsi_ircr.train.data import CropSampler, TileSet, load_train_data
from wsi_ircr.train.targets import hv_targets

TILE = 96
NUCLEUS, BACKGROUND = (90, 40, 130), (235, 190, 215)


@contextmanager
def ctrl_c_at(step: int):
    """Inside the block, ``Trainer.train_step`` raises KeyboardInterrupt (Ctrl-C) when it starts ``step``."""
    from wsi_ircr.train.loop import Trainer

    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupted)
        yield


def tile(seed: int, size: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB dark disks (radius 5-8 px, some touching) on pink, and their int32 instance map."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i in range(1, 9):
        r, c, radius = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(5, 8)
        labels[(np.hypot(rr - r, cc - c) <= radius) & (labels == 0)] = i
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    image[labels > 0] = NUCLEUS
    return image, labels


def write_tiles(root: Path, stems, with_labels: bool = True, seed: int = 0, size: int = TILE) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(stems):
        image, lab = tile(seed + k, size)
        Image.fromarray(image).save(images / f"{stem}.png")
        if with_labels:
            write_label_png(labels / f"{stem}.png", lab)
    return images, labels


@pytest.fixture
def dataset(tmp_path) -> dict[str, Path]:
    """Six labelled tiles t0..t5 and three unlabelled tiles u0..u2 as PNG files."""
    images, labels = write_tiles(tmp_path / "lab", [f"t{i}" for i in range(6)])
    unlabelled, _ = write_tiles(tmp_path / "unl", [f"u{i}" for i in range(3)], with_labels=False, seed=100)
    return {"images": images, "labels": labels, "unlabelled": unlabelled, "root": tmp_path}


# --- load_train_data ----------------------------------------------------------------------


def test_split_holds_out_validation_and_keeps_all_labels_by_default(dataset):
    data = load_train_data(DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), val=("t1", "t4")))
    assert data.val.stems == ["t1", "t4"] and len(data.val.labels) == 2
    assert data.labelled.stems == ["t0", "t2", "t3", "t5"]
    assert len(data.unlabelled) == 0 and data.unlabelled.labels is None
    image, labels = tile(2)
    np.testing.assert_array_equal(data.labelled.images[1], image)
    np.testing.assert_array_equal(data.labelled.labels[1], labels)
    assert data.labelled.labels[1].dtype == np.int32 and data.labelled.images[1].dtype == np.uint8
    described = data.describe()
    assert described["val"] == ["t1", "t4"]
    assert described["n_nuclei_labelled"] == sum(len(np.unique(tile(k)[1])) - 1 for k in (0, 2, 3, 5))


@pytest.mark.parametrize("labelled, fraction, n_lab", [(2, None, 2), (None, 0.5, 2), (None, 0.01, 1), (5, None, 5)])
def test_labelled_count_or_fraction_moves_the_rest_to_unlabelled(dataset, labelled, fraction, n_lab):
    cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), val=("t0",),
                     labelled=labelled, labelled_fraction=fraction)
    data = load_train_data(cfg)
    assert len(data.labelled) == n_lab and len(data.labelled.labels) == n_lab
    assert sorted(data.labelled.stems + data.unlabelled.stems) == ["t1", "t2", "t3", "t4", "t5"]
    assert "t0" not in data.labelled.stems + data.unlabelled.stems
    assert len(data.unlabelled.images) == 5 - n_lab and data.unlabelled.labels is None


def test_label_seed_decides_the_split_deterministically(dataset):
    def split(seed):
        cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), labelled=2, label_seed=seed)
        return tuple(load_train_data(cfg).labelled.stems)

    assert split(3) == split(3)
    assert len({split(seed) for seed in range(6)}) > 1


def test_include_restricts_the_pool_and_relative_paths_use_base_dir(dataset):
    cfg = DataConfig(images="lab/images", labels="lab/labels", include=("t2", "t3", "t4"), val=("t3",))
    data = load_train_data(cfg, base_dir=dataset["root"])
    assert data.labelled.stems == ["t2", "t4"] and data.val.stems == ["t3"]


def test_unlabelled_folder_is_added(dataset):
    cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), labelled=4,
                     unlabelled=str(dataset["unlabelled"]), val=("t5",))
    data = load_train_data(cfg)
    assert len(data.labelled) == 4
    assert data.unlabelled.stems[-3:] == ["u0", "u1", "u2"] and len(data.unlabelled) == 4
    np.testing.assert_array_equal(data.unlabelled.images[-1], tile(102)[0])


@pytest.mark.parametrize("field", ["val", "include"])
def test_missing_stems_are_user_errors(dataset, field):
    cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), **{field: ("t1", "nope")})
    with pytest.raises(UserError) as e:
        load_train_data(cfg)
    assert f"data.{field}" in str(e.value) and "'nope'" in str(e.value)


def test_bad_splits_are_user_errors(dataset):
    images, labels = str(dataset["images"]), str(dataset["labels"])
    with pytest.raises(UserError, match="data.labelled=7"):
        load_train_data(DataConfig(images=images, labels=labels, labelled=7))
    with pytest.raises(UserError, match="no labelled tiles left"):
        load_train_data(DataConfig(images=images, labels=labels, val=tuple(f"t{i}" for i in range(6))))
    with pytest.raises(UserError, match="data.images"):
        load_train_data(DataConfig(labels=labels))


def test_images_without_labels_are_user_errors(dataset):
    write_tiles(dataset["root"] / "lab", ["extra"], with_labels=False)
    with pytest.raises(UserError) as e:
        load_train_data(DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"])))
    assert "extra" in str(e.value) and "no label map" in str(e.value)


def test_label_map_of_the_wrong_size_is_a_user_error(dataset):
    write_label_png(dataset["labels"] / "t3.png", np.zeros((TILE, TILE + 4), np.int32))
    with pytest.raises(UserError, match="t3.png"):
        load_train_data(DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"])))


# --- CropSampler ----------------------------------------------------------------------------


def labelled_tiles(n: int = 3, size: int = TILE) -> TileSet:
    pairs = [tile(k, size) for k in range(n)]
    return TileSet([f"t{k}" for k in range(n)], [p[0] for p in pairs], [p[1] for p in pairs])


def test_crop_sampler_shapes_and_dtypes():
    batch = CropSampler(labelled_tiles(), 32, np.random.default_rng(0)).sample(5)
    assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["labels"].shape == (5, 32, 32) and batch["labels"].dtype == np.int32
    assert batch["hv"].shape == (5, 2, 32, 32) and batch["hv"].dtype == np.float32
    assert batch["image"].flags.c_contiguous
    unlabelled = TileSet(["u"], [tile(7)[0]], None)
    batch = CropSampler(unlabelled, 48, np.random.default_rng(0)).sample(3)
    assert set(batch) == {"image"} and batch["image"].shape == (3, 48, 48, 3)


def test_crops_keep_image_labels_and_hv_aligned():
    batch = CropSampler(labelled_tiles(), 32, np.random.default_rng(1)).sample(24)
    dark = batch["image"].sum(-1) < sum(BACKGROUND) - 100
    np.testing.assert_array_equal(dark, batch["labels"] > 0)  # same geometric transform
    hv, labels = batch["hv"], batch["labels"]
    assert np.abs(hv).max() <= 1.0 and (labels > 0).any()
    assert not (hv * (labels == 0)[:, None]).any()  # background has no offsets
    assert (np.abs(hv).sum(1) > 0)[labels > 0].mean() > 0.95  # foreground carries offsets
    for crop_labels, crop_hv in zip(labels, hv):  # nuclei inside the crop: targets of the crop itself
        inner = hv_targets(crop_labels)
        for i in np.unique(crop_labels)[1:]:
            mask = crop_labels == i
            rows, cols = np.nonzero(mask)
            if rows.min() > 0 and cols.min() > 0 and rows.max() < 31 and cols.max() < 31:
                np.testing.assert_allclose(crop_hv[:, mask], inner[:, mask], atol=1e-5)


def test_nuclei_cut_by_the_crop_keep_the_targets_of_their_whole_shape():
    """HV targets come from the crop with a margin: a half-visible nucleus is not re-centred."""
    batch = CropSampler(labelled_tiles(), 32, np.random.default_rng(2)).sample(24)
    differs = 0
    for crop_labels, crop_hv in zip(batch["labels"], batch["hv"]):
        differs += int(not np.allclose(crop_hv, hv_targets(crop_labels), atol=1e-5))
    assert differs > 0


def test_crop_sampler_is_deterministic_per_rng():
    tiles = labelled_tiles()
    a = CropSampler(tiles, 32, np.random.default_rng(5)).sample(4)
    b = CropSampler(tiles, 32, np.random.default_rng(5)).sample(4)
    c = CropSampler(tiles, 32, np.random.default_rng(6)).sample(4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


def test_tiles_smaller_than_the_crop_are_user_errors():
    tiles = labelled_tiles(2)
    tiles.images[1], tiles.labels[1] = tile(1, size=40)
    with pytest.raises(UserError) as e:
        CropSampler(tiles, 48, np.random.default_rng(0))
    assert "t1" in str(e.value) and "crop_px" in str(e.value)
    with pytest.raises(ValueError):
        CropSampler(TileSet(), 32, np.random.default_rng(0))


# --- the train command -----------------------------------------------------------------------

SMALL = ["--device", "cpu", "--set", "crop_px=32", "--set", "batch_size=2", "--set", "unlabelled_batch_size=2",
         "--set", "threads=1", "--set", "val_every=2", "--set", "log_every=1", "--set", "lr=0.001"]
IRCR = ["--set", "mt_weight=1", "--set", "miac_weight=10", "--set", "piac_weight=1", "--set", "rampup_steps=0",
        "--set", "postprocess.min_area_um2=0.5", "--set", "postprocess.min_marker_um2=0.125"]


def train_argv(dataset, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--images", str(dataset["images"]), "--labels", str(dataset["labels"]), "--out", str(out),
            "--steps", str(steps), *SMALL, "--set", "data.val=[t5]", *extra]


def assert_run_folder(out: Path) -> dict:
    for name in ("model.pt", "best.pt", "last.pt", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial files
    return json.loads((out / "metrics.json").read_text())


def test_train_supervised_end_to_end(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(train_argv(dataset, out, 4, "--set", "tune_postprocess=true"), capsys)
    assert code == 0, err
    metrics = assert_run_folder(out)
    assert metrics["steps"] == 4 and metrics["data"]["val"] == ["t5"] and len(metrics["data"]["labelled"]) == 5
    assert [h["step"] for h in metrics["history"]] == [2, 4] and all(0 <= h["aji"] <= 1 for h in metrics["history"])
    assert str(out / "model.pt") in stdout
    model = load_checkpoint(out / "model.pt")
    assert model.arch == "lite-s" and model.mpp == 0.25 and model.train_state is None
    assert model.priors is not None and model.priors["features"]
    assert model.meta["config"]["steps"] == 4 and model.meta["config"]["crop_px"] == 32
    assert [h["step"] for h in model.meta["metrics"]["history"]] == [2, 4]
    assert "val_aji_tuned_postprocess" in model.meta["metrics"]
    model.build()
    last = load_checkpoint(out / "last.pt")
    assert last.train_state["step"] == 4
    assert "step 4/4 sup=" in err and "miac" not in err and "val step 4" in err


def test_train_at_half_the_tiles_resolution(dataset, tmp_path, capsys):
    """mpp=0.5 on 0.25 um/px tiles: crops come from tiles resampled to 0.5, the checkpoint runs at
    0.5, and validation scores whole tiles on the labels' 0.25 grid."""
    data = load_train_data(DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), val=("t5",)), model_mpp=0.5)
    assert data.labelled.images[0].shape == (TILE // 2, TILE // 2, 3) and data.labelled.labels[0].shape == (TILE // 2, TILE // 2)
    assert data.val.images[0].shape == (TILE, TILE, 3)
    out = tmp_path / "run"
    code, _, err = run_cli(train_argv(dataset, out, 2, "--set", "mpp=0.5", "--set", "tune_postprocess=true"), capsys)
    assert code == 0, err
    model = load_checkpoint(out / "model.pt")
    assert model.mpp == 0.5 and model.meta["config"]["data"]["mpp"] == 0.25
    assert 0.0 <= model.meta["metrics"]["val_aji_tuned_postprocess"] <= 1.0
    code, _, err = run_cli(train_argv(dataset, tmp_path / "bad", 2, "--set", "mpp=0"), capsys)
    assert code == 2 and "mpp" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(train_argv(dataset, tmp_path / "tiny", 2, "--set", "mpp=4"), capsys)  # 96 px tiles -> 6 px
    assert code == 2 and "smaller than crop_px" in err


@pytest.mark.parametrize("piac_mode", ["pseudo_label", "consistency"])
def test_train_full_ircr_end_to_end(dataset, tmp_path, capsys, piac_mode):
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 3, "--unlabelled", str(dataset["unlabelled"]), "--set", "data.labelled=2",
                      "--set", "tune_postprocess=false", "--set", f"piac_mode={piac_mode}", *IRCR)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    metrics = assert_run_folder(out)
    assert len(metrics["data"]["labelled"]) == 2 and len(metrics["data"]["unlabelled"]) == 3 + 3
    model = load_checkpoint(out / "model.pt")
    assert model.priors is not None and model.postprocess.min_area_um2 == 0.5
    assert model.meta["config"]["miac_weight"] == 10.0 and model.meta["config"]["piac_mode"] == piac_mode
    for term in ("sup=", "mt=", "miac=", "piac="):
        assert term in err, term
    # the shipped network is the teacher, an EMA of the student: the two differ
    last = load_checkpoint(out / "last.pt")
    teacher = last.train_state["teacher"]
    assert any(not torch.equal(teacher[k], v) for k, v in last.model_state.items() if v.is_floating_point())


def _weights(path: Path) -> tuple[dict, dict]:
    """Student and teacher state of a resumable checkpoint."""
    ckpt = load_checkpoint(path)
    return ckpt.model_state, ckpt.train_state["teacher"]


def _history_steps(path: Path) -> list[int]:
    return [h["step"] for h in load_checkpoint(path).meta["metrics"]["history"]]


def test_resume_after_interruption_equals_an_uninterrupted_run(dataset, tmp_path, capsys):

    def argv(out: Path, *extra: str) -> list[str]:
        return train_argv(dataset, out, 6, "--unlabelled", str(dataset["unlabelled"]), "--set", "tune_postprocess=false",
                          "--quiet", *IRCR, *extra)

    code, _, err = run_cli(argv(tmp_path / "full"), capsys)
    assert code == 0, err

    out = tmp_path / "resumed"
    with ctrl_c_at(3):  # during step 4; last.pt holds step 2 (val_every=2)
        code, _, err = run_cli(argv(out), capsys)
    assert code == 130 and err.strip() == "error: interrupted"
    assert load_checkpoint(out / "last.pt").train_state["step"] == 2 and not (out / "model.pt").exists()

    code, _, err = run_cli(argv(out), capsys)  # neither --resume nor --overwrite
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(argv(out, "--resume", "--set", "lr=0.002"), capsys)
    assert code == 2 and "different config" in err
    code, _, err = run_cli(argv(out, "--resume"), capsys)
    assert code == 0, err

    for a, b in zip(_weights(tmp_path / "full" / "last.pt"), _weights(out / "last.pt")):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    full, resumed = load_checkpoint(tmp_path / "full" / "model.pt"), load_checkpoint(out / "model.pt")
    for key in full.model_state:
        assert torch.equal(full.model_state[key], resumed.model_state[key]), key
    assert _history_steps(tmp_path / "full" / "model.pt") == _history_steps(out / "model.pt") == [2, 4, 6]


def test_a_resumed_run_adds_up_the_training_seconds_of_every_process(dataset, tmp_path, capsys):
    from wsi_ircr.model.checkpoint import save_checkpoint

    out = tmp_path / "run"
    argv = train_argv(dataset, out, 4, "--set", "tune_postprocess=false", "--set", "checkpoint_every=1", "--quiet")
    with ctrl_c_at(2):
        assert run_cli(argv, capsys)[0] == 130
    last = load_checkpoint(out / "last.pt")
    assert last.train_state["step"] == 2 and last.train_state["seconds"] > 0
    last.train_state["seconds"] = 1e6  # as if the first process had trained for 11.6 days
    save_checkpoint(out / "last.pt", last)
    code, _, err = run_cli(argv + ["--resume"], capsys)
    assert code == 0, err
    total = json.loads((out / "metrics.json").read_text())["train_seconds"]
    assert total > 1e6 and load_checkpoint(out / "model.pt").meta["metrics"]["train_seconds"] == total
    assert load_checkpoint(out / "last.pt").train_state["seconds"] > 1e6


def test_overwrite_starts_over_and_keeps_foreign_files(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 2, "--set", "tune_postprocess=false", "--quiet")
    assert run_cli(argv, capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert load_checkpoint(out / "last.pt").train_state["step"] == 2


@pytest.mark.parametrize(
    "case, words",
    [
        ("resume_without_last", ["nothing to resume"]),
        ("unknown_set_key", ["'stepz'"]),
        ("bad_set_value", ["crop_px"]),
        ("missing_images", ["not found"]),
        ("missing_labels", ["label maps folder not found"]),
        ("no_gpu", ["--device cuda"]),
        ("no_unlabelled", ["no unlabelled tiles"]),
        ("missing_config", ["config file not found"]),
        ("out_is_a_file", ["not a folder"]),
    ],
)
def test_train_cli_errors_are_one_line(dataset, tmp_path, capsys, case, words):
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 2)
    if case == "resume_without_last":
        argv += ["--resume"]
    elif case == "unknown_set_key":
        argv += ["--set", "stepz=3"]
    elif case == "bad_set_value":
        argv += ["--set", "crop_px=30"]
    elif case == "missing_images":
        argv[argv.index("--images") + 1] = str(tmp_path / "absent")
    elif case == "missing_labels":
        argv[argv.index("--labels") + 1] = str(tmp_path / "absent")
    elif case == "no_gpu":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available")
        argv += ["--device", "cuda"]
    elif case == "no_unlabelled":
        argv += ["--set", "miac_weight=1"]
    elif case == "missing_config":
        argv += ["--config", str(tmp_path / "absent.yaml")]
    elif case == "out_is_a_file":
        out.write_text("x")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]
    if case != "out_is_a_file":
        assert not (out / "last.pt").exists()


def test_train_config_file_paths_resolve_against_the_file(dataset, tmp_path, capsys):
    config = dataset["root"] / "cfg" / "train.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  images: ../lab/images\n  labels: ../lab/labels\n  val: [t0]\nsteps: 2\n"
                      "tune_postprocess: false\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", str(config), "--out", str(out), "--quiet", *SMALL], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "model.pt").meta["data"]["val"] == ["t0"]


def test_train_command_module_imports_no_torch():
    import subprocess

    code = "import sys, wsi_ircr.cli.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


class _OracleNet(torch.nn.Module):
    """Returns fixed NP logits and HV maps of a known instance map, whatever the input."""

    def __init__(self, labels: np.ndarray, hv_scale: float):
        super().__init__()
        fg = torch.from_numpy(labels > 0).float()
        self.np_logits = torch.stack([-8 * fg + 4, 8 * fg - 4])[None]
        self.hv = hv_scale * torch.from_numpy(hv_targets(labels))[None]

    def forward(self, x):
        return {"np": self.np_logits.expand(len(x), -1, -1, -1), "hv": self.hv.expand(len(x), -1, -1, -1)}


def test_tune_postprocess_tries_only_the_given_marker_radii():
    from wsi_ircr.metrics import aji
    from wsi_ircr.model.postprocess import PostProcessConfig, instances_from_maps
    from wsi_ircr.train.tune import tune_postprocess

    labels = np.zeros((64, 64), np.int32)
    rr, cc = np.mgrid[:64, :64]
    for i, (r, c) in enumerate([(20, 20), (20, 34), (45, 40)], start=1):  # 1 and 2 touch
        labels[(rr - r) ** 2 + (cc - c) ** 2 <= 64] = i
    net = _OracleNet(labels, hv_scale=0.5)  # a soft HV map: large radii merge touching nuclei
    image = np.zeros((64, 64, 3), np.uint8)
    base = PostProcessConfig(min_marker_um2=0.125, min_area_um2=0.5)
    predictor = Predictor.from_network(net, 0.25, base, torch.device("cpu"))
    for radii in [(0.45,), (0.1, 0.3), (0.3, 0.6)]:
        best, score = tune_postprocess(predictor, [image], [labels], radii, mpp=0.25)
        assert best.marker_radius in radii and best.min_marker_um2 == 0.125
        prob, hv = predict_maps_tensor(net, torch.zeros(1, 3, 64, 64))
        assert score == pytest.approx(aji(labels, instances_from_maps(prob[0].numpy(), hv[0].numpy(), best, mpp=0.25)))
        others = [aji(labels, instances_from_maps(prob[0].numpy(), hv[0].numpy(), dataclasses.replace(best, marker_radius=r), mpp=0.25))
                  for r in radii]
        assert score == pytest.approx(max(others))
    best, score = tune_postprocess(predictor, [image], [labels], (0.3, 0.6), mpp=0.25)
    assert best.marker_radius == 0.3 and score > 0.9


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_labelled_strength_augments_what_the_student_sees(dataset, tmp_path, strength):
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.loop import Trainer, _to_tensor

    data_cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), val=("t5",))
    cfg = TrainConfig(data=data_cfg, device="cpu", crop_px=32, batch_size=2, unlabelled_batch_size=0, labelled_strength=strength)
    trainer = Trainer(cfg, tmp_path, load_train_data(data_cfg), priors=None)
    seen = []
    trainer.student.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = trainer.labelled.sample(2)
    loss = trainer.supervised_loss(batch)
    raw = _to_tensor(batch["image"], torch.device("cpu"))
    assert torch.isfinite(loss) and seen[0].shape == raw.shape
    assert 0.0 <= float(seen[0].min()) and float(seen[0].max()) <= 1.0
    assert torch.equal(seen[0], raw) == (strength == 0.0)


def test_bn_stats_labelled_keeps_the_unlabelled_crops_out_of_the_shipped_batchnorm_statistics(dataset, tmp_path):
    """The same weights either way (training normalises with batch statistics); with
    ``bn_stats: labelled`` the teacher's running statistics are those of the labelled passes only."""
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.loop import Trainer, frozen_bn_stats

    data_cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), unlabelled=str(dataset["unlabelled"]),
                          val=("t5",))
    trainers = {}
    for bn_stats in ("all", "labelled"):
        cfg = TrainConfig(data=data_cfg, device="cpu", crop_px=32, batch_size=2, unlabelled_batch_size=2, mt_weight=1.0,
                          rampup_steps=0, bn_stats=bn_stats)
        trainers[bn_stats] = Trainer(cfg, tmp_path, load_train_data(data_cfg), priors=None)
        trainers[bn_stats].train_step()
    params = [dict(t.student.named_parameters()) for t in trainers.values()]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    teachers = [t.teacher.state_dict() for t in trainers.values()]
    means = [k for k in teachers[0] if k.endswith("running_mean")]
    assert means and any(not torch.equal(teachers[0][k], teachers[1][k]) for k in means)

    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    with frozen_bn_stats(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3)) and bn.momentum == 0.1
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # normalised by the batch's own statistics
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3))


@pytest.mark.parametrize("bf16", [None, False, True])
def test_bf16_autocast_follows_the_config_or_the_cpu(dataset, tmp_path, monkeypatch, bf16):
    """``bf16: null`` trains in bf16 autocast where it is native; the weights stay fp32 either way."""
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.loop import Trainer

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    data_cfg = DataConfig(images=str(dataset["images"]), labels=str(dataset["labels"]), val=("t5",))
    cfg = TrainConfig(data=data_cfg, device="cpu", crop_px=32, batch_size=2, unlabelled_batch_size=0, bf16=bf16)
    trainer = Trainer(cfg, tmp_path, load_train_data(data_cfg), priors=None)
    assert trainer.amp is (bf16 is not False)
    dtypes = []
    trainer.student.np_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    record = trainer.train_step()
    assert np.isfinite(record["loss"]) and dtypes == [torch.bfloat16 if trainer.amp else torch.float32]
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())


# --- several labelled sources ----------------------------------------------------------------


def extra_source(root: Path, kind: str) -> dict:
    """Three 64 px tiles at 0.5 um/px: instance maps or binary masks, an ignore mask on the first."""
    images, labels = write_tiles(root / kind, ["x0", "x1", "x2"], seed=50, size=64)
    if kind == "binary":
        for path in labels.iterdir():
            write_label_png(path, (np.array(Image.open(path)) > 0).astype(np.uint16) * 255)
    ignore = root / kind / "ignore"
    ignore.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :20] = 255
    Image.fromarray(mask).save(ignore / "x0.png")
    return {"images": str(images), "labels": str(labels), "ignore": str(ignore), "kind": kind, "mpp": 0.5, "exclude": ["x2"]}


def test_extra_sources_are_resampled_masked_and_weighted_by_area(dataset):
    from wsi_ircr.config import from_dict

    cfg = from_dict(DataConfig, {"images": str(dataset["images"]), "labels": str(dataset["labels"]), "val": ["t5"],
                                 "extra": [extra_source(dataset["root"], "binary")]})
    data = load_train_data(cfg)
    assert data.labelled.stems == ["t0", "t1", "t2", "t3", "t4", "x0", "x1"]  # x2 excluded
    assert data.labelled.binary == [False] * 5 + [True] * 2
    assert data.labelled.images[-1].shape == (128, 128, 3)  # 64 px at 0.5 -> 128 px at 0.25
    assert set(np.unique(data.labelled.labels[-1])) == {0, 1}  # binary: foreground only
    ignore = data.labelled.ignore[5]
    assert ignore.shape == (128, 128) and ignore[:, :40].all() and not ignore[:, 40:].any()
    assert data.labelled.ignore[6] is None and data.labelled.ignore[0] is None
    sampler = CropSampler(data.labelled, 32, np.random.default_rng(0))
    areas = np.array([96 * 96] * 5 + [128 * 128] * 2, float)
    np.testing.assert_allclose(sampler.tile_p, areas / areas.sum())
    batch = sampler.sample(64)
    assert batch["valid"].shape == (64, 32, 32) and batch["hv_valid"].shape == (64,)
    assert 0 < batch["hv_valid"].sum() < 64 and (batch["valid"] == 0).any()
    for image, valid, hv_ok in zip(batch["image"], batch["valid"], batch["hv_valid"]):
        if (valid == 0).any():  # only the binary tile x0 has an ignore mask, and it moved with the image
            assert hv_ok == 0


def test_instance_loss_ignores_masked_pixels_and_hv_of_binary_crops():
    from wsi_ircr.train.losses import instance_loss

    torch.manual_seed(0)
    out = {"np": torch.randn(2, 2, 16, 16), "hv": torch.tanh(torch.randn(2, 2, 16, 16))}
    target_np = (torch.rand(2, 16, 16) > 0.5).long()
    target_hv = torch.rand(2, 2, 16, 16) * 2 - 1
    weight = torch.ones(2, 16, 16)
    weight[:, :, :8] = 0
    hv_weight = weight.clone()
    hv_weight[1] = 0
    base = instance_loss(out, target_np, target_hv, weight, hv_weight)
    changed_np, changed_hv = target_np.clone(), target_hv.clone()
    changed_np[:, :, :8] = 1 - changed_np[:, :, :8]  # only ignored pixels change
    changed_hv[1] = -changed_hv[1]  # HV of the binary crop changes
    assert torch.allclose(instance_loss(out, changed_np, changed_hv, weight, hv_weight), base)
    assert not torch.allclose(instance_loss(out, target_np, changed_hv, weight, weight), base)


def test_train_with_a_binary_source_end_to_end(dataset, tmp_path, capsys):
    import yaml

    config = tmp_path / "sources.yaml"
    config.write_text(yaml.safe_dump({"data": {"extra": [extra_source(tmp_path, "binary"), extra_source(tmp_path, "instances")]}}))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", str(config), *train_argv(dataset, out, 2)[1:]], capsys)
    assert code == 0, err
    metrics = assert_run_folder(out)
    assert metrics["data"]["labelled"][-4:] == ["x0", "x1", "x0", "x1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"extra": [{**extra_source(tmp_path / "b", "binary"), "exclude": ["nope"]}]}}))
    code, _, err = run_cli(["train", "--config", str(bad), *train_argv(dataset, tmp_path / "bad", 2)[1:]], capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_scale_jitter_zooms_crops_and_keeps_labels_aligned():
    tiles = labelled_tiles()
    plain = CropSampler(tiles, 32, np.random.default_rng(3)).sample(16)
    zoomed = CropSampler(tiles, 32, np.random.default_rng(3), scale_jitter=0.3).sample(16)
    assert zoomed["image"].shape == plain["image"].shape
    areas = lambda b: np.mean([np.bincount(lab.ravel())[1:].max(initial=0) for lab in b["labels"]])  # noqa: E731
    assert areas(zoomed) != areas(plain)
    for image, labels in zip(zoomed["image"], zoomed["labels"]):  # nuclei pixels are dark, background pink
        if (labels > 0).sum() > 20:
            assert image[..., 1][labels > 0].mean() < image[..., 1][labels == 0].mean() - 40
    big = CropSampler(labelled_tiles(size=256), 192, np.random.default_rng(0), scale_jitter=0.3).sample(4)
    assert big["image"].shape == (4, 192, 192, 3) and big["hv"].shape == (4, 2, 192, 192)
    with pytest.raises(ValueError, match="scale_jitter"):
        CropSampler(tiles, 32, np.random.default_rng(0), scale_jitter=1.0)


def test_miac_variants_train_end_to_end_and_the_automatic_weight_resumes(dataset, tmp_path, capsys):
    """Logit consistency without HV, per-instance normalisation, a confidence gate, a later start
    and the automatic weight: MIAC is absent before its start, then logged with its weight, and
    the weight is part of the resumable state."""
    out = tmp_path / "run"
    argv = train_argv(dataset, out, 4, "--unlabelled", str(dataset["unlabelled"]), "--set", "tune_postprocess=false",
                      *IRCR, "--set", "miac_np=logit", "--set", "miac_hv=false", "--set", "miac_instance_norm=true",
                      "--set", "miac_confidence=0.2", "--set", "miac_grad_ratio=0.5", "--set", "miac_start_step=2",
                      "--set", "miac_scale_every=1")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    lines = {line.split()[1]: line for line in err.splitlines() if line.startswith("step ")}
    assert "mt=" in lines["1/4"] and "miac" not in lines["1/4"] and "miac" not in lines["2/4"]
    assert "miac=" in lines["3/4"] and "miac_scale=" in lines["3/4"]
    state = load_checkpoint(out / "last.pt").train_state
    assert "miac_scale" in state
    assert load_checkpoint(out / "model.pt").meta["config"]["miac_np"] == "logit"
