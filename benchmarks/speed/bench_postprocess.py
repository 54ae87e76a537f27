"""Torch post-processing against the scikit-image reference, on the bundled model's maps.

Reports, for the MoNuSeg tiles of the Kumar split (read from ../shared at run time, never
committed): AJI between the two paths' instances on the 4 validation tiles (target >= 0.99),
the Kumar-test metrics of each path against the labels (target: within 0.005), and the
speed of each path (Mpx/s, maps already computed) on this machine's device.

    python -m benchmarks.speed.bench_postprocess                       # appends to benchmarks/postprocess.md
    python -m benchmarks.speed.bench_postprocess --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO, load_average, machine


def _tiles(split: str) -> list[str]:
    return json.loads((DATA / "meta.json").read_text())["kumar_split"][split]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run(device_name: str, threads: int, levels: int | None) -> dict:
    import torch

    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import aji, mean_scores, score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.model.postprocess import instances_from_maps
    from wsi_ircr.model.postprocess_torch import FLOOD_LEVELS, instances_from_maps_torch

    torch.set_num_threads(threads)
    levels = levels or FLOOD_LEVELS
    predictor = Predictor(load_checkpoint(None), device=device_name)
    device = predictor.device
    config, mpp = predictor.postprocess, predictor.mpp
    seconds = {"skimage": 0.0, "torch": 0.0}
    pixels = 0
    agreement, ref_scores, torch_scores = {}, [], []
    for split in ("val", "test"):
        for stem in _tiles(split):
            image = read_image(next((DATA / "images").glob(f"{stem}.*")))
            prob, hv = predictor.predict_image_maps(image)
            t0 = time.perf_counter()
            ref = instances_from_maps(prob, hv, config, mpp=mpp)
            t1 = time.perf_counter()
            prob_t, hv_t = torch.from_numpy(prob)[None].to(device), torch.from_numpy(hv)[None].to(device)
            _sync(device)
            t2 = time.perf_counter()
            out = instances_from_maps_torch(prob_t, hv_t, config, mpp=mpp, levels=levels)
            _sync(device)
            t3 = time.perf_counter()
            out = out[0].cpu().numpy()
            seconds["skimage"] += t1 - t0
            seconds["torch"] += t3 - t2
            pixels += prob.size
            if split == "val":
                agreement[stem] = aji(ref, out)
            else:
                label = read_label(DATA / "labels" / f"{stem}.png")
                ref_scores.append(score_instances(label, ref))
                torch_scores.append(score_instances(label, out))
            print(f"{split} {stem}: skimage {t1 - t0:.2f} s, torch {t3 - t2:.2f} s", file=sys.stderr)
    ref_mean, torch_mean = mean_scores(ref_scores), mean_scores(torch_scores)
    return {
        "device": str(device), "threads": threads, "levels": levels,
        "val_aji_torch_vs_skimage": agreement,
        "val_aji_min": min(agreement.values()),
        "test_skimage": ref_mean, "test_torch": torch_mean,
        "test_max_abs_diff": max(abs(ref_mean[k] - torch_mean[k]) for k in ref_mean),
        "mpx_per_s": {k: pixels / 1e6 / v for k, v in seconds.items()},
    }


def markdown(result: dict, command: str) -> str:
    """One section of ``postprocess.md``."""
    load = load_average()
    keys = list(result["test_skimage"])
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(result['device'])}: {result['device']}, "
        f"{result['threads']} threads, {result['levels']} flood levels",
        "",
        f"Command: `{command}` (load average {load} at the end)",
        "",
        "Validation tiles, AJI of the torch instances against scikit-image's: "
        + ", ".join(f"{k[:12]} {v:.4f}" for k, v in result["val_aji_torch_vs_skimage"].items())
        + f" (min {result['val_aji_min']:.4f}; target >= 0.99)",
        "",
        "| Kumar test (14 tiles) | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        "| scikit-image | " + " | ".join(f"{result['test_skimage'][k]:.4f}" for k in keys) + " |",
        "| torch | " + " | ".join(f"{result['test_torch'][k]:.4f}" for k in keys) + " |",
        "",
        f"Largest difference {result['test_max_abs_diff']:.4f} (target <= 0.005). Speed on maps already computed: "
        + ", ".join(f"{k} {v:.2f} Mpx/s" for k, v in result["mpx_per_s"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--levels", type=int, default=None, help="flood levels (default: the module's)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/postprocess.md")
    args = parser.parse_args()
    if not (DATA / "meta.json").exists():
        sys.exit(f"error: {DATA} not found; set WSI_IRCR_SHARED to the folder holding data/monuseg-train")
    result = run(args.device, args.threads, args.levels)
    text = markdown(result, " ".join(["python -m benchmarks.speed.bench_postprocess", *sys.argv[1:]]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_record:
        path = REPO / "benchmarks" / "postprocess.md"
        head = "" if path.exists() else "# Torch post-processing against scikit-image\n\nEach section is appended by the command it names.\n\n"
        with open(path, "a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
