"""Issue 20, item 6: the Kumar protocol run of the recipe (row m2500 of benchmarks/recipe.md) with
IRCR on top and unlabelled tissue from the NuInsSeg and CryoNuSeg images.

The unlabelled pool is every NuInsSeg spleen and CryoNuSeg frozen-section image except the tiles
other studies score on: the adaptation study's test and validation tiles (``adapt.split``; its
zero-shot rows stay zero-shot) and the recipe study's held-out tiles of those sources
(``recipe.source_val``; the recipe table's NuInsSeg / CryoNuSeg columns stay held out). Never
CoNSeP (licence not stated), never a MoNuSeg tile (the labelled data is recipe.yaml's, as m2500's).
The folder holds links to ../shared/data, never copies:

    python -m benchmarks.experiments.item6 pool runs/item6/unlabelled   # links + pool.json (stems, licences)
    python -m benchmarks.experiments.item6 probe runs/item6/unlabelled  # seconds per step, IRCR against Mean Teacher
    python -m benchmarks.experiments.item6 bn runs/item6/ircr2500/best.pt  # Kumar val AJI as saved / BatchNorm from Kumar crops

then the training command of benchmarks/adapt.md ("What was not done", item 6).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.experiments import adapt, recipe

# source key of adapt.TARGETS -> key of recipe.source_val, licence (../shared/data/README.md)
SOURCES = {"nuinsseg": ("nuinsseg", "CC BY 4.0"), "cryonuseg": ("cryonuseg", "CC BY-NC-SA 4.0")}


def pool_stems() -> dict[str, list[str]]:
    """Per source, the stems of the unlabelled pool: adapt's train split minus its validation
    tiles, minus the recipe study's held-out tiles of that source."""
    held_out = recipe.source_val([])
    pool = {}
    for target, (recipe_key, _) in SOURCES.items():
        split = adapt.split(target)
        leave_out = set(split["test"]) | set(split["val"]) | set(held_out[recipe_key][3])
        pool[target] = sorted(set(split["unlabelled"]) - leave_out)
    return pool


def build_pool(root: Path) -> dict:
    """``root/images``: links to the pool's images; ``root/pool.json``: per source its folder,
    licence and stems. Returns that description."""
    pool = pool_stems()
    for target, stems in pool.items():
        adapt.link_folder(root, stems, target, with_labels=False)
    description = {target: {"folder": adapt.TARGETS[target]["folder"], "licence": SOURCES[target][1], "stems": stems}
                   for target, stems in pool.items()}
    (root / "pool.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


CONFIG = adapt.REPO / "configs" / "train" / "recipe.yaml"
# the protocol run: row m2500's settings, 8 unlabelled crops a step, the study's consistency weight
RUN_SETS = ["arch=lite-m", "steps=2500", "val_every=500", "scale_jitter=0.15", "ema_weights=true", "ema_alpha=0.99",
            "mt_weight=10", "unlabelled_batch_size=8", "bf16=false", "threads=1"]
METHOD_SETS = {"ircr": ["miac_weight=100", "piac_weight=1", "piac_mode=pseudo_label"],  # configs/train/ircr.yaml's terms
               "mean_teacher": ["miac_weight=0", "piac_weight=0"]}


def probe(unlabelled: Path, steps: int, skip: int) -> dict[str, float]:
    """Seconds per training step of each method of ``METHOD_SETS`` with the run's settings: the
    mean over ``steps`` steps after ``skip`` warm-up steps (every term is on from step 0)."""
    import torch

    from wsi_ircr.config import resolve_config
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.data import load_train_data
    from wsi_ircr.train.loop import Trainer, start_priors

    seconds = {}
    for method, sets in METHOD_SETS.items():
        cfg = resolve_config(TrainConfig, CONFIG, RUN_SETS + sets, {"data.unlabelled": str(unlabelled.resolve())})
        torch.set_num_threads(cfg.threads)
        data = load_train_data(cfg.data, CONFIG.parent, cfg.model_mpp)
        trainer = Trainer(cfg, Path("unused"), data, start_priors(data, None, cfg))
        for _ in range(skip):
            trainer.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        seconds[method] = (time.perf_counter() - t0) / steps
        print(f"{method}: {seconds[method]:.2f} s/step ({steps} steps after {skip}, {cfg.threads} thread(s))", flush=True)
    print(f"ircr / mean_teacher: {seconds['ircr'] / seconds['mean_teacher']:.2f}x")
    return seconds


def bn_check(model: Path, crops: int) -> dict[str, float]:
    """Kumar validation AJI of ``model`` (recipe.yaml's 4 tiles, the model's post-processing) as
    saved and with its BatchNorm statistics re-estimated on ``crops`` plain crops (no photometric
    augmentation) of the 12 labelled Kumar tiles: how much of a semi-supervised run's validation
    score its BatchNorm statistics (the student's, last updated on strongly augmented crops of
    the unlabelled sources) cost on the labelled domain."""
    import numpy as np
    import torch

    from wsi_ircr.config import resolve_config
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.data import CropSampler, load_train_data
    from wsi_ircr.train.loop import _to_tensor, recalibrate_bn, validate

    ckpt = load_checkpoint(model)
    cfg = resolve_config(TrainConfig, CONFIG, [f"arch={ckpt.arch}", "threads=1"])
    torch.set_num_threads(1)
    data = load_train_data(cfg.data, CONFIG.parent, ckpt.mpp)
    net, device = ckpt.build(), torch.device("cpu")
    scores = {"saved": validate(net, data.val, cfg, device)["aji"]}
    sampler = CropSampler(data.labelled, cfg.crop_px, np.random.default_rng(0))
    recalibrate_bn(net, (_to_tensor(sampler.sample(8)["image"], device) for _ in range(0, crops, 8)))
    scores[f"bn_kumar_{crops}"] = validate(net, data.val, cfg, device)["aji"]
    print(json.dumps({"model": model.name, **{k: round(v, 4) for k, v in scores.items()}}))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("pool", help="build the unlabelled folder (links) and its pool.json")
    pool.add_argument("root", type=Path)
    timing = sub.add_parser("probe", help="seconds per step of IRCR and Mean Teacher with the run's settings")
    timing.add_argument("unlabelled", type=Path, help="the pool folder (its images/ is used)")
    timing.add_argument("--steps", type=int, default=8)
    timing.add_argument("--skip", type=int, default=2)
    bn = sub.add_parser("bn", help="Kumar val AJI as saved and with BatchNorm statistics from Kumar crops")
    bn.add_argument("model", type=Path)
    bn.add_argument("--crops", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "bn":
        bn_check(args.model, args.crops)
        return
    if args.command == "probe":
        probe(args.unlabelled / "images", args.steps, args.skip)
        return
    description = build_pool(args.root)
    counts = ", ".join(f"{len(d['stems'])} {t}" for t, d in description.items())
    print(f"{args.root / 'images'}: {counts} images")


if __name__ == "__main__":
    main()
