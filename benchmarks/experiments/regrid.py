"""How predictions of a model at a coarser mpp return to the labels' grid, measured.

    python -m benchmarks.experiments.regrid runs/recipe/NAME/model.pt   # on the 4 Kumar validation tiles

"maps": the NP / HV maps are resampled (bilinear) to the labels' grid and post-processed
there (what ``Predictor.segment_image`` does); "instances": post-processing at the model's
mpp, then the instance map is resampled by nearest neighbour. Prints mean AJI / Dice / PQ
and post-processing seconds of each; the validation tiles only, never the test tiles.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MONUSEG as DATA


def main() -> None:
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import mean_scores, score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.model.resample import resize_image, resize_labels, resize_maps, scaled_shape

    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--mpp", type=float, default=0.25, help="the labels' mpp")
    args = parser.parse_args()
    predictor = Predictor(load_checkpoint(args.model), device="cpu")
    stems = json.loads((DATA / "meta.json").read_text())["kumar_split"]["val"]
    scores: dict[str, list] = {"maps": [], "instances": []}
    seconds = dict.fromkeys(scores, 0.0)
    for stem in stems:
        image, labels = read_image(DATA / "images" / f"{stem}.tif"), read_label(DATA / "labels" / f"{stem}.png")
        small = resize_image(image, scaled_shape(image.shape[:2], args.mpp, predictor.mpp))
        prob, hv = predictor.predict_image_maps(small)
        t0 = time.perf_counter()
        pred = predictor.instances(*resize_maps(prob, hv, image.shape[:2]), args.mpp)
        t1 = time.perf_counter()
        coarse = resize_labels(predictor.instances(prob, hv), image.shape[:2])
        t2 = time.perf_counter()
        scores["maps"].append(score_instances(labels, pred))
        scores["instances"].append(score_instances(labels, coarse))
        seconds["maps"] += t1 - t0
        seconds["instances"] += t2 - t1
    for mode, s in scores.items():
        m = mean_scores(s)
        print(f"{mode:9s} AJI {m['aji']:.4f} Dice {m['dice']:.4f} PQ {m['pq']:.4f}  post-processing {seconds[mode]:.1f} s "
              f"({len(stems)} tiles, model {predictor.mpp} um/px, labels {args.mpp} um/px)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
