"""Time ``instance_features`` against the skimage ``regionprops`` version it replaced.

Synthetic nuclei maps: a 1024 x 1024 tile (a whole-slide tile, ~1000 nuclei) and a
192 x 192 crop of it (a PIAC training crop), random uint8 RGB. Nuclei are ellipses with
radii 4-12 px on a jittered 32 px grid, so some touch. Single thread; each timing is the
median (and min) of several runs. Also reports the largest difference to regionprops.

    python -m benchmarks.speed.bench_morphology            # writes benchmarks/morphology.md
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import skimage  # noqa: E402
from skimage.draw import ellipse  # noqa: E402

from benchmarks.common import REPO, load_average, machine  # noqa: E402

PIAC_FEATURES = ("area", "solidity", "circularity", "mean_intensity", "extent")


def nuclei_tile(size: int = 1024, cell: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 (size, size) labels 1..n, one ellipse per grid cell, and uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    centres = [(r, c) for r in range(cell // 2, size, cell) for c in range(cell // 2, size, cell)]
    for i, (r, c) in enumerate(centres, start=1):
        rr, cc = ellipse(r + rng.uniform(-6, 6), c + rng.uniform(-6, 6), rng.uniform(5, 12), rng.uniform(4, 9),
                         shape=labels.shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = i
    return labels, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def timing_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` in ms over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), 1000 * float(np.min(times))


def main() -> None:
    from test_morphology import regionprops_features

    from wsi_ircr.morphology import FEATURES, instance_features

    labels, image = nuclei_tile()
    crop_labels, crop_image = labels[416:608, 416:608].copy(), image[416:608, 416:608].copy()
    cases = [
        ("1024 x 1024 tile", labels, image, 5, 20),
        ("192 x 192 crop", crop_labels, crop_image, 50, 200),
    ]
    rows = []
    diffs: dict[str, float] = {}
    for name, lab, img, old_repeats, new_repeats in cases:
        n = len(np.unique(lab)) - 1
        old = timing_ms(lambda: regionprops_features(lab, img), old_repeats)
        new = timing_ms(lambda: instance_features(lab, img), new_repeats)
        piac = timing_ms(lambda: instance_features(lab, img, PIAC_FEATURES), new_repeats)
        rows.append((name, n, old, new, piac))
        ref, out = regionprops_features(lab, img), instance_features(lab, img)
        assert np.array_equal(ref["label"], out["label"])
        for key in ("centroid_rc", "bbox_rc", *FEATURES):
            diffs[key] = max(diffs.get(key, 0.0), float(np.max(np.abs(out[key] - ref[key]), initial=0.0)))

    lines = [
        "# instance_features: vectorised vs skimage regionprops",
        "",
        "Command: `python -m benchmarks.speed.bench_morphology` (writes this file).",
        "",
        f"Machine: {machine()}, shared with other jobs (load average {load_average()}), 1 thread; "
        f"numpy {np.__version__}, scikit-image {skimage.__version__}.",
        "",
        "Synthetic nuclei (ellipses, radii 4-12 px, jittered 32 px grid, some touching), random RGB.",
        "Times in ms, median (min) of several runs. `regionprops`: the previous implementation;",
        "`new, all`: `instance_features(labels, image)`; `new, PIAC`: `features=` area, solidity,",
        "circularity, mean_intensity, extent.",
        "",
        "| map | nuclei | regionprops | new, all | new, PIAC | speed-up (all) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, old, new, piac in rows:
        lines.append(f"| {name} | {n} | {old[0]:.1f} ({old[1]:.1f}) | {new[0]:.1f} ({new[1]:.1f}) "
                     f"| {piac[0]:.1f} ({piac[1]:.1f}) | {old[0] / new[0]:.0f}x |")
    lines += ["", "Largest |new - regionprops| over both maps:", "",
              "| value | max abs difference |", "|---|---:|"]
    lines += [f"| {key} | {value:.2g} |" for key, value in diffs.items()]
    lines += ["", "mean_intensity: regionprops averages the float32 grey image in float32, the new code in float64.", ""]
    text = "\n".join(lines)
    (REPO / "benchmarks" / "morphology.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
