"""Score a segmentation model on a folder of labelled tiles (AJI, Dice, PQ, DQ, SQ, F1)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.io.images import check_pair, read_image, read_label, write_label_png
from wsi_ircr.metrics import METRIC_KEYS, mean_scores, score_instances

_MODEL_KEYS = ("path", "hash", "arch", "mpp", "postprocess", "weights_dtype")


class Segmenter(Protocol):
    """What ``evaluate_folder`` needs of a model (``wsi_ircr.model.inference.Predictor`` fits)."""

    checkpoint: Any  # has describe() -> dict

    def segment_image(self, image: np.ndarray, mpp: float | None = None) -> np.ndarray:
        """uint8 (H, W, 3) RGB at ``mpp`` um/px (None: the model's) -> int32 (H, W) instance map on the same grid."""


def evaluate_folder(
    predictor: Segmenter,
    pairs: Sequence[tuple[str, Path, Path]],
    save_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    mpp: float | None = None,
) -> dict[str, Any]:
    """Segment every image of ``pairs`` (from ``pair_folders``) and score it against its labels.

    ``mpp``: the tiles' resolution (um/px); None means the model's. Tiles at another mpp are
    resampled to the model's and the predictions brought back to the labels' grid, so scores
    are always at the labels' resolution. All label maps are read and checked before the first
    image is segmented, so a bad file fails at once. ``save_dir``: one uint16 PNG instance
    map per image, ``<stem>.png``. ``progress``: called with one line per image.

    Returns ``{"mean": {metric: float}, "per_image": {stem: score_instances(...)},
    "model": {"path", "hash", "arch", "mpp", "postprocess", "weights_dtype"}, "mpp": the tiles' mpp}``.
    """
    if not pairs:
        raise ValueError("evaluate_folder needs at least one (stem, image, label) pair")
    if save_dir is not None and save_dir.exists() and not save_dir.is_dir():
        raise UserError(f"{save_dir}: exists and is not a folder; pass a folder to save predictions in")
    for _, _, label_path in pairs:
        read_label(label_path)
    model = {k: v for k, v in predictor.checkpoint.describe().items() if k in _MODEL_KEYS}
    per_image: dict[str, dict] = {}
    for i, (stem, image_path, label_path) in enumerate(pairs, 1):
        image, labels = read_image(image_path), read_label(label_path)
        check_pair(image, labels, (image_path, label_path))
        start = time.perf_counter()
        pred = predictor.segment_image(image, mpp=mpp)
        seconds = time.perf_counter() - start
        if save_dir is not None:
            write_label_png(save_dir / f"{stem}.png", pred)
        scores = score_instances(labels, pred)
        per_image[stem] = scores
        if progress is not None:
            progress(f"[{i}/{len(pairs)}] {stem}: AJI {scores['aji']:.4f}  Dice {scores['dice']:.4f}  PQ {scores['pq']:.4f}  ({seconds:.1f} s)")
    return {"mean": mean_scores(per_image.values()), "per_image": per_image, "model": model, "mpp": mpp or model.get("mpp")}


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of ``evaluate_folder``'s result: one row per image, then the mean of each column."""
    per_image = result["per_image"]
    width = max(len("mean"), len("image"), *(len(s) for s in per_image))
    names = ("AJI", "Dice", "PQ", "DQ", "SQ", "F1")
    header = f"{'image':<{width}}  {'n_true':>7}  {'n_pred':>7}  " + "  ".join(f"{n:>6}" for n in names)

    def row(name: str, n_true: float, n_pred: float, scores: dict, fmt: str) -> str:
        return f"{name:<{width}}  {n_true:>7{fmt}}  {n_pred:>7{fmt}}  " + "  ".join(f"{scores[k]:>6.4f}" for k in METRIC_KEYS)

    lines = [header, "-" * len(header)]
    lines += [row(stem, s["n_true"], s["n_pred"], s, "d") for stem, s in per_image.items()]
    lines.append("-" * len(header))
    mean_true = float(np.mean([s["n_true"] for s in per_image.values()]))
    mean_pred = float(np.mean([s["n_pred"] for s in per_image.values()]))
    lines.append(row("mean", mean_true, mean_pred, result["mean"], ".1f"))
    return "\n".join(lines)
