"""The adaptation study: the bundled model adapted to a target it never saw, scored on the target's test tiles.

Every run is the public CLI (``wsi-ircr adapt``, then ``wsi-ircr evaluate`` on the test tiles).
Settings are chosen on validation tiles taken from the target's *train* split; unlabelled crops
come from the other train tiles; the test tiles are scored once per finished run and never used
for a choice. Rows go to ``benchmarks/results/adapt.json`` as they finish (a killed study
continues where it stopped: finished rows are skipped, a run cut short resumes from its
last.pt), and the table to ``benchmarks/adapt.md``.

    python -m benchmarks.experiments.adapt                       # every row of the CPU plan
    python -m benchmarks.experiments.adapt --only ircr-L0-s0      # one row
    python -m benchmarks.experiments.adapt --table                # rewrite the report's table only
    bash benchmarks/experiments/gpu_adapt.sh                      # the deciding rows, 3 seeds, 3 targets on one CUDA GPU

CoNSeP's licence is not stated: the data is read from ../shared and adapted weights stay in runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MONUSEG, REPO, load_average
from benchmarks.common import SHARED as SHARED_ROOT

SHARED = SHARED_ROOT / "data"
RESULTS = REPO / "benchmarks" / "results" / "adapt.json"
REPORT = REPO / "benchmarks" / "adapt.md"
RUNS = Path("runs/adapt")  # relative to the repository root, where every command runs
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"

TARGETS = {  # n_test: test tiles drawn (seed 0) where the source has no test split
    "consep": {"folder": "consep-colorectal", "mpp": 0.25, "image_ext": ".jpg", "n_val": 3, "n_labelled": 2},
    # scale "about 40x", not stated by the source (configs/train/sources.yaml uses 0.25 too)
    "nuinsseg": {"folder": "nuinsseg-spleen", "mpp": 0.25, "image_ext": ".png", "n_val": 3, "n_labelled": 2, "n_test": 12},
    # 0.2265-0.2547 um/px per tile; labels/ are connected components of binary masks: Dice (pixel F1) is the score,
    # and labelled rows train on them as masks (--labels-kind binary: NP branch only, kept step by validation Dice)
    "cryonuseg": {"folder": "cryonuseg-frozen", "mpp": 0.24, "image_ext": ".png", "n_val": 3, "n_labelled": 2, "n_test": 10,
                  "labels_kind": "binary"},
}
VARIANTS = {  # study rows with settings the adapt configs do not have: name -> --set items
    "": [],
    "anchor0.01": ["anchor_weight=0.01"],  # L2-SP: a sum (theta - theta_0)^2
    "anchor0.1": ["anchor_weight=0.1"],
    "anchor1": ["anchor_weight=1"],
    "ema995": ["ema_alpha=0.995"],  # a slower teacher
    "ema999": ["ema_alpha=0.999"],
    "conf0.6": ["mt_confidence=0.6"],  # Mean Teacher term only where the teacher's |2p - 1| >= 0.6
    "bnre": ["bn_recalibrate_crops=64"],  # precise BatchNorm statistics of the shipped teacher (64 crops)
    "bnre+anchor0.1": ["bn_recalibrate_crops=64", "anchor_weight=0.1"],
    "ema995+lr2.5e-4": ["ema_alpha=0.995", "lr=0.00025"],  # half the step size: less drift after the early peak?
    "ema995+piac2": ["ema_alpha=0.995", "piac_weight=2"],  # twice the weight of the term that pays
    # the source's labelled data as an anchor (issue 20 item 2): the bundled model's own 30 MoNuSeg tiles as
    # data.extra, so every step also has a supervised term on them (path relative to the repository root)
    "ema995+src": ["ema_alpha=0.995", "data.extra=[{images: %s, labels: %s, mpp: 0.25}]"
                   % (os.path.relpath(MONUSEG / "images", REPO), os.path.relpath(MONUSEG / "labels", REPO))],
}

def plan(steps: int, long: int) -> list[tuple[str, int, int, int]]:
    """Rows (method, labelled tiles, seed, steps): 0-label Mean Teacher vs IRCR, 2-label supervised
    vs IRCR, BatchNorm statistics alone (``bn_only``: Mean Teacher at lr 1e-9, so only the running
    statistics move), second and third seeds of the four compared rows, one Mean Teacher run 4x
    as long validated every ``steps`` (does the student drift?), then the single terms."""
    compared = [("mean_teacher", 0), ("ircr", 0), ("supervised", 2), ("ircr", 2)]
    return ([(m, n, 0, steps) for m, n in compared] + [("bn_only", 0, 0, steps)]
            + [(m, n, s, steps) for s in (1, 2) for m, n in compared[2:] + compared[:2]] + [("mean_teacher", 0, 0, long)]
            + [("mt_piac", 0, 0, steps), ("mt_miac", 0, 0, steps)])


PRESETS = {
    # fp32 on 2 CPU cores shared with three other jobs (load 8-11): a step of 4 + 4 crops of 128 px
    # took 4.7 s of CPU and ~9-17 s of wall time, so 40 steps a row
    "cpu": {"steps": 40, "long": 160, "sets": ["threads=2", "bf16=false", "checkpoint_every=10", "crop_px=128"],
            "results": RESULTS, "runs": RUNS},
    # benchmarks/experiments/gpu_adapt.sh: one CUDA GPU, the CPU study's settings (fp32, 4 + 4 crops of 128 px,
    # validated every 40 steps), so that its rows (--rows ...:160, in runs side by side) repeat the CPU study's
    "gpu": {"steps": 40, "long": 160, "sets": ["device=cuda", "threads=2", "bf16=false", "checkpoint_every=10", "crop_px=128"],
            "results": REPO / "benchmarks" / "results" / "adapt-gpu.json", "runs": Path("runs/adapt-gpu")},
}
STEPS, PLAN, COMMON_SETS = 40, plan(40, 160), PRESETS["cpu"]["sets"]


def use_preset(name: str) -> None:
    """Point the module's settings (steps, plan, --set list, results file, run folder) at a preset."""
    global STEPS, PLAN, COMMON_SETS, RESULTS, RUNS
    preset = PRESETS[name]
    STEPS, PLAN, COMMON_SETS = preset["steps"], plan(preset["steps"], preset["long"]), preset["sets"]
    RESULTS, RUNS = preset["results"], preset["runs"]

