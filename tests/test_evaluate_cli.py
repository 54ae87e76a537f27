"""``evaluate_folder`` with stand-in predictors, and the ``wsi-ircr evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_main
from PIL import Image

from wsi_ircr.errors import UserError
from wsi_ircr.evaluate import evaluate_folder, format_table
from wsi_ircr.io.images import pair_folders, read_label, write_label_png
from wsi_ircr.metrics import METRIC_KEYS, mean_scores, score_instances

SIZE = 64


def synthetic_labels(seed: int) -> np.ndarray:
    """A few non-overlapping square nuclei on a SIZE x SIZE map, arbitrary ids."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((SIZE, SIZE), np.int32)
    for k, (r, c) in enumerate([(4, 4), (4, 30), (30, 10), (40, 40), (20, 50)]):
        side = int(rng.integers(6, 12))
        labels[r : r + side, c : c + side] = 3 * k + 7
    return labels


def make_folder(tmp_path: Path, stems=("a", "b")) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i, stem in enumerate(stems):
        lab = synthetic_labels(i)
        rgb = np.full((SIZE, SIZE, 3), 230, np.uint8)
        rgb[lab > 0] = (90, 40, 140)
        Image.fromarray(rgb).save(images / f"{stem}.png")
        write_label_png(labels / f"{stem}.png", lab)
    return images, labels


class FakeCheckpoint:
    def describe(self) -> dict:
        return {"path": "fake.pt", "hash": "0123", "arch": "none", "mpp": 0.25, "postprocess": {}, "metrics": {"big": 1}}


class ShiftingPredictor:
    """'Segments' an image by reading its colour: nuclei pixels, labelled, shifted by ``shift`` columns."""

    checkpoint = FakeCheckpoint()

    def __init__(self, shift: int = 0):
        self.shift = shift
        self.calls = 0

    def segment_image(self, image: np.ndarray, mpp: float | None = None) -> np.ndarray:
        from scipy import ndimage as ndi

        self.calls += 1
        labels, _ = ndi.label(image[..., 0] < 128)
        return np.roll(labels * 11, self.shift, axis=1).astype(np.int32)


# --- evaluate_folder ----------------------------------------------------------------


def test_evaluate_folder_perfect_prediction(tmp_path):
    pairs = pair_folders(*make_folder(tmp_path))
    lines = []
    result = evaluate_folder(ShiftingPredictor(0), pairs, save_dir=tmp_path / "pred", progress=lines.append)
    assert set(result) == {"mean", "per_image", "model", "mpp"} and result["mpp"] == 0.25
    assert result["mean"] == dict.fromkeys(METRIC_KEYS, 1.0)
    assert list(result["per_image"]) == ["a", "b"]
    assert result["per_image"]["a"]["n_true"] == result["per_image"]["a"]["n_pred"] == 5
    assert result["model"] == {"path": "fake.pt", "hash": "0123", "arch": "none", "mpp": 0.25, "postprocess": {}}
    assert len(lines) == 2 and lines[0].startswith("[1/2] a: AJI 1.0000")
    for stem in ("a", "b"):  # saved predictions: same partition as the labels
        saved = read_label(tmp_path / "pred" / f"{stem}.png")
        assert score_instances(read_label(tmp_path / "labels" / f"{stem}.png"), saved)["aji"] == 1.0


def test_evaluate_folder_scores_each_image_against_its_labels(tmp_path):
    pairs = pair_folders(*make_folder(tmp_path))
    result = evaluate_folder(ShiftingPredictor(shift=2), pairs)
    expected = {}
    for stem, _, label_path in pairs:
        labels = read_label(label_path)
        expected[stem] = score_instances(labels, np.roll(labels, 2, axis=1))
    assert list(result["per_image"]) == list(expected)
    for stem, scores in expected.items():
        assert result["per_image"][stem] == pytest.approx(scores)
    assert result["mean"] == pytest.approx(mean_scores(expected.values()))
    assert result["mean"]["aji"] < 1.0


def test_evaluate_folder_checks_all_labels_before_segmenting(tmp_path):
    images, labels = make_folder(tmp_path, stems=("a", "b", "c"))
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(labels / "c.png")
    predictor = ShiftingPredictor()
    with pytest.raises(UserError, match=r"c\.png: expected a 2-D integer instance map, found RGB uint8"):
        evaluate_folder(predictor, pair_folders(images, labels))
    assert predictor.calls == 0


def test_evaluate_folder_shape_mismatch(tmp_path):
    images, labels = make_folder(tmp_path)
    write_label_png(labels / "b.png", np.zeros((SIZE, SIZE + 1), np.int32))
    with pytest.raises(UserError, match=r"b\.png: label map is 64x65 px but .*images/b\.png is 64x64 px"):
        evaluate_folder(ShiftingPredictor(), pair_folders(images, labels))


def test_format_table_lists_images_then_the_mean(tmp_path):
    pairs = pair_folders(*make_folder(tmp_path))
    table = format_table(evaluate_folder(ShiftingPredictor(shift=1), pairs))
    lines = table.splitlines()
    assert lines[0].split() == ["image", "n_true", "n_pred", "AJI", "Dice", "PQ", "DQ", "SQ", "F1"]
    assert [line.split()[0] for line in lines if not line.startswith("-")][1:] == ["a", "b", "mean"]
    assert lines[-1].split()[1:3] == ["5.0", "5.0"]


# --- the command --------------------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    return run_main(["evaluate", *args], capsys)


