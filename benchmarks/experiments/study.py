"""The label-ratio study on MoNuSeg (Kumar split): train each method, score it on the test tiles.

Every run is the public CLI: ``wsi-ircr train`` then ``wsi-ircr evaluate`` on the 14 Kumar
test tiles (never used for training or checkpoint selection). Results go to
``runs/study/<run>/`` and the table to ``benchmarks/study.md``.

    python -m benchmarks.experiments.study --preset cpu      # the reduced CPU study (2 cores)
    python -m benchmarks.experiments.study --preset cpu-bf16 --json benchmarks/results/study.json
                                                 # 1,500 steps in bf16 (2 cores, resumable)
    python -m benchmarks.experiments.study --preset gpu      # the full protocol (one H100)
    python -m benchmarks.experiments.study --only mt_miac-L2-s0 --set miac_temperature=0.5 --out runs/variant
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO
METHODS = ("supervised", "mean_teacher", "mt_miac", "mt_piac", "ircr")

PRESETS = {
    # (method, labelled tiles, seed); CPU: short runs on small crops. At 14 tiles the whole
    # pool is labelled and no unlabelled tile is left, so only supervised runs there.
    "cpu": {
        "runs": [(m, n, s) for n in (2, 4) for m in METHODS for s in (0, 1)]
        + [(m, 8, 0) for m in METHODS] + [("supervised", 14, 0)],
        "overrides": ["steps=500", "crop_px=128", "batch_size=4", "unlabelled_batch_size=4", "rampup_steps=150",
                      "val_every=100", "threads=1"],
        "parallel": 2,
    },
    # 3x the cpu preset's steps in bf16 (about 1.7x cheaper a step on a CPU with native bf16): near the
    # plateau of the 2- and 4-tile runs. MIAC at the automatic weight (mt_miac_balanced.yaml's fix:
    # its gradient 0.3x the supervised one) in both MIAC methods. Runs ordered so that the 2- and
    # 4-tile rows with 3 seeds come first; finished runs are skipped, so it continues across sessions.
    "cpu-bf16": {
        "runs": [(m, n, s) for n in (2, 4) for s in (0, 1, 2) for m in METHODS]
        + [(m, 8, 0) for m in METHODS] + [("supervised", 14, 0)],
        "overrides": ["steps=1500", "crop_px=128", "batch_size=4", "unlabelled_batch_size=4", "rampup_steps=300",
                      "val_every=250", "threads=1", "bf16=true", "checkpoint_every=250"],
        "method_overrides": {"mt_miac": ["miac_grad_ratio=0.3"], "ircr": ["miac_grad_ratio=0.3"]},
        "parallel": 2,
    },
    "gpu": {
        "runs": [(m, n, s) for n in (2, 4) for m in METHODS for s in (0, 1)]
        + [(m, 8, 0) for m in METHODS] + [("supervised", 14, 0)],
        "overrides": ["steps=4000", "arch=lite-m", "crop_px=256", "batch_size=16", "unlabelled_batch_size=16",
                      "rampup_steps=1000", "val_every=500"],
        "parallel": 1,
    },
}


def test_folder(out: Path) -> Path:
    """A folder of links to the 14 Kumar test tiles (images/ and labels/)."""
    meta = json.loads((DATA / "meta.json").read_text())
    root = out / "kumar-test"
    for sub, ext in (("images", ".tif"), ("labels", ".png")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for stem in meta["kumar_split"]["test"]:
            link = root / sub / f"{stem}{ext}"
            if not link.exists():
                link.symlink_to(DATA / sub / f"{stem}{ext}")
    return root


def retune(run_dir: Path, method: str) -> bool:
    """Re-tune the post-processing of a run trained before ``tune_marker_radii`` existed.

    The thresholds of ``best.pt`` are tuned again on the run's validation tiles with the
    method config's current grid (no retraining) and ``model.pt`` is rewritten. Returns
    whether the run was re-tuned.
    """
    import dataclasses

    import torch
    import yaml

    from wsi_ircr.config import load_config
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.model.checkpoint import load_checkpoint, save_checkpoint
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.train.tune import tune_postprocess

    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    if "tune_marker_radii" in used:
        return False
    current = load_config(TrainConfig, REPO / "configs/train" / f"{method}.yaml")
    torch.set_num_threads(1)
    best = load_checkpoint(run_dir / "best.pt")
    stems = used["data"]["val"]
    images = [read_image(DATA / "images" / f"{s}.tif") for s in stems]
    labels = [read_label(DATA / "labels" / f"{s}.png") for s in stems]
    best.postprocess = dataclasses.replace(best.postprocess, marker_radius=current.postprocess.marker_radius)
    predictor = Predictor(best, device="cpu")
    best.postprocess, aji = tune_postprocess(predictor, images, labels, current.tune_marker_radii, mpp=best.mpp)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best.meta["metrics"] = {**(best.meta.get("metrics") or {}), "val_aji_tuned_postprocess": aji,
                            "retuned": f"post-processing re-tuned over marker radii {list(current.tune_marker_radii)}",
                            "train_seconds": metrics["train_seconds"]}
    save_checkpoint(run_dir / "model.pt", best)
    used["tune_marker_radii"] = list(current.tune_marker_radii)
    used["retuned_without_training"] = True
    with atomic_open(run_dir / "config.yaml") as f:
        yaml.safe_dump(used, f, sort_keys=False)
    for stale in ("test.json", "eval.json"):
        (run_dir / stale).unlink(missing_ok=True)
    return True


def evaluate(run_dir: Path, tests: Path) -> dict:
    """Mean test metrics of ``run_dir/model.pt`` by ``wsi-ircr evaluate``."""
    subprocess.run([sys.executable, "-m", "wsi_ircr", "evaluate", "--images", str(tests / "images"), "--labels",
                    str(tests / "labels"), "--model", str(run_dir / "model.pt"), "--json", str(run_dir / "eval.json"),
                    "--device", "cpu", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "eval.json").read_text())["mean"]


def study_rows(out: Path) -> list[dict]:
    """``benchmarks/results/study.json`` rows of the finished runs in ``out`` (issue 9's schema, plus
    the run name, its command and the validation AJI at every validation step)."""
    rows = []
    for path in sorted(out.glob("*/test.json")):
        r = json.loads(path.read_text())
        metrics = json.loads((path.parent / "metrics.json").read_text())
        best = metrics["best"]
        rows.append({"method": r["method"], "labelled": r["labelled"], "seed": r["seed"], "steps": metrics["steps"],
                     "minutes": round(r["train_seconds"] / 60, 2),
                     "val_aji": round(best.get("aji_tuned_postprocess", best["aji"]), 4),
                     "test_aji": round(r["aji"], 4), "test_dice": round(r["dice"], 4), "test_pq": round(r["pq"], 4),
                     "test_f1": round(r["f1"], 4), "name": r["name"], "best_step": best["step"],
                     "val_curve": [[h["step"], round(h["aji"], 4)] for h in metrics.get("history", [])],
                     "resumed": r.get("resumed", False),
                     "command": r["command"]})
    return rows


def write_study_json(path: Path | None, out: Path) -> None:
    """Write ``study_rows(out)`` to ``path`` (nothing when ``path`` is None)."""
    if path is not None:
        path.write_text(json.dumps(study_rows(out), indent=1) + "\n")


def run_overrides(preset: dict, method: str, extra: list[str]) -> list[str]:
    """The ``--set`` overrides of one run: the preset's, then its method's, then the command line's."""
    return preset["overrides"] + preset.get("method_overrides", {}).get(method, []) + extra