def use_threads(n: int) -> None:
    """Every command runs with ``n`` torch / OpenMP threads."""
    global COMMON_SETS
    COMMON_SETS = [f"threads={n}" if item.startswith("threads=") else item for item in COMMON_SETS]
    ENV["OMP_NUM_THREADS"] = str(n)


def parse_row(text: str) -> tuple[str, int, int, int]:
    """``METHOD:LABELLED:SEED:STEPS`` -> a plan row (exit 2 with the expected form when malformed)."""
    parts = text.split(":")
    from wsi_ircr.cli.adapt import METHODS

    methods = set(METHOD_SETS) | set(METHODS)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]) or parts[0].partition("+")[0] not in methods \
            or parts[0].partition("+")[2] not in VARIANTS:
        print(f"--rows {text}: expected METHOD[+VARIANT]:LABELLED:SEED:STEPS with METHOD in {sorted(methods)} "
              f"and VARIANT in {sorted(v for v in VARIANTS if v)}", file=sys.stderr)
        sys.exit(2)
    return parts[0], int(parts[1]), int(parts[2]), int(parts[3])


METHOD_SETS = {  # study rows that are not an adapt --method of their own
    "mt_miac": ("ircr", ["piac_weight=0"]),  # ircr's config with one term off (mt_piac has its own since session 6)
    "bn_only": ("mean_teacher", ["lr=1e-9"]),  # weights frozen in effect: only BatchNorm statistics adapt
}
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}  # runs where wsi-ircr is not installed too


def split(target: str) -> dict[str, list[str]]:
    """Validation, labelled and unlabelled stems (from the train split) and the test stems."""
    import csv

    spec = TARGETS[target]
    folder = SHARED / spec["folder"]
    if "n_test" in spec:  # no test split of its own: n_test tiles drawn with seed 0 (the same every run)
        stems = sorted(p.stem for p in (folder / "images").glob(f"*{spec['image_ext']}"))
        pick = np.random.default_rng(0).permutation(len(stems))
        test = sorted(stems[i] for i in pick[: spec["n_test"]])
        train = sorted(set(stems) - set(test))
    else:
        with open(folder / "manifest.csv") as f:
            rows = list(csv.DictReader(f))
        train = sorted(r["stem"] for r in rows if r["split"] == "train")
        test = sorted(r["stem"] for r in rows if r["split"] == "test")
    order = np.random.default_rng(0).permutation(len(train))
    val = sorted(train[i] for i in order[: spec["n_val"]])
    labelled = sorted(train[i] for i in order[spec["n_val"] : spec["n_val"] + spec["n_labelled"]])
    return {"val": val, "labelled": labelled, "unlabelled": sorted(set(train) - set(val)), "test": test}


