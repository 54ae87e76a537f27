"""How confident the study's models are: nucleus probability inside and outside true nuclei.

For every run folder of the study (``runs/study/<method>-L<n>-s<seed>/model.pt``, or the
folders given), the shipped network predicts the run's own validation tiles (``data.val``
of its config.yaml; never the test tiles). Printed per run, as a markdown table: the mean
nucleus probability over ground-truth nucleus pixels (``p_in``) and background pixels
(``p_out``), the mean confidence ``|2 p - 1|`` over all pixels, and the run's test AJI from
its ``test.json`` (written by ``study.py``).

    python -m benchmarks.experiments.confidence                 # every run under runs/study
    python -m benchmarks.experiments.confidence runs/exp/a runs/exp/b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO


def confidence(run_dir: Path) -> dict[str, float]:
    """``{"p_in", "p_out", "confidence"}``, means over the run's validation tiles."""
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    stems = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["val"]
    predictor = Predictor(load_checkpoint(run_dir / "model.pt"), device="cpu")
    p_in, p_out, conf = [], [], []
    for stem in stems:
        prob, _ = predictor.predict_image_maps(read_image(DATA / "images" / f"{stem}.tif"))
        fg = read_label(DATA / "labels" / f"{stem}.png") > 0
        p_in.append(prob[fg].mean())
        p_out.append(prob[~fg].mean())
        conf.append(np.abs(2.0 * prob - 1.0).mean())
    return {"p_in": float(np.mean(p_in)), "p_out": float(np.mean(p_out)), "confidence": float(np.mean(conf))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (default: every run under runs/study)")
    args = parser.parse_args()
    runs = args.runs or sorted(p for p in (REPO / "runs" / "study").glob("*-L*-s*") if (p / "model.pt").is_file())
    print("| run | p_in | p_out | confidence | test AJI |\n|---|---|---|---|---|")
    for run in runs:
        c = confidence(run)
        test = run / "test.json"
        aji = f"{json.loads(test.read_text())['aji']:.3f}" if test.is_file() else "-"
        print(f"| {run.name} | {c['p_in']:.3f} | {c['p_out']:.3f} | {c['confidence']:.3f} | {aji} |", flush=True)


if __name__ == "__main__":
    main()
