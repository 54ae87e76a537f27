"""Validation accuracy of the bundled model and its distilled CPU student, per precision.

    python -m benchmarks.speed.distill_scores [MODEL ...] [--threads 1] [--variants fp32]   # default: lite-m fast

Each model (a bundled name or a checkpoint path) segments, in torch fp32 and in ONNX Runtime
int8 (where the cpu-fast extra is installed), the validation tiles of recipe.md's table: the
4 Kumar validation tiles (AJI), the 6 held-out NuInsSeg spleen tiles (AJI) and the 6 held-out
CryoNuSeg tiles (Dice against their binary masks). Never the Kumar test tiles. Results go to
``benchmarks/results/distill.json`` (one entry per model hash and variant; a checkpoint outside
the repository is recorded by its file name and hash, or by LABEL when given as LABEL=PATH) and stdout. ``--variants fp32`` scores
torch fp32 only (no int8 export and calibration).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import MONUSEG, REPO
from benchmarks.experiments.recipe import source_val

RESULTS = REPO / "benchmarks" / "results" / "distill.json"


def tiles(source: str) -> tuple[list, list, float]:
    """(images, labels, mpp) of one source's validation tiles."""
    from wsi_ircr.io.images import read_image, read_label

    split = json.loads((MONUSEG / "meta.json").read_text())["kumar_split"]
    folder, labels, mpp, stems = source_val(split["val"])[source]
    root = MONUSEG.parent / folder
    ext = ".tif" if folder == "monuseg-train" else ".png"
    return ([read_image(root / "images" / f"{s}{ext}") for s in stems], [read_label(root / labels / f"{s}.png") for s in stems], mpp)


def score(model: str, precision: str, engine: str, data: dict) -> dict:
    """Mean metrics per source of ``model`` (a ``--model`` value, or ``LABEL=PATH``) at
    ``precision`` on ``engine``."""
    from wsi_ircr.metrics import mean_scores, score_instances
    from wsi_ircr.model.checkpoint import BUNDLED_MODELS, load_checkpoint, portable_name
    from wsi_ircr.model.inference import Predictor

    label, _, path = model.rpartition("=")
    checkpoint = load_checkpoint(path)
    predictor = Predictor(checkpoint, device="cpu", precision=precision, engine=engine)
    t0 = time.time()
    out = {"model": label or (path if path in BUNDLED_MODELS else portable_name(path, REPO)), "hash": checkpoint.model_hash, "arch": checkpoint.arch, "precision": precision, "engine": engine}
    for source, (images, labels, mpp) in data.items():
        out[source] = mean_scores([score_instances(lab, predictor.segment_image(im, mpp)) for im, lab in zip(images, labels)])
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    import torch

    from wsi_ircr.model.engines import installed_engines

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["lite-m", "fast"], help="bundled names or checkpoint paths (LABEL=PATH: recorded as LABEL)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", choices=("all", "fp32"), default="all",
                        help="all: torch fp32 and, where the cpu-fast extra is installed, ONNX Runtime int8; fp32: torch fp32 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = {source: tiles(source) for source in ("kumar", "nuinsseg", "cryonuseg")}
    variants = [("fp32", "torch")] + ([("int8", "onnxruntime")] if "onnxruntime" in installed_engines() and args.variants == "all" else [])
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for model in args.models:
        for precision, engine in variants:
            row = score(model, precision, engine, data)
            results[f"{row['hash']} {precision} {engine}"] = {**row, "date": time.strftime("%Y-%m-%d")}
            print(f"{row['model']} ({row['arch']}, {row['hash']}) {precision} {engine}: Kumar val AJI {row['kumar']['aji']:.4f}, "
                  f"NuInsSeg val AJI {row['nuinsseg']['aji']:.4f}, CryoNuSeg val Dice {row['cryonuseg']['dice']:.4f} "
                  f"({row['seconds']} s)", flush=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
