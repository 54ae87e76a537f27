"""Cohort throughput and memory: N copies of the sample slide in one ``wsi-ircr segment``
on a local cluster of two worker processes, against a run of one slide.

Each N runs in a fresh process tree; its peak memory is the largest sum of the resident
memory of the driver and its worker processes, sampled every 0.2 s. Per slide, wall time
is the command's wall time / N. ``--crop PX`` segments a PX x PX level-0 crop of the sample
(a tiled TIFF with its mpp) instead of the whole slide, for slow or shared machines.

    python -m benchmarks.speed.bench_cohort                       # N = 1, 2, 4 copies; writes benchmarks/cohort.md
    python -m benchmarks.speed.bench_cohort --copies 1 2 4 8 --crop 1200 --note "machine shared with training"
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, MemorySampler, machine

SAMPLE = REPO / "examples" / "cmu-1-small-region.svs"


def cropped_sample(path: Path, crop_px: int) -> Path:
    """A tiled pyramidal TIFF of the sample's top-left-centred ``crop_px`` square, same mpp."""
    import numpy as np
    import tifffile

    from wsi_ircr.slide.reader import open_slide

    with open_slide(SAMPLE) as reader:
        w, h = reader.dimensions_xy
        size = min(crop_px, w, h)
        x0, y0 = (w - size) // 2, (h - size) // 2
        image = reader.read_region((x0, y0), 0, (size, size))
        mpp = reader.mpp
    levels = [image, np.ascontiguousarray(image[::2, ::2])]
    res = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            tif.write(level, tile=(256, 256), photometric="rgb", resolution=(res / 2**k, res / 2**k),
                      resolutionunit="CENTIMETER", subfiletype=1 if k else 0, compression="jpeg",
                      compressionargs={"level": 90}, metadata=None)
    return path


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak MiB of the process tree's summed resident memory)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    with MemorySampler(proc.pid) as sampler:
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} exited {proc.returncode}")
    return time.perf_counter() - start, sampler.peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--crop", type=int, help="Segment a crop of this many level-0 px per side.")
    parser.add_argument("--workers", type=int, default=2, help="Local Dask worker processes.")
    parser.add_argument("--note", default="", help="A line about the conditions (e.g. a shared machine).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "cohort.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = cropped_sample(tmp / "sample.tiff", args.crop) if args.crop else SAMPLE
        for n in args.copies:
            slides = tmp / f"n{n}"
            slides.mkdir()
            for i in range(n):
                shutil.copyfile(source, slides / f"copy{i:03d}{source.suffix}")
            out = tmp / f"out{n}"
            command = [sys.executable, "-m", "wsi_ircr", "segment", str(slides), "-o", str(out), "--quiet",
                       "--device", "cpu", "--workers", str(args.workers)]
            wall, peak = run(command)
            summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
            tiles = sum(s["tiles"]["segmented"] for s in summaries)
            nuclei = {s["nuclei"] for s in summaries}
            rows.append({"copies": n, "wall_s": wall, "per_slide_s": wall / n, "peak_mib": peak, "tiles": tiles,
                         "nuclei_per_slide": sorted(nuclei),
                         "worker_rss_mib": max(s["peak_rss_mb"]["workers"] for s in summaries)})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["per_slide_s"]
    shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    command = "python -m benchmarks.speed.bench_cohort " + shlex.join(shown) + (' --note "..."' if args.note else "")
    lines = [
        "# Cohort: N copies of the sample slide in one command",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}); each N runs `wsi-ircr segment FOLDER -o OUT --device cpu "
        f"--workers {args.workers}` (bundled model, default config) in a fresh process tree.",
        f"Slide: {'a ' + str(args.crop) + ' px crop of ' if args.crop else ''}`examples/cmu-1-small-region.svs`.",
        f"Machine: {machine()}." + (f" {args.note}" if args.note else ""),
        "",
        "| copies | tiles | wall s | s per slide | vs 1 slide | peak MiB (driver + workers) | worker RSS MiB | nuclei per slide |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['copies']} | {r['tiles']} | {r['wall_s']:.1f} | {r['per_slide_s']:.1f} | "
                     f"{r['per_slide_s'] / base:.2f} | {r['peak_mib']:.0f} | {r['worker_rss_mib']:.0f} | "
                     f"{', '.join(map(str, r['nuclei_per_slide']))} |")
    last = rows[-1]
    lines += ["", "Every copy gives the same nuclei count (one value per row): the cohort changes no result.",
              f"Wall time per slide with {last['copies']} copies is {last['per_slide_s'] / base:.2f} x that of one slide "
              "alone (the next slide's tiles run while the previous one is planned and exported); peak memory "
              f"goes from {rows[0]['peak_mib']:.0f} to {last['peak_mib']:.0f} MiB "
              f"({100 * (last['peak_mib'] / rows[0]['peak_mib'] - 1):+.0f} %) for {last['copies']} x the tiles."]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
