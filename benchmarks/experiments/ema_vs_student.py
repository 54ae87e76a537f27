"""The EMA of the weights against the last student of a run, on the 4 Kumar validation tiles.

    python -m benchmarks.experiments.ema_vs_student runs/recipe/NAME

Both networks of ``last.pt`` (the student and the teacher, an EMA of the student's weights)
are scored with the run's tuned post-processing (from ``model.pt``); validation tiles only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import MONUSEG as DATA


def main() -> None:
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import mean_scores, score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    last, shipped = load_checkpoint(args.run / "last.pt"), load_checkpoint(args.run / "model.pt")
    stems = json.loads((DATA / "meta.json").read_text())["kumar_split"]["val"]
    tiles = [(read_image(DATA / "images" / f"{s}.tif"), read_label(DATA / "labels" / f"{s}.png")) for s in stems]
    alpha = last.meta["config"]["ema_alpha"]
    for name, state in (("student", last.model_state), (f"EMA (alpha {alpha})", last.train_state["teacher"])):
        last.model_state, last.postprocess = state, shipped.postprocess
        predictor = Predictor(last, device="cpu")
        m = mean_scores([score_instances(lab, predictor.segment_image(img, 0.25)) for img, lab in tiles])
        print(f"{args.run.name} step {last.train_state['step']} {name:18s} val AJI {m['aji']:.4f} Dice {m['dice']:.4f} PQ {m['pq']:.4f}")


if __name__ == "__main__":
    main()