def link_folder(root: Path, stems: list[str], target: str, with_labels: bool = True) -> Path:
    """``root/images`` (and ``root/labels``) of links to the target's files for ``stems``."""
    spec = TARGETS[target]
    src = SHARED / spec["folder"]
    for sub, ext in (("images", spec["image_ext"]), ("labels", ".png"))[: 2 if with_labels else 1]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            link = root / sub / f"{stem}{ext}"
            if not link.exists():
                try:
                    link.symlink_to(src / sub / f"{stem}{ext}")
                except FileExistsError:  # made meanwhile by a study process running side by side
                    pass
    return root


def prepare(target: str) -> dict[str, Path]:
    """The folders every command of ``target`` reads (links under runs/adapt/<target>/data)."""
    s, data = split(target), RUNS / target / "data"
    return {
        "val": link_folder(data / "val", s["val"], target),
        "val_labelled": link_folder(data / "val_labelled", s["val"] + s["labelled"], target),
        "unlabelled": link_folder(data / "unlabelled", s["unlabelled"], target, with_labels=False) / "images",
        "test": link_folder(data / "test", s["test"], target),
    }


def run(cmd: list[str]) -> float:
    """Run a ``wsi-ircr ...`` command line with this Python (``python -m wsi_ircr``); its CPU seconds."""
    import resource

    print("$", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "wsi_ircr", *cmd[1:]], check=True, env=ENV, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def evaluate(model: str | None, folder: Path, out_json: Path, mpp: float) -> dict:
    """Mean scores of ``model`` (None: the bundled one) on ``folder``; cached in ``out_json``."""
    if not out_json.exists():
        cmd = ["wsi-ircr", "evaluate", "--images", str(folder / "images"), "--labels", str(folder / "labels"),
               "--mpp", str(mpp), "--fp32", "--quiet", "--json", str(out_json)]
        run(cmd + (["--model", model] if model else []))
    mean = json.loads((REPO / out_json).read_text())["mean"]
    return {k: round(mean[k], 4) for k in ("aji", "dice", "pq", "f1")}


def adapt_command(target: str, method: str, labelled: int, seed: int, steps: int, folders: dict[str, Path], out: Path) -> list[str]:
    base, _, variant = method.partition("+")  # e.g. mean_teacher+anchor: the method with VARIANTS["anchor"]
    config_method, extra = METHOD_SETS.get(base, (base, []))
    extra = extra + VARIANTS[variant]
    spec = TARGETS[target]
    s = split(target)
    cmd = ["wsi-ircr", "adapt", "--method", config_method, "--steps", str(steps), "--seed", str(seed),
           "--mpp", str(spec["mpp"]), "--out", str(out), "--quiet"]
    if config_method != "supervised":
        cmd += ["--unlabelled", str(folders["unlabelled"])]
    folder = folders["val_labelled"] if labelled else folders["val"]
    cmd += ["--images", str(folder / "images"), "--labels", str(folder / "labels")]
    if labelled and spec.get("labels_kind", "instances") != "instances":  # 0-label rows: AJI chooses, as in sessions 1-2
        cmd += ["--labels-kind", spec["labels_kind"]]
    cmd += ["--set", f"data.val=[{','.join(s['val'])}]", "--set", f"data.labelled={labelled}",
            "--set", f"val_every={STEPS}"]  # every 40 steps: once in a 40-step row
    for item in COMMON_SETS + extra:
        cmd += ["--set", item]
    return cmd


