"""What ``--min-area-um2`` and ``--min-score`` trade, measured on the Kumar validation tiles.

    python -m benchmarks.experiments.nucleus_filters [--model M.pt] [--tiles kumar|nuinsseg]

For each threshold: the share of predicted nuclei left out, AJI, Dice, PQ, object F1 and
precision / recall of matched nuclei (IoU 0.5), means over the tiles. Score = mean nucleus
probability over the nucleus (``nuclei.csv``'s score); area in um^2 at 0.25 um/px. The 4
Kumar validation tiles only (``--tiles nuinsseg``: the NuInsSeg spleen tiles), never the
test tiles. The bundled model was trained on all 30 MoNuSeg tiles, the validation tiles
included, so its figures there are optimistic; NuInsSeg it never saw.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import MONUSEG, SHARED, machine

AREAS_UM2 = (0.0, 3.0, 5.0, 10.0, 15.0)
SCORES = (0.0, 0.6, 0.7, 0.8, 0.9)


def _pairs(tiles: str):
    from wsi_ircr.io.images import pair_folders

    if tiles == "kumar":
        stems = set(json.loads((MONUSEG / "meta.json").read_text())["kumar_split"]["val"])
        return [p for p in pair_folders(MONUSEG / "images", MONUSEG / "labels") if p[0] in stems], 0.25
    folder = SHARED / "data" / "nuinsseg-spleen"
    return pair_folders(folder / "images", folder / "labels"), 0.25


def _precision_recall(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from wsi_ircr.metrics import match_instances, overlap_table

    matched = len(match_instances(overlap_table(true, pred))[0])
    n_true, n_pred = len(np.unique(true)) - 1, len(np.unique(pred)) - 1
    return matched / max(n_pred, 1), matched / max(n_true, 1)


def main() -> None:
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--tiles", choices=["kumar", "nuinsseg"], default="kumar")
    args = parser.parse_args()
    predictor = Predictor(load_checkpoint(args.model), device="cpu", precision="fp32")
    pairs, mpp = _pairs(args.tiles)
    rows: dict[tuple[str, float], list] = {}
    for stem, image_path, label_path in pairs:
        image, true = read_image(image_path), read_label(label_path)
        prob, hv = predictor.maps_at(image, mpp)
        pred = predictor.instances(prob, hv, mpp)
        ids = np.arange(pred.max() + 1)
        area_um2 = np.bincount(pred.ravel(), minlength=len(ids)) * mpp**2
        score = np.bincount(pred.ravel(), weights=prob.ravel(), minlength=len(ids)) / np.maximum(
            np.bincount(pred.ravel(), minlength=len(ids)), 1)
        n = max(int((area_um2[1:] > 0).sum()), 1)
        for kind, values, thresholds in (("area", area_um2, AREAS_UM2), ("score", score, SCORES)):
            for t in thresholds:
                keep = values >= t
                keep[0] = False
                filtered = np.where(keep[pred], pred, 0)
                s = score_instances(true, filtered)
                p, r = _precision_recall(true, filtered)
                rows.setdefault((kind, t), []).append([1 - (keep[1:] & (area_um2[1:] > 0)).sum() / n, s["aji"], s["dice"],
                                                       s["pq"], s["f1"], p, r])
        print(f"{stem}: {n} nuclei", flush=True)
    print(f"\n{len(pairs)} {args.tiles} tiles, model {predictor.model_hash}; {machine()}\n")
    print("| filter | threshold | nuclei left out | AJI | Dice | PQ | F1 | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (kind, t), values in rows.items():
        m = np.mean(values, axis=0)
        name = "--min-area-um2" if kind == "area" else "--min-score"
        print(f"| {name} | {t:g} | {100 * m[0]:.1f} % | " + " | ".join(f"{v:.4f}" for v in m[1:]) + " |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
