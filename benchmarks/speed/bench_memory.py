"""Peak memory and time of ``wsi-ircr segment`` on synthetic slides of 1x and 4x the area.

The slides are JPEG-compressed pyramidal TIFFs (0.25 um/px, the bundled model's mpp, so no
resampling) mosaicked from MoNuSeg tiles read from ../shared at run time (never committed),
with white margins so the tissue mask matters. Each size runs in a fresh process; peak
memory is the ``peak_rss_mb`` of its ``summary.json`` (driver process, which hosts the
threads of the default local Dask worker).

    python -m benchmarks.speed.bench_memory            # writes benchmarks/memory.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO, machine


def mosaic(n_side: int) -> np.ndarray:
    """uint8 (n*1000 + 400, n*1000 + 400, 3): n x n MoNuSeg tiles inside a 200 px white border."""
    from wsi_ircr.io.images import list_images, read_image

    paths = list_images(DATA / "images")
    size = n_side * 1000 + 400
    out = np.full((size, size, 3), 245, np.uint8)
    for k in range(n_side * n_side):
        r, c = divmod(k, n_side)
        out[200 + r * 1000 : 200 + (r + 1) * 1000, 200 + c * 1000 : 200 + (c + 1) * 1000] = read_image(paths[k % len(paths)])
    return out


def main() -> None:
    from tests.synthetic_slides import write_pyramidal_tiff

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, n_side in (("1x", 3), ("4x", 6)):
            slide = write_pyramidal_tiff(Path(tmp) / f"mosaic_{label}.tiff", mosaic(n_side), mpp=0.25, n_levels=4)
            out = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(slide), "-o", str(out), "--quiet", "--device", "cpu"]
            subprocess.run(cmd, check=True)
            summary = json.loads((out / slide.stem / "summary.json").read_text())
            rows.append((label, summary))
    lines = [
        "# Peak memory vs slide size (`wsi-ircr segment`, CPU)",
        "",
        f"Command: `python -m benchmarks.speed.bench_memory` (bundled model, default config). Machine: {machine()}.",
        "",
        "| slide | level-0 px | tissue mm^2 | tiles | nuclei | total s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        w, h = s["dimensions_xy"]
        lines.append(f"| {label} | {w}x{h} | {s['tissue_area_mm2']:.2f} | {s['tiles']['segmented']} | {s['nuclei']} | "
                     f"{s['seconds']['total']:.1f} | {max(s['peak_rss_mb'].values()):.0f} |")
    lines += ["", "Seconds per stage:", ""]
    for label, s in rows:
        lines.append(f"- {label}: {json.dumps(s['seconds'])}; task seconds {json.dumps(s['task_seconds'])}")
    text = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