def load_rows() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def save_rows(rows: list[dict]) -> None:
    from wsi_ircr.io.atomic import atomic_open

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(RESULTS) as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def add_row(row: dict) -> list[dict]:
    """Append ``row`` to the results file (replacing a row of the same target and name), reading
    the file again under a lock so that study processes running side by side (the GPU script)
    keep each other's rows; returns every row."""
    import fcntl

    lock_path = REPO / RUNS / f"{RESULTS.stem}.lock"  # under runs/: not tracked
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in load_rows() if (r["target"], r["name"]) != (row["target"], row["name"])] + [row]
        save_rows(rows)
    return rows


def row_name(method: str, labelled: int, seed: int, steps: int = STEPS) -> str:
    return f"{method}-L{labelled}-s{seed}" + (f"-{steps}" if steps != STEPS else "")


def zero_shot(target: str, folders: dict[str, Path]) -> dict:
    """The bundled model as shipped, on the validation and test tiles."""
    mpp = TARGETS[target]["mpp"]
    out = RUNS / target / "zero_shot"
    out.mkdir(parents=True, exist_ok=True)
    val = evaluate(None, folders["val"], out / "val.json", mpp)
    test = evaluate(None, folders["test"], out / "test.json", mpp)
    cmd = f"wsi-ircr evaluate --images {folders['test']}/images --labels {folders['test']}/labels --mpp {mpp} --fp32"
    return {"name": "zero_shot", "target": target, "method": "zero_shot", "labelled": 0, "seed": None, "steps": 0,
            "minutes": 0.0, "val": val, "test": test, "command": cmd}


def adapted(target: str, method: str, labelled: int, seed: int, steps: int, folders: dict[str, Path]) -> dict:
    name = row_name(method, labelled, seed, steps)
    out = RUNS / target / name
    cmd = adapt_command(target, method, labelled, seed, steps, folders, out)
    cpu, resumed = None, False
    if not (REPO / out / "model.pt").exists():
        resumed = (REPO / out / "last.pt").exists()
        cpu = run(cmd + (["--resume"] if resumed else []))
        cpu = None if resumed else cpu  # the CPU time of a whole run only
    metrics = json.loads((REPO / out / "metrics.json").read_text())
    kept, last = metrics["best"]["val"], metrics["history"][-1]  # model.pt holds the best validated step
    mpp = TARGETS[target]["mpp"]
    test = evaluate(str(out / "model.pt"), folders["test"], out / "test.json", mpp)
    if last["step"] == kept["step"]:
        test_last = test
    else:  # what a user without labelled validation tiles gets: the teacher at the last step
        last_model(out)
        test_last = evaluate(str(out / "last_model.pt"), folders["test"], out / "test_last.json", mpp)
    return {"name": name, "target": target, "method": method, "labelled": labelled,
            "seed": seed, "steps": steps, "minutes": round(metrics["train_seconds"] / 60, 1),
            "cpu_minutes": None if cpu is None else round(cpu / 60, 1), "load": load_average(),
            "resumed": resumed,  # minutes then count the last stretch only
            "val": {k: round(kept[k], 4) for k in ("aji", "dice", "pq", "f1")}, "test": test,
            "kept_step": kept["step"], "val_last": {k: round(last[k], 4) for k in ("aji", "dice", "pq", "f1")},
            "test_last": test_last,
            "val_history": [{k: round(h[k], 4) if k != "step" else h[k] for k in ("step", "aji", "dice", "pq")}
                            for h in metrics["history"]],
            "command": " ".join(cmd)}


def last_model(out: Path) -> Path:
    """``out/last_model.pt``: the network ``adapt`` ships (the teacher, EMA of the weights) at the
    last step, taken from ``out/last.pt`` (the run's state at its last step)."""
    from dataclasses import replace

    from wsi_ircr.model.checkpoint import load_checkpoint, save_checkpoint

    path = REPO / out / "last_model.pt"
    if not path.exists():
        ckpt = load_checkpoint(REPO / out / "last.pt")
        save_checkpoint(path, replace(ckpt, model_state=ckpt.train_state["teacher"], train_state=None))
    return path


def kept_is_last(row: dict) -> bool:
    """Whether a row's kept (best-validated: the first step with the highest AJI) step is its last."""
    history = row.get("val_history") or []
    if not history:
        return True
    best = max(h["aji"] for h in history)
    return next(h["step"] for h in history if h["aji"] == best) == history[-1]["step"]