def test_cli_bad_folders_are_one_line_errors(tmp_path, capsys):
    images, labels = make_folder(tmp_path)
    cases = [
        (["--images", str(tmp_path / "nope"), "--labels", str(labels)], "images folder not found"),
        (["--images", str(images), "--labels", str(labels / "a.png")], "is a file, not a folder"),
        (["--images", str(labels), "--labels", str(tmp_path)], "no label maps found"),
    ]
    for args, message in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 2
        assert err.startswith("error: ") and message in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_labels(tmp_path, capsys):
    images, labels = make_folder(tmp_path)
    (labels / "b.png").unlink()
    code, _, err = run_cli(["--images", str(images), "--labels", str(labels)], capsys)
    assert code == 2 and "1 image(s) in" in err and "(b)" in err


def test_cli_not_a_checkpoint(tmp_path, capsys):
    import torch

    images, labels = make_folder(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    for model in (tmp_path / "other.pt", images / "a.png", tmp_path / "absent.pt"):
        code, _, err = run_cli(["--images", str(images), "--labels", str(labels), "--model", str(model)], capsys)
        assert code == 2 and err.startswith(f"error: {model}") and len(err.strip().splitlines()) == 1


def test_cli_wrong_label_type(tmp_path, capsys):
    images, labels = make_folder(tmp_path)
    np.save(labels / "a.npy", np.zeros((SIZE, SIZE), np.float32))
    (labels / "a.png").unlink()
    model = tiny_checkpoint(tmp_path)
    code, _, err = run_cli(["--images", str(images), "--labels", str(labels), "--model", str(model), "--device", "cpu"], capsys)
    assert code == 2 and "a.npy: expected a 2-D integer instance map, found float32 (64x64)" in err


def tiny_checkpoint(tmp_path: Path) -> Path:
    """A randomly initialised network saved with the real checkpoint API."""
    import torch

    from wsi_ircr.model.checkpoint import Checkpoint, save_checkpoint
    from wsi_ircr.model.net import build_model
    from wsi_ircr.model.postprocess import PostProcessConfig

    torch.manual_seed(0)
    net = build_model("lite-s")
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, Checkpoint(arch="lite-s", model_state=net.state_dict(), mpp=0.25, postprocess=PostProcessConfig()))
    return path


def test_cli_end_to_end_with_a_checkpoint(tmp_path, capsys):
    from wsi_ircr.model.checkpoint import file_hash, portable_name

    images, labels = make_folder(tmp_path)
    model = tiny_checkpoint(tmp_path)
    out_json, pred_dir = tmp_path / "out" / "scores.json", tmp_path / "pred"
    args = ["--images", str(images), "--labels", str(labels), "--model", str(model), "--device", "cpu"]
    code, out, err = run_cli([*args, "--json", str(out_json), "--save-predictions", str(pred_dir)], capsys)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert set(data) == {"mean", "per_image", "model", "mpp", "tta", "precision", "engine"} and data["tta"] == 1
    assert set(data["mean"]) == set(METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in data["mean"].values())
    assert list(data["per_image"]) == ["a", "b"]
    assert set(data["per_image"]["a"]) == {*METRIC_KEYS, "n_true", "n_pred"}
    assert data["model"]["hash"] == file_hash(model) and data["model"]["path"] == portable_name(model) == "tiny.pt"
    assert data["model"]["weights_dtype"] == "float32"  # which stored weights were scored (float16 files exist)
    for stem in ("a", "b"):
        with Image.open(pred_dir / f"{stem}.png") as img:
            pred = np.array(img)
        assert pred.dtype == np.uint16 and pred.shape == (SIZE, SIZE)
        assert len(np.unique(pred)) - (pred.min() == 0) == data["per_image"][stem]["n_pred"]
    table_rows = [line.split()[0] for line in out.splitlines() if line and not line.startswith("-")]
    assert table_rows == ["image", "a", "b", "mean"]
    assert "[2/2] b:" in err
    # --quiet: the same table, nothing on stderr
    code, out_quiet, err_quiet = run_cli([*args, "--quiet"], capsys)
    assert code == 0 and err_quiet == "" and out_quiet == out


@pytest.mark.parametrize("value", ["0", "-0.25", "40"])
def test_cli_impossible_mpp_is_one_line(tmp_path, capsys, value):
    images, labels = make_folder(tmp_path)
    code, _, err = run_cli(["--images", str(images), "--labels", str(labels), "--mpp", value, "--device", "cpu"], capsys)
    assert code == 2 and f"--mpp {float(value)}" in err and "um per pixel" in err and len(err.strip().splitlines()) == 1


def test_cli_mpp_puts_predictions_on_the_labels_grid(tmp_path, capsys):
    """Tiles at 0.5 um/px, a 0.25 um/px model: resampled in and back; predictions have the labels' shape."""
    images, labels = make_folder(tmp_path)
    model, pred_dir = tiny_checkpoint(tmp_path), tmp_path / "pred"
    args = ["--images", str(images), "--labels", str(labels), "--model", str(model), "--device", "cpu", "--mpp", "0.5",
            "--tta", "2", "--save-predictions", str(pred_dir), "--json", str(tmp_path / "s.json")]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "tiles at 0.5 um/px" in err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["mpp"] == 0.5 and data["tta"] == 2 and data["model"]["mpp"] == 0.25
    code, _, err = run_cli([*args, "--fp32"], capsys)
    assert code == 0 and "(fp32, " in err and json.loads((tmp_path / "s.json").read_text())["precision"] == "fp32"
    code, _, err = run_cli([*args, "--bf16"], capsys)
    assert code == 0 and "(bf16, torch)" in err and json.loads((tmp_path / "s.json").read_text())["precision"] == "bf16"
    assert read_label(pred_dir / "a.png").shape == (SIZE, SIZE)