def run_one(method: str, n_labelled: int, seed: int, overrides: list[str], out: Path, tests: Path) -> dict:
    name = f"{method}-L{n_labelled}-s{seed}"
    run_dir = out / name
    result_file = run_dir / "test.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() else None
    if previous and retune(run_dir, method):
        scores = evaluate(run_dir, tests)
        result = {**previous, **scores, "retuned": True}
        result_file.write_text(json.dumps(result, indent=1))
        print(f"{name} (re-tuned): AJI {scores['aji']:.4f}", file=sys.stderr, flush=True)
        return result
    if result_file.exists():
        return json.loads(result_file.read_text())
    train = [sys.executable, "-m", "wsi_ircr", "train", "--config", str(REPO / "configs/train" / f"{method}.yaml"),
             "--out", str(run_dir), "--seed", str(seed), "--set", f"data.labelled={n_labelled}",
             "--set", f"data.label_seed={seed}", "--quiet"]
    resumed = (run_dir / "last.pt").exists()  # a run killed before it finished continues where it stopped
    train.append("--resume" if resumed else "--overwrite")
    for item in overrides:
        train += ["--set", item]
    t0 = time.time()
    subprocess.run(train, check=True)
    seconds = time.time() - t0
    scores = evaluate(run_dir, tests)
    result = {"name": name, "method": method, "labelled": n_labelled, "seed": seed, "train_seconds": seconds, **scores,
              "command": " ".join(a for a in train[1:] if a not in ("--resume", "--overwrite")).replace(f"{REPO}/", "")}
    if resumed:
        result["resumed"] = True  # train_seconds counts only the part after the resume
    result_file.write_text(json.dumps(result, indent=1))
    print(f"{name}: AJI {scores['aji']:.4f} Dice {scores['dice']:.4f} PQ {scores['pq']:.4f} ({seconds / 60:.1f} min)",
          file=sys.stderr, flush=True)
    return result


