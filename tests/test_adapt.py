"""Starting training from a checkpoint (``train --init``) and ``wsi-ircr adapt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import SMALL, ctrl_c_at, run_cli, tile, write_tiles

from wsi_ircr.config import resolve_config
from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import Checkpoint, file_hash, load_checkpoint, save_checkpoint
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig
from wsi_ircr.train.config import TrainConfig, adapt_config_path, complete_from_init
from wsi_ircr.train.data import load_train_data
from wsi_ircr.train.loop import Trainer, start_priors
from wsi_ircr.train.piac import MorphologyPriors

REPO = Path(__file__).resolve().parents[1]
POST = PostProcessConfig(min_area_um2=0.5, min_marker_um2=0.125)
TINY = [*SMALL, "--set", "checkpoint_every=2"]


def start_checkpoint(path: Path, with_priors: bool = True, seed: int = 5) -> Path:
    """A lite-s checkpoint at 0.25 um/px with random weights and (optionally) PIAC priors of 3 tiles."""
    torch.manual_seed(seed)
    priors = None
    if with_priors:
        tiles = [tile(50 + k) for k in range(3)]
        priors = MorphologyPriors.fit([lab for _, lab in tiles], [im for im, _ in tiles]).to_dict()
    save_checkpoint(path, Checkpoint(arch="lite-s", model_state=build_model("lite-s").state_dict(), mpp=0.25,
                                     postprocess=POST, priors=priors, meta={"note": "test start"}))
    return path


@pytest.fixture
def cohort(tmp_path) -> dict[str, Path]:
    """Unlabelled tiles u0..u3, labelled tiles t0..t2 and a starting checkpoint with priors."""
    unlabelled, _ = write_tiles(tmp_path / "unl", [f"u{i}" for i in range(4)], with_labels=False, seed=100)
    images, labels = write_tiles(tmp_path / "lab", [f"t{i}" for i in range(3)])
    return {"unlabelled": unlabelled, "images": images, "labels": labels,
            "model": start_checkpoint(tmp_path / "start.pt"), "root": tmp_path}


def adapt_argv(cohort, out: Path, steps: int, *extra: str) -> list[str]:
    return ["adapt", "--unlabelled", str(cohort["unlabelled"]), "--mpp", "0.25", "--model", str(cohort["model"]),
            "--out", str(out), "--steps", str(steps), *TINY, *extra]


# --- start from a checkpoint ------------------------------------------------------------------


def test_init_decides_arch_mpp_and_postprocess():
    bundled = load_checkpoint()
    cfg = resolve_config(TrainConfig, None, ["postprocess.marker_radius=0.3"], {"init": "bundled"},
                         complete=lambda data: complete_from_init(data, Path(".")))
    assert (cfg.arch, cfg.model_mpp, cfg.postprocess) == (bundled.arch, bundled.mpp, bundled.postprocess)
    assert TrainConfig().arch != bundled.arch  # the checkpoint, not the default, decided it


@pytest.mark.parametrize("override, key", [("arch=lite-m", "arch"), ("mpp=0.5", "mpp"),
                                           ("postprocess.np_threshold=0.3", "postprocess.np_threshold")])
def test_init_mismatch_with_an_explicit_config_is_one_error(cohort, override, key):
    with pytest.raises(UserError) as e:
        resolve_config(TrainConfig, None, [override], {"init": str(cohort["model"])},
                       complete=lambda data: complete_from_init(data, Path(".")))
    message = str(e.value)
    assert key in message and "init" in message and "\n" not in message


def test_student_and_teacher_start_from_the_checkpoint(cohort, tmp_path):
    start = load_checkpoint(cohort["model"])
    cfg = TrainConfig(init=str(cohort["model"]), arch="lite-s", mt_weight=1.0, crop_px=32, device="cpu")
    data = load_train_data(cfg.data.__class__(unlabelled=str(cohort["unlabelled"])))
    trainer = Trainer(cfg, tmp_path, data, start.priors, start)
    for net in (trainer.student, trainer.teacher):
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in start.model_state.items())
    fresh = Trainer(cfg, tmp_path, data, start.priors, None)
    assert not all(torch.equal(fresh.student.state_dict()[k], v) for k, v in start.model_state.items())
    assert trainer.labelled is None and trainer.unlabelled is not None
    record = trainer.train_step()
    assert record["sup"] == 0.0 and record["mt"] > 0 and trainer.step == 1
    moved = trainer.student.state_dict()
    assert not all(torch.equal(moved[k], v) for k, v in start.model_state.items() if v.is_floating_point())


def test_priors_come_from_the_checkpoint_without_labels_and_from_labels_with_them(cohort, tmp_path):
    start = load_checkpoint(cohort["model"])
    cfg = TrainConfig(init=str(cohort["model"]), mt_weight=1.0, piac_weight=1.0)
    unlabelled_only = load_train_data(cfg.data.__class__(unlabelled=str(cohort["unlabelled"])))
    assert start_priors(unlabelled_only, start, cfg) == start.priors
    labelled = load_train_data(cfg.data.__class__(images=str(cohort["images"]), labels=str(cohort["labels"])))
    fitted = start_priors(labelled, start, cfg)
    assert fitted != start.priors and MorphologyPriors.from_dict(fitted).features == MorphologyPriors.from_dict(start.priors).features
    bare = load_checkpoint(start_checkpoint(tmp_path / "bare.pt", with_priors=False))
    with pytest.raises(UserError, match="priors"):
        start_priors(unlabelled_only, bare, cfg)


def test_the_bundled_model_carries_piac_priors():
    bundled = load_checkpoint()
    priors = MorphologyPriors.from_dict(bundled.priors)
    assert "area" in priors.features and all(d.n > 1000 for d in priors.densities)


def test_adapt_configs_exist_for_every_method_and_share_one_base():
    from wsi_ircr.cli.adapt import METHODS

    for method in METHODS:
        cfg = resolve_config(TrainConfig, adapt_config_path(method))
        assert cfg.init == "bundled" and cfg.bf16 is None  # auto: fp32 where bf16 is not native
        assert cfg.semi_supervised == (method != "supervised")
    assert (REPO / "configs" / "adapt").resolve() == adapt_config_path("ircr").parent


# --- wsi-ircr adapt ---------------------------------------------------------------------------


def test_adapt_tiles_end_to_end_with_lineage_and_no_absolute_paths(cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(cohort["root"])
    out = tmp_path / "adapted"
    code, stdout, err = run_cli(adapt_argv(cohort, out, 3, "--method", "ircr"), capsys)
    assert code == 0, err
    assert "data: 0 labelled, 4 unlabelled, 0 validation tiles" in err and "piac=" in err and "miac=" in err
    model = load_checkpoint(out / "model.pt")
    lineage = model.meta["lineage"]
    assert {k: lineage["init"][k] for k in ("name", "hash")} == {"name": "start.pt", "hash": file_hash(cohort["model"])}
    assert lineage["steps"] == 3 and lineage["method"] == "ircr"
    assert lineage["data"]["unlabelled_tiles"] == 4 and lineage["data"]["labelled_tiles"] == 0
    assert model.priors == load_checkpoint(cohort["model"]).priors and model.arch == "lite-s" and model.postprocess == POST
    assert str(tmp_path) not in repr(model.meta)
    assert model.meta["config"]["data"]["unlabelled"] == "unl/images"
    start = load_checkpoint(cohort["model"]).model_state
    assert not all(torch.equal(model.model_state[k], v) for k, v in start.items() if v.is_floating_point())
    assert "model:" in stdout and "step 3" in stdout
    code, stdout, err = run_cli(["evaluate", "--images", str(cohort["images"]), "--labels", str(cohort["labels"]),
                                 "--model", str(out / "model.pt"), "--quiet"], capsys)
    assert code == 0, err
    assert "mean" in stdout


def test_adapt_with_a_few_labels_fits_priors_and_validates(cohort, tmp_path, capsys):
    out = tmp_path / "adapted"
    argv = adapt_argv(cohort, out, 2, "--images", str(cohort["images"]), "--labels", str(cohort["labels"]),
                      "--set", "data.val=[t2]")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "data: 2 labelled, 4 unlabelled, 1 validation tiles" in err and "val AJI" in stdout
    model = load_checkpoint(out / "model.pt")
    assert model.meta["lineage"]["data"]["labelled_tiles"] == 2 and model.meta["lineage"]["method"] == "ircr"  # default with labels
    assert model.priors != load_checkpoint(cohort["model"]).priors


def test_default_method_is_ircr_with_priors_else_mean_teacher_with_a_one_line_notice(cohort, tmp_path, capsys):
    code, _, err = run_cli(adapt_argv(cohort, tmp_path / "with_priors", 1), capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "with_priors" / "model.pt").meta["lineage"]["method"] == "ircr"
    assert "priors" not in err
    bare = start_checkpoint(tmp_path / "bare.pt", with_priors=False)
    argv = adapt_argv(cohort, tmp_path / "bare", 1, "--quiet")
    argv[argv.index(str(cohort["model"]))] = str(bare)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "bare" / "model.pt").meta["lineage"]["method"] == "mean_teacher"
    assert len(err.strip().splitlines()) == 1 and "no morphology priors" in err and "mean_teacher" in err
    code, _, err = run_cli(argv[:-1] + ["--images", str(cohort["images"]), "--labels", str(cohort["labels"]), "--overwrite"], capsys)
    assert code == 0, err  # labelled instance tiles give PIAC its priors: IRCR again
    assert load_checkpoint(tmp_path / "bare" / "model.pt").meta["lineage"]["method"] == "ircr"


def test_mt_piac_is_ircr_without_miac(cohort, tmp_path, capsys):
    code, _, err = run_cli(adapt_argv(cohort, tmp_path / "mt_piac", 2, "--method", "mt_piac"), capsys)
    assert code == 0, err
    assert "piac=" in err and "miac=" not in err
    adapted = load_checkpoint(tmp_path / "mt_piac" / "model.pt")
    assert adapted.meta["lineage"]["method"] == "mt_piac"
    assert adapted.meta["config"]["miac_weight"] == 0 and adapted.meta["config"]["piac_weight"] > 0


def test_a_model_adapted_twice_keeps_the_whole_chain(cohort, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(adapt_argv(cohort, first, 1, "--quiet"), capsys)[0] == 0
    argv = adapt_argv(cohort, second, 1, "--quiet")
    argv[argv.index(str(cohort["model"]))] = str(first / "model.pt")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    once, twice = load_checkpoint(first / "model.pt"), load_checkpoint(second / "model.pt")
    assert twice.meta["lineage"]["init"]["hash"] == file_hash(first / "model.pt")
    assert twice.meta["lineage"]["init"]["lineage"] == once.meta["lineage"]  # back to start.pt
    assert twice.meta["lineage"]["init"]["sources"] == once.meta["sources"]
    assert twice.meta["lineage"]["init"]["lineage"]["init"]["hash"] == file_hash(cohort["model"])


def test_adapt_takes_a_bundled_model_by_name(cohort, tmp_path, capsys):
    argv = adapt_argv(cohort, tmp_path / "by_name", 1, "--quiet")
    argv[argv.index(str(cohort["model"]))] = "lite-m"
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    model, bundled = load_checkpoint(tmp_path / "by_name" / "model.pt"), load_checkpoint()
    init = model.meta["lineage"]["init"]
    assert {k: init[k] for k in ("name", "hash")} == {"name": "wsi_ircr/weights/ircr-monuseg-lite-m.pt", "hash": bundled.model_hash}
    assert init["data"]["licence"] == bundled.meta["data"]["licence"]  # the start model's licence travels with the weights
    assert model.arch == bundled.arch


# --- binary masks as labels (--labels-kind binary) --------------------------------------------


def binary_masks(cohort) -> Path:
    """The cohort's labelled tiles' masks as 0/255 PNGs (no instance identities)."""
    from PIL import Image

    from wsi_ircr.io.images import read_label

    masks = cohort["root"] / "masks"
    masks.mkdir(exist_ok=True)
    for path in sorted(cohort["labels"].iterdir()):
        Image.fromarray(((read_label(path) > 0) * 255).astype(np.uint8)).save(masks / path.name)
    return masks


def test_binary_labels_train_the_np_branch_only_and_validate_on_connected_components(cohort):
    from scipy import ndimage

    from wsi_ircr.io.images import read_label
    from wsi_ircr.train.config import DataConfig
    from wsi_ircr.train.data import CropSampler

    masks = binary_masks(cohort)
    data = load_train_data(DataConfig(images=str(cohort["images"]), labels=str(masks), labels_kind="binary", val=("t2",)))
    assert data.labelled.binary == [True, True] and all(lab.max() == 1 for lab in data.labelled.labels)
    expected, n = ndimage.label(read_label(masks / "t2.png") > 0)
    assert n > 1 and np.array_equal(data.val.labels[0], expected)  # scored on connected components, not one blob
    batch = CropSampler(data.labelled, 32, np.random.default_rng(0)).sample(3)
    assert np.all(batch["hv_valid"] == 0) and np.all(batch["valid"] == 1)  # the HV loss is off, the NP loss on
    instances = load_train_data(DataConfig(images=str(cohort["images"]), labels=str(cohort["labels"]), val=("t2",)))
    assert not instances.labelled.partial and instances.labelled.labels[0].max() > 1


def test_adapt_with_binary_labels_keeps_the_checkpoint_priors_and_chooses_by_dice(cohort, tmp_path, capsys):
    out = tmp_path / "adapted"
    argv = adapt_argv(cohort, out, 2, "--images", str(cohort["images"]), "--labels", str(binary_masks(cohort)),
                      "--labels-kind", "binary", "--set", "data.val=[t2]")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "data: 2 labelled, 4 unlabelled, 1 validation tiles" in err and "Dice" in stdout
    model = load_checkpoint(out / "model.pt")
    assert model.priors == load_checkpoint(cohort["model"]).priors  # masks carry no nucleus shapes to fit
    assert model.meta["lineage"]["method"] == "ircr"
    history = model.meta["metrics"]["history"]
    assert model.meta["metrics"]["val"]["dice"] == max(h["dice"] for h in history)


def test_binary_labels_refuse_postprocess_tuning_on_validation_tiles():
    from wsi_ircr.train.config import DataConfig

    with pytest.raises(ValueError, match="tune_postprocess"):
        TrainConfig(data=DataConfig(labels_kind="binary", val=("a",)), tune_postprocess=True)
    assert TrainConfig(data=DataConfig(labels_kind="binary"), tune_postprocess=True).selection_metric == "dice"


def test_adapt_resume_continues_where_it_stopped(cohort, tmp_path, capsys):
    code, _, err = run_cli(adapt_argv(cohort, tmp_path / "full", 4), capsys)
    assert code == 0, err
    out = tmp_path / "resumed"
    with ctrl_c_at(3):
        code, _, err = run_cli(adapt_argv(cohort, out, 4), capsys)
    assert code == 130 and not (out / "model.pt").exists()
    assert load_checkpoint(out / "last.pt").train_state["step"] == 2
    code, _, err = run_cli(adapt_argv(cohort, out, 4, "--resume"), capsys)
    assert code == 0, err
    assert "resuming from step 2" in err
    full, resumed = load_checkpoint(tmp_path / "full" / "model.pt"), load_checkpoint(out / "model.pt")
    for key in full.model_state:
        assert torch.equal(full.model_state[key], resumed.model_state[key]), key


@pytest.mark.parametrize("case, words", [
    ("no_input", "no unlabelled input"),
    ("not_a_model", "not a readable wsi-ircr checkpoint"),
    ("no_mpp", "--mpp is required"),
    ("mpp_mismatch", "the checkpoint's mpp is 0.25"),
    ("labels_alone", "--images and --labels go together"),
    ("kind_alone", "--labels-kind binary describes --labels"),
])
def test_adapt_errors_are_one_line_and_write_nothing(cohort, tmp_path, capsys, case, words):
    out = tmp_path / "adapted"
    argv = adapt_argv(cohort, out, 2)
    if case == "no_input":
        argv = ["adapt", "--model", str(cohort["model"]), "--out", str(out)]
    elif case == "not_a_model":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"not a checkpoint at all")
        argv[argv.index(str(cohort["model"]))] = str(junk)
    elif case == "no_mpp":
        argv.remove("--mpp")
        argv.remove("0.25")
    elif case == "mpp_mismatch":
        argv += ["--set", "mpp=0.5"]
    elif case == "labels_alone":
        argv += ["--labels", str(cohort["labels"])]
    elif case == "kind_alone":
        argv += ["--labels-kind", "binary"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_train_init_with_a_config_that_sets_another_arch_is_refused(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--images", str(cohort["images"]), "--labels", str(cohort["labels"]), "--out", str(out),
            "--steps", "2", "--init", str(cohort["model"]), "--set", "arch=lite-m", *SMALL]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "arch" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run_cli(argv[:-len(SMALL) - 2] + SMALL, capsys)
    assert code == 0, err
    model = load_checkpoint(out / "model.pt")
    assert model.meta["lineage"]["method"] == "supervised" and model.meta["lineage"]["init"]["hash"] == file_hash(cohort["model"])


@pytest.mark.openslide
def test_adapt_on_the_sample_slide_from_the_bundled_model(tmp_path, capsys):
    slide = REPO / "examples" / "cmu-1-small-region.svs"
    out = tmp_path / "adapted"
    argv = ["adapt", "--unlabelled-slides", str(slide), "--out", str(out), "--steps", "1", *TINY,
            "--set", "data.slide_tile_px=64", "--set", "data.slide_tiles=2"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    model = load_checkpoint(out / "model.pt")
    bundled = load_checkpoint()
    assert model.arch == bundled.arch and model.mpp == bundled.mpp and model.postprocess == bundled.postprocess
    lineage = model.meta["lineage"]
    assert {k: lineage["init"][k] for k in ("name", "hash")} == {"name": "bundled:ircr-monuseg-lite-m.pt", "hash": bundled.model_hash}
    assert lineage["init"]["data"]["citation"] == bundled.meta["data"]["citation"] and "tiles" not in lineage["init"]["data"]
    assert lineage["data"]["unlabelled_slides"] == ["cmu-1-small-region"] and lineage["data"]["unlabelled_tiles"] == 2
    assert lineage["method"] == "ircr" and model.priors == bundled.priors  # the default: the bundled model carries priors
    assert not any(np.array_equal(model.model_state[k].numpy(), v.numpy()) for k, v in bundled.model_state.items()
                   if v.is_floating_point() and v.ndim == 4)
