"""Package a trained run as the bundled model: post-processing, provenance, no training state.

    python pipelines/package_model.py runs/bundled/model.pt wsi_ircr/weights/ircr-monuseg-lite-s.pt \
        --postprocess-from runs/recipe/final/model.pt --metrics runs/recipe/final/test.json

A distillation run (``wsi_ircr.train.distill``, ``--data-note distilled``) records what its
weights derive from: the teacher's data and its own tiles, their licences and citations.

A run trained on every labelled tile has no tiles left to tune its post-processing on:
``--postprocess-from`` copies the thresholds that the same recipe's run with held-out
validation tiles chose. ``--tune-images/--tune-labels [--tune-stems]`` tune on given tiles instead.

Paths in the metadata are recorded relative to ``--root`` (default: the working directory;
a path outside it keeps only its file name), never as this machine's absolute paths.
``--meta-only`` rewrites an already packaged checkpoint's metadata that way, weights and
everything else unchanged:

    python pipelines/package_model.py wsi_ircr/weights/ircr-monuseg-lite-m.pt \
        wsi_ircr/weights/ircr-monuseg-lite-m.pt --meta-only --root /path/of/the/checkout/it/was/built/in

The checkpoint written keeps weights, architecture, mpp, post-processing thresholds, PIAC
priors and metadata (training config, data description with licence and citation, the
sources the run read with their licences, metrics, ``packaged_from``: the source file's name and
hash); no optimiser or teacher state.
``--weights-dtype float16`` stores the weights in half precision (half the file; loaded as
float32): validate the packaged file's precisions (``pipelines/validate_precision.py``) after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsi_ircr.io.images import pair_folders, read_image, read_label
from wsi_ircr.model.checkpoint import WEIGHTS_DTYPES, load_checkpoint, portable_meta, portable_name, save_checkpoint
from wsi_ircr.model.inference import Predictor
from wsi_ircr.train.provenance import licences
from wsi_ircr.train.tune import tune_postprocess

DATA_NOTE = {
    "name": "MoNuSeg 2018 training set (30 H&E tiles, 1000x1000 px, 40x, 7 organs, 16,958 nuclei)",
    "licence": "CC BY-NC-SA 4.0: the weights are derived from this data and carry its terms",
    "citation": [
        "N. Kumar et al., A Dataset and a Technique for Generalized Nuclear Segmentation for Computational "
        "Pathology, IEEE TMI 36(7):1550-1560, 2017",
        "N. Kumar et al., A Multi-Organ Nucleus Segmentation Challenge, IEEE TMI 39(5):1380-1391, 2020",
    ],
}
DISTILLED_NOTE = {  # the student of configs/train/distill.yaml (``--model fast``)
    "name": "Distilled from the bundled lite-m (MoNuSeg 2018 training set, all 30 tiles) on the 12 Kumar training tiles "
            "of MoNuSeg (with their labels), the 28 NuInsSeg human spleen and 22 CryoNuSeg training tiles (images only) "
            "and 48 tissue tiles of the OpenSlide sample slide CMU-1-Small-Region",
    "licence": "CC BY-NC-SA 4.0: the weights are derived from MoNuSeg (through the teacher and the Kumar tiles) and CryoNuSeg "
               "(both CC BY-NC-SA 4.0) and NuInsSeg (CC BY 4.0) and carry their terms",
    "citation": DATA_NOTE["citation"] + [
        "A. Mahbod et al., NuInsSeg: A fully annotated dataset for nuclei instance segmentation in H&E-stained histological "
        "images, Scientific Data 11:295, 2024",
        "A. Mahbod et al., CryoNuSeg: A dataset for nuclei instance segmentation of cryosectioned H&E-stained histological "
        "images, Computers in Biology and Medicine 132:104349, 2021",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--tune-images", type=Path)
    parser.add_argument("--tune-labels", type=Path)
    parser.add_argument("--tune-stems", default="", help="Comma-separated stems to tune on (default: all pairs).")
    parser.add_argument("--postprocess-from", type=Path, help="Checkpoint whose post-processing thresholds to copy.")
    parser.add_argument("--metrics", type=Path, help="JSON of evaluation figures to store in meta.metrics.")
    parser.add_argument("--root", type=Path, help="Record paths relative to this folder (default: the working directory).")
    parser.add_argument("--data-note", choices=("monuseg", "distilled"), default="monuseg",
                        help="What the weights derive from: a run of MoNuSeg tiles, or a wsi_ircr.train.distill run.")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES,
                        help="Store the weights in this precision (float16: half the file, cast back to float32 on load; "
                             "default: as the source stores them).")
    parser.add_argument("--meta-only", action="store_true",
                        help="Only make the source's metadata portable (no absolute paths); weights unchanged.")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.source)
    if args.meta_only:
        ckpt.meta = portable_meta(ckpt.meta, args.root)
        digest = save_checkpoint(args.target, ckpt)
        print(f"{args.target}: metadata made portable, hash {digest}")
        return
    notes = {}
    if args.postprocess_from:
        donor = load_checkpoint(args.postprocess_from)
        ckpt.postprocess = donor.postprocess
        tuned = (donor.meta.get("metrics") or {}).get("val_aji_tuned_postprocess")
        notes["postprocess_from"] = {"checkpoint": portable_name(args.postprocess_from, args.root), "hash": donor.model_hash,
                                     "val_stems": (donor.meta.get("data") or {}).get("val"), "val_aji": tuned}
        print(f"post-processing of {args.postprocess_from}: {ckpt.postprocess}", file=sys.stderr)
    if args.tune_images:
        stems = set(filter(None, args.tune_stems.split(",")))
        pairs = [p for p in pair_folders(args.tune_images, args.tune_labels) if not stems or p[0] in stems]
        images = [read_image(p[1]) for p in pairs]
        labels = [read_label(p[2]) for p in pairs]
        ckpt.postprocess, aji = tune_postprocess(Predictor(ckpt, device="cpu"), images, labels, mpp=ckpt.mpp)
        notes["postprocess_tuned_on"] = {"stems": [p[0] for p in pairs], "aji": aji}
        print(f"tuned on {len(pairs)} tiles: AJI {aji:.4f} {ckpt.postprocess}", file=sys.stderr)
    data = ckpt.meta.get("data") or {}
    if args.data_note == "distilled":
        note = {**DISTILLED_NOTE, "tiles": data.get("labelled", []) + data.get("other", []), "val": data.get("val")}
    else:
        note = {**DATA_NOTE, "tiles": data.get("labelled")}
    if ckpt.meta.get("sources"):  # what the training run read (wsi_ircr.train.provenance): every dataset's licence
        note["licences"] = licences(ckpt.meta["sources"])
    ckpt.meta = {**ckpt.meta, "data": note,
                 "packaged_from": {"checkpoint": portable_name(args.source, args.root), "hash": ckpt.model_hash,
                                   "weights_dtype": args.weights_dtype or ckpt.weights_dtype}}
    metrics = dict(ckpt.meta.get("metrics") or {})
    metrics.pop("history", None)
    metrics.update(notes)
    if args.metrics:
        metrics["evaluation"] = json.loads(args.metrics.read_text())
    ckpt.meta["metrics"] = metrics
    ckpt.meta = portable_meta(ckpt.meta, args.root)
    ckpt.train_state = None
    digest = save_checkpoint(args.target, ckpt, weights_dtype=args.weights_dtype)
    print(f"{args.target}: {args.target.stat().st_size / 1e6:.1f} MB, hash {digest}")


if __name__ == "__main__":
    main()
