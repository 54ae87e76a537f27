"""Where a model loses AJI: its NP map, its HV map, or the post-processing, measured by oracles.

    python -m benchmarks.experiments.oracle runs/recipe/NAME/model.pt [...]   # on the 4 Kumar validation tiles

For each model, the post-processing (the checkpoint's tuned thresholds) runs on four pairs of
maps: the model's NP and HV ("model"); the true nucleus mask with the model's HV ("true NP");
the model's NP with the true HV maps of the labels ("true HV"); both true ("true NP + HV",
the ceiling of the post-processing itself). The gap from "model" to each oracle is what a
perfect head would add. A second table gives the model's predicted foreground (its instances)
against the labels' nucleus pixels: precision, recall, and the recall on the labels' rim (each
nucleus's outer 1 px). Validation tiles only, never the test tiles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import MONUSEG as DATA

MODES = ("model", "true NP", "true HV", "true NP + HV")


def main() -> None:
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import mean_scores, score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.train.targets import hv_targets, np_targets
    from skimage.segmentation import find_boundaries

    parser = argparse.ArgumentParser()
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--mpp", type=float, default=0.25, help="the labels' mpp")
    args = parser.parse_args()
    stems = json.loads((DATA / "meta.json").read_text())["kumar_split"]["val"]
    tiles = [(read_image(DATA / "images" / f"{s}.tif"), read_label(DATA / "labels" / f"{s}.png")) for s in stems]
    rims = [find_boundaries(labels, mode="inner") & (labels > 0) for _, labels in tiles]  # each nucleus's outer 1 px
    print(f"| model | {' | '.join(MODES)} |  (mean AJI / PQ of {len(stems)} Kumar validation tiles)")
    print(f"|---|{'---|' * len(MODES)}")
    pixel_rows = []
    for path in args.models:
        predictor = Predictor(load_checkpoint(path), device="cpu")
        scores: dict[str, list] = {mode: [] for mode in MODES}
        counts = np.zeros(5, dtype=np.int64)
        for (image, labels), rim in zip(tiles, rims):
            prob, hv = predictor.maps_at(image, args.mpp)
            true_prob, true_hv = np_targets(labels).astype(np.float32), hv_targets(labels)
            pairs = {"model": (prob, hv), "true NP": (true_prob, hv), "true HV": (prob, true_hv),
                     "true NP + HV": (true_prob, true_hv)}
            for mode, maps in pairs.items():
                instances = predictor.instances(*maps, args.mpp)
                scores[mode].append(score_instances(labels, instances))
                if mode == "model":
                    counts += _pixel_counts(labels, instances > 0, rim)
        cells = [mean_scores(scores[mode]) for mode in MODES]
        print(f"| {path.parent.name}/{path.name} | " + " | ".join(f"{m['aji']:.4f} / {m['pq']:.4f}" for m in cells) + " |")
        tp, pred, true, rim_hit, rim_px = counts
        pixel_rows.append(f"| {path.parent.name}/{path.name} | {tp / pred:.3f} | {tp / true:.3f} | {rim_hit / rim_px:.3f} |")
    print("\n| model | pixel precision | pixel recall | rim recall |  (pooled over the tiles)\n|---|---|---|---|")
    print("\n".join(pixel_rows))


def _pixel_counts(labels: np.ndarray, fg: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """[true positives, predicted, true, rim pixels predicted, rim pixels] of one tile."""
    true = labels > 0
    return np.array([(fg & true).sum(), fg.sum(), true.sum(), (fg & rim).sum(), rim.sum()], dtype=np.int64)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
