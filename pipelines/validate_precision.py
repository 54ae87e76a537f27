"""Validate a checkpoint's network per precision and engine on the CPU, and record what is proven.

    python pipelines/validate_precision.py wsi_ircr/weights/ircr-monuseg-lite-m.pt \
        --data ../shared/data/monuseg-train [--write]

Kumar validation protocol (benchmarks/recipe.md): the 4 Kumar validation tiles of the MoNuSeg
training set (``meta.json``'s ``kumar_split.val``; never the test tiles), segmented at
0.25 um/px by torch fp32 (the reference), by torch bf16 where bf16 is native on this CPU, and by
fp32 and int8 in each installed engine of the cpu-fast extra. Prints validation AJI, and the AJI
of each variant's instances against the reference's. ``--write`` stores the int8 (ONNX Runtime)
and bf16 results in the checkpoint's ``meta["precision"]["cpu"]`` (``wsi_ircr.model.precision``:
``auto`` takes int8 where its AJI is within 0.005 of fp32; bf16, native, unless recorded worse
than that), rewriting the file atomically with weights, their storage and every other field
unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsi_ircr.io.images import read_image, read_label
from wsi_ircr.metrics import aji, mean_scores, score_instances
from wsi_ircr.model import engines
from wsi_ircr.model.checkpoint import load_checkpoint, save_checkpoint
from wsi_ircr.model.inference import Predictor
from wsi_ircr.model.precision import AJI_TOLERANCE, native_bf16

TILES_MPP = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True,
                        help="MoNuSeg training set folder (images/, labels/, meta.json), e.g. ../shared/data/monuseg-train.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="Record the int8 result in the checkpoint.")
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        print(f"error: --data {args.data}: no meta.json there; pass the MoNuSeg training set folder "
              "(images/, labels/, meta.json)", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    stems = json.loads((args.data / "meta.json").read_text())["kumar_split"]["val"]
    tiles = [(read_image(args.data / "images" / f"{s}.tif"), read_label(args.data / "labels" / f"{s}.png")) for s in stems]
    checkpoint = load_checkpoint(args.checkpoint)

    variants = [("fp32", "torch")] + ([("bf16", "torch")] if native_bf16(torch.device("cpu")) else []) + [
        (p, e) for e in engines.installed_engines() for p in ("fp32", "int8")]
    results = {}
    for precision, engine in variants:
        predictor = Predictor(checkpoint, device="cpu", precision=precision, engine=engine)
        t0 = time.perf_counter()
        outputs = [predictor.segment_image(image, TILES_MPP) for image, _ in tiles]
        seconds = time.perf_counter() - t0
        score = mean_scores([score_instances(labels, out) for (_, labels), out in zip(tiles, outputs)])["aji"]
        results[(precision, engine)] = (outputs, float(score), seconds)
    reference, ref_aji, _ = results[("fp32", "torch")]
    print(f"{len(stems)} Kumar validation tiles ({', '.join(stems)}), {checkpoint.path.name} ({checkpoint.model_hash})")
    print("| precision | engine | validation AJI | vs fp32 | instances AJI vs torch fp32 | seconds |\n|---|---|---|---|---|---|")
    agreement = {}  # (precision, engine) -> mean AJI of its instances against torch fp32's
    for (precision, engine), (outputs, score, seconds) in results.items():
        agree = agreement[(precision, engine)] = float(np.mean([aji(r, o) for r, o in zip(reference, outputs)]))
        print(f"| {precision} | {engine} | {score:.4f} | {score - ref_aji:+.4f} | {agree:.4f} | {seconds:.1f} |")

    if args.write:
        common = {"fp32_aji": round(ref_aji, 4), "tiles": f"MoNuSeg Kumar validation ({', '.join(stems)})",
                  "date": time.strftime("%Y-%m-%d", time.gmtime())}
        entries = {}
        if ("int8", "onnxruntime") in results:
            entries["int8"] = {"engine": "onnxruntime", "aji": round(results[("int8", "onnxruntime")][1], 4), **common,
                               "instances_aji_vs_fp32": round(agreement[("int8", "onnxruntime")], 4), "recipe": engines.RECIPE,
                               "onnxruntime": engines.package_version("onnxruntime")}
        if ("bf16", "torch") in results:
            entries["bf16"] = {"engine": "torch", "aji": round(results[("bf16", "torch")][1], 4), **common,
                               "instances_aji_vs_fp32": round(agreement[("bf16", "torch")], 4), "torch": engines.package_version("torch")}
        if not entries:
            print("error: --write: neither int8 (needs the cpu-fast extra) nor bf16 (needs a CPU with native bf16) ran here; "
                  'install "wsi-ircr[cpu-fast]" or run on a bf16 CPU', file=sys.stderr)
            sys.exit(2)
        record = dict(checkpoint.meta.get("precision") or {})
        record["cpu"] = {**(record.get("cpu") or {}), **entries}
        checkpoint.meta = {**checkpoint.meta, "precision": record}
        digest = save_checkpoint(checkpoint.path, checkpoint)
        for name, entry in entries.items():
            proven = "proven (auto takes it)" if entry["aji"] >= ref_aji - AJI_TOLERANCE else "not proven (auto skips it)"
            print(f"{checkpoint.path}: {name} recorded, {proven}")
        print(f"{checkpoint.path}: hash {digest}")


if __name__ == "__main__":
    main()
