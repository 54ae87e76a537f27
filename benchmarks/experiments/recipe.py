"""The training-recipe table: accuracy on the Kumar test tiles against CPU minutes.

Every row is a run of ``configs/train/recipe.yaml`` (Kumar pool, 4 validation tiles for
selection and post-processing tuning) with the overrides of its command, scored with the
public ``wsi-ircr evaluate`` on the 14 Kumar test tiles, which no choice ever looks at.

    python -m benchmarks.experiments.recipe train NAME [--sources] [--set KEY=VALUE ...]   # runs/recipe/NAME (resumes if cut)
    python -m benchmarks.experiments.recipe score NAME [NAME ...] [--tta 8]     # evaluates, records, rewrites recipe.md

Results: ``benchmarks/results/recipe.json`` (one entry per scored run) and the table in
``benchmarks/recipe.md``. CPU minutes = training wall minutes x torch threads of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO
from benchmarks.experiments.study import test_folder

RUNS = REPO / "runs" / "recipe"
SHARED = DATA.parent
RESULTS = REPO / "benchmarks" / "results" / "recipe.json"
TABLE = REPO / "benchmarks" / "recipe.md"
CONFIG = "configs/train/recipe.yaml"


def source_val(kumar_val: list[str]) -> dict[str, tuple]:
    """Validation tiles per source: (folder, labels folder, mpp, stems). The 4 Kumar ones
    (``kumar_val``: selection) and held-out tiles of the extra sources (excluded from
    training by configs/train/sources.yaml)."""
    return {
        "kumar": ("monuseg-train", "labels", 0.25, kumar_val),
        "nuinsseg": ("nuinsseg-spleen", "labels", 0.25, [f"human_spleen_{i:02d}" for i in (6, 12, 18, 24, 30, 34)]),
        "cryonuseg": ("cryonuseg-frozen", "binary", 0.24, [f"Human_{o}_03" for o in ("AdrenalGland", "Larynx", "Mediastinum",
                                                                                  "Pancreas", "Skin", "Testes")]),
    }


def train(name: str, overrides: list[str], sources: bool) -> None:
    import yaml

    out = RUNS / name
    args = ["train", "--config", CONFIG, "--out", str(out.relative_to(REPO))]
    if sources:
        extra = yaml.safe_load((REPO / "configs/train/sources.yaml").read_text())["data"]["extra"]
        overrides = [f"data.extra={json.dumps(extra)}", *overrides]
    args += [a for o in overrides for a in ("--set", o)]
    out.mkdir(parents=True, exist_ok=True)
    shown = (f"python -m benchmarks.experiments.recipe train {name} --sources" + "".join(f" --set {o}" for o in overrides[1:])
             if sources else " ".join(["wsi-ircr", *args]))  # the user's command, for the table
    (out / "command.txt").write_text(shown + "\n")
    cmd = [sys.executable, "-m", "wsi_ircr", *args] + (["--resume"] if (out / "last.pt").exists() else [])
    subprocess.run(cmd, check=True, cwd=REPO)


def score(name: str, tta: int) -> dict:
    import torch

    out = RUNS / name
    suffix = "" if tta == 1 else f"-tta{tta}"
    scores = out / f"test{suffix}.json"
    if not scores.exists():
        folder = test_folder(RUNS)
        subprocess.run([sys.executable, "-m", "wsi_ircr", "evaluate", "--images", str(folder / "images"), "--labels", str(folder / "labels"),
                        "--model", str(out / "model.pt"), "--json", str(scores), "--tta", str(tta), "--quiet"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    test = json.loads(scores.read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    cfg = ckpt["meta"]["config"]
    split = json.loads((DATA / "meta.json").read_text())["kumar_split"]

    def mean_aji(stems: list[str]) -> float:
        return sum(test["per_image"][s]["aji"] for s in stems) / len(stems)

    sources = {}
    for source, (folder, labels, mpp, stems) in source_val(split["val"]).items():
        root = RUNS / f"val-{source}"
        for sub_dir, src in (("images", "images"), ("labels", labels)):
            (root / sub_dir).mkdir(parents=True, exist_ok=True)
            for stem in stems:
                ext = ".tif" if folder == "monuseg-train" and sub_dir == "images" else ".png"
                link = root / sub_dir / f"{stem}{ext}"
                if not link.exists():
                    link.symlink_to(SHARED / folder / src / f"{stem}{ext}")
        path = out / f"val-{source}{suffix}.json"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "wsi_ircr", "evaluate", "--images", str(root / "images"), "--labels", str(root / "labels"),
                            "--model", str(out / "model.pt"), "--json", str(path), "--tta", str(tta), "--mpp", str(mpp), "--quiet"],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        sources[source] = json.loads(path.read_text())["mean"]
    minutes = metrics["train_seconds"] / 60
    return {
        "name": name + suffix,
        "command": (out / "command.txt").read_text().strip() if (out / "command.txt").exists() else "",
        "arch": cfg["arch"], "mpp": ckpt["mpp"], "steps": cfg["steps"], "batch": f"{cfg['batch_size']} x {cfg['crop_px']}",
        "tta": tta, "precision": f"{'bf16' if cfg.get('bf16') else 'fp32'} / {'bf16' if test.get('bf16') else 'fp32'}",
        "threads": cfg["threads"], "train_minutes": round(minutes, 1),
        "cpu_minutes": round(minutes * max(cfg["threads"], 1), 1),
        "best_step": metrics["best"]["step"],
        # a run that trains on the validation tiles (data.val empty) has no validation figure
        "val_aji": round(sources["kumar"]["aji"], 4) if cfg["data"]["val"] else "trained on",
        **{f"test_{k}": round(test["mean"][k], 4) for k in ("aji", "dice", "pq", "f1")},
        "test_aji_same_organ": round(mean_aji(split["testA"]), 4), "test_aji_new_organ": round(mean_aji(split["testB"]), 4),
        "val_nuinsseg_aji": round(sources["nuinsseg"]["aji"], 4), "val_cryonuseg_dice": round(sources["cryonuseg"]["dice"], 4),
    }


def write_table(rows: list[dict]) -> None:
    head = ("| run | arch | mpp | batch | steps | train / eval precision | TTA | CPU min | val AJI | NuInsSeg val AJI | CryoNuSeg val Dice "
            "| test AJI | Dice | PQ | F1 | AJI same / new organ |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['name']} | {r['arch']} | {r['mpp']} | {r['batch']} | {r['steps']} | {r.get('precision', 'fp32 / fp32')} | {r['tta']} | {r['cpu_minutes']} | "
                   f"{r['val_aji']} | {r['val_nuinsseg_aji']} | {r['val_cryonuseg_dice']} | {r['test_aji']} | {r['test_dice']} | "
                   f"{r['test_pq']} | {r['test_f1']} | {r['test_aji_same_organ']} / {r['test_aji_new_organ']} |\n" for r in rows)
    commands = "".join(f"- {r['name']}: `{r['command']}`" + (f" then `--tta {r['tta']}` at evaluation" if r["tta"] != 1 else "") + "\n"
                       for r in rows)
    text = TABLE.read_text() if TABLE.exists() else ""
    start, end = "<!-- table -->\n", "<!-- /table -->\n"
    block = start + head + body + "\nCommands (each trains `runs/recipe/NAME`, then `python -m benchmarks.experiments.recipe score NAME`):\n\n" + commands + end
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += block
    TABLE.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--sources", action="store_true", help="add the extra labelled sources of configs/train/sources.yaml")
    s = sub.add_parser("score")
    s.add_argument("names", nargs="+")
    s.add_argument("--tta", type=int, default=1)
    args = parser.parse_args()
    if args.what == "train":
        train(args.name, args.overrides, args.sources)
        return
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for name in args.names:
        row = score(name, args.tta)
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        print(json.dumps(row))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows)


if __name__ == "__main__":
    main()