def table(results: list[dict]) -> str:
    """Markdown table: one row per (labelled tiles, method), means over seeds plus per-seed AJI."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["labelled"], r["method"]), []).append(r)
    lines = ["| labelled tiles (of 16) | method | seeds | AJI | Dice | PQ | F1 | AJI per seed | minutes/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (n, method) in sorted(groups, key=lambda k: (k[0], METHODS.index(k[1]))):
        rs = sorted(groups[(n, method)], key=lambda r: r["seed"])
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("aji", "dice", "pq", "f1", "train_seconds")}
        per_seed = " / ".join(f"{r['aji']:.3f}{'*' if r.get('retuned') else ''}" for r in rs)
        lines.append(f"| {n} | {method} | {len(rs)} | {mean['aji']:.4f} | {mean['dice']:.4f} | {mean['pq']:.4f} | "
                     f"{mean['f1']:.4f} | {per_seed} | {mean['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def _native_cpu_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (the bf16 preset's speed depends on it)."""
    import torch

    from wsi_ircr.model.inference import native_bf16

    return native_bf16(torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    parser.add_argument("--only", help="Comma-separated run names (method-L<n>-s<seed>) to run.")
    parser.add_argument("--parallel", type=int, help="Concurrent runs (default from the preset).")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override added to the preset's for every run (repeatable), e.g. for a variant in its own --out.")
    parser.add_argument("--table", action="store_true", help="Only print the table of the finished runs.")
    parser.add_argument("--json", type=Path, help="Also write the finished runs of --out here (study.json rows).")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(p.read_text()) for p in sorted(args.out.glob("*/test.json"))]))
        write_study_json(args.json, args.out)
        return
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found; the study needs ../shared/data/monuseg-train")
    preset = PRESETS[args.preset]
    bf16 = [o for o in preset["overrides"] + args.extra if o.startswith("bf16=")]  # the last one wins
    if bf16 and bf16[-1] == "bf16=true" and not _native_cpu_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated and many times slower than "
              "fp32 here; add --set bf16=false for fp32 runs (about 20 min per teacher-student run on one thread)",
              file=sys.stderr, flush=True)
    tests = test_folder(args.out)
    runs = preset["runs"]
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if f"{r[0]}-L{r[1]}-s{r[2]}" in wanted]
    with ThreadPoolExecutor(args.parallel or preset["parallel"]) as pool:
        results = list(pool.map(lambda r: run_one(*r, run_overrides(preset, r[0], args.extra), args.out, tests), runs))
    (args.out / f"results-{args.preset}.json").write_text(json.dumps(results, indent=1))
    write_study_json(args.json, args.out)
    print(table(results))


if __name__ == "__main__":
    main()