def test_last(row: dict) -> dict | None:
    """Test scores of the last step: recorded (rows run since session 3), else the kept step's
    when that was the last step (the same model), else unknown (None)."""
    return row.get("test_last") or (row["test"] if kept_is_last(row) else None)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (target, method, labelled), mean (and spread) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"], r["labelled"], r["steps"]), []).append(r)
    lines = ["| target | method | labelled tiles | seeds | steps | min / run | val AJI (kept step) | val AJI (last step) "
             "| test AJI | test Dice | test PQ | test F1 | test AJI (last step) | test Dice (last step) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(TARGETS)
    for (target, method, labelled, _), rs in sorted(groups.items(), key=lambda kv: order.index(kv[0][0])):
        def stat(split_: str, key: str) -> str:
            v = [r[split_][key] for r in rs]
            return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")

        seeds = ",".join(str(r["seed"]) for r in rs) if rs[0]["seed"] is not None else "-"
        last = [r["val_history"][-1]["aji"] for r in rs if r.get("val_history")]
        last_text = (f"{np.mean(last):.3f}" + (f" ± {np.std(last):.3f}" if len(last) > 1 else "")) if last else stat("val", "aji")
        def last_stat(key: str) -> str:
            v = [t[key] for t in map(test_last, rs) if t is not None]
            if not v:
                return "-"
            return (f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")
                    + (f" ({len(v)} of {len(rs)})" if len(v) < len(rs) else ""))

        lines.append(f"| {target} | {method} | {labelled} | {seeds} | {rs[0]['steps']} | {np.mean([r['minutes'] for r in rs]):.1f} "
                     f"| {stat('val', 'aji')} | {last_text} | {stat('test', 'aji')} | {stat('test', 'dice')} | {stat('test', 'pq')} "
                     f"| {stat('test', 'f1')} | {last_stat('aji')} | {last_stat('dice')} |")
    return "\n".join(lines)


def write_table(rows: list[dict]) -> None:
    from wsi_ircr.io.atomic import atomic_open

    if not REPORT.exists():
        return
    text = REPORT.read_text()
    if TABLE_START not in text:
        return
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    with atomic_open(REPORT) as f:
        f.write(f"{head}{TABLE_START}\n{table(rows)}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="consep", choices=sorted(TARGETS))
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--only", nargs="*", help="row names (method-L<labelled>-s<seed>) to run")
    parser.add_argument("--table", action="store_true", help="only rewrite the table of benchmarks/adapt.md")
    parser.add_argument("--until", help="stop starting new rows after this UTC time (HH:MM)")
    parser.add_argument("--rows", nargs="*", metavar="METHOD:LABELLED:SEED:STEPS",
                        help="run these rows instead of the preset's plan, e.g. mean_teacher+anchor:0:0:160 (+VARIANT: see VARIANTS)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every command (default 2)")
    parser.add_argument("--skip-zero-shot", action="store_true",
                        help="do not score the bundled model first (another process running side by side does)")
    args = parser.parse_args(argv)
    use_preset(args.preset)
    use_threads(args.threads)
    if args.rows:
        global PLAN
        PLAN = [parse_row(r) for r in args.rows]
    rows = load_rows()
    if args.table:
        if args.preset == "cpu":  # the report's table is the CPU study's; --preset gpu only prints its own
            write_table(rows)
        print(table(rows))
        return
    if not (SHARED / TARGETS[args.target]["folder"]).is_dir():
        sys.exit(f"{SHARED / TARGETS[args.target]['folder']}: not found; the study needs ../shared/data")
    folders = prepare(args.target)
    done = {(r["target"], r["name"]) for r in rows}
    if (args.target, "zero_shot") not in done and not args.only and not args.skip_zero_shot:
        rows = add_row(zero_shot(args.target, folders))
        if args.preset == "cpu":
            write_table(rows)
    for method, labelled, seed, steps in PLAN:
        name = row_name(method, labelled, seed, steps)
        if (args.target, name) in done or (args.only and name not in args.only):
            continue
        if args.until and time.strftime("%H:%M", time.gmtime()) >= args.until:
            print(f"{args.until} UTC reached; stopping before {name}", flush=True)
            break
        rows = add_row(adapted(args.target, method, labelled, seed, steps, folders))
        if args.preset == "cpu":
            write_table(rows)
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
