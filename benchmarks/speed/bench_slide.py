"""End-to-end speed and memory of ``wsi-ircr segment`` on synthetic 40x slides.

Writes a pyramidal TIFF at 0.25 um/px (the bundled model's mpp: no resampling) of JPEG tiles
(encoded with Pillow) with an H&E-like texture (pink stroma fibres, dark purple textured
nuclei, some touching, white lumina) inside an elliptic tissue region on white glass, for
each requested area (``--scales``, multiples of ``--side-px`` squared); runs the real command
in a child process, and reports per slide: Mpx/s of slide area end to end, seconds per stage
(summary.json), peak resident memory of the command's process tree (sampled every 0.2 s),
the GPU's busy fraction (NVML samples, on CUDA), and a bare forward pass of the bundled
network on the same tiles (read back from the run's tile store) for the ratio the CPU target
is about (end to end within 1.2x of it).

    python -m benchmarks.speed.bench_slide --side-px 2048 --scales 1 16          # appends to benchmarks/slide.md
    python -m benchmarks.speed.bench_slide --side-px 32768 --scales 1 --device cuda --json out.json

The slides and run folders are written under ``--dir`` (a temporary folder by default) and
removed afterwards; a size that does not fit there is refused before anything is written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, MemorySampler, load_average, machine

MPP = 0.25
TILE = 512  # TIFF tile side
BLOCK = 1024  # side of the texture blocks the slide is tiled with (a multiple of TILE)
BACKGROUND = (242, 242, 240)
# disk use per level-0 pixel: JPEG slide + pyramid (~0.3 B), tile store (zstd RGB with halos, ~2.5 B), margin
BYTES_PER_PX = 4.0


def he_block(seed: int, side: int = BLOCK) -> np.ndarray:
    """uint8 (side, side, 3) H&E-like texture: stroma with fibres, nuclei, a few lumina."""
    from scipy import ndimage as ndi
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    fibres = ndi.gaussian_filter(rng.standard_normal((side, side)), (1.0, 6.0))
    fibres = ndi.rotate(fibres, rng.uniform(0, 180), reshape=False, mode="wrap")
    fibres /= fibres.std() + 1e-9
    shade = ndi.gaussian_filter(rng.standard_normal((side, side)), 40)
    shade /= shade.std() + 1e-9
    image = np.empty((side, side, 3), np.float32)
    image[:] = (226, 150, 192)
    image += (10 * fibres + 8 * shade)[..., None] * np.array([0.6, 1.0, 0.7])
    for _ in range(rng.integers(1, 4)):  # lumina
        rr, cc = ellipse(rng.uniform(0, side), rng.uniform(0, side), rng.uniform(30, 90), rng.uniform(30, 90),
                         shape=(side, side), rotation=rng.uniform(0, np.pi))
        image[rr, cc] = (238, 230, 236)
    chromatin = ndi.gaussian_filter(rng.standard_normal((side, side)), 1.2)
    chromatin /= chromatin.std() + 1e-9
    n = int(rng.integers(350, 550) * (side / 1024) ** 2)
    for _ in range(n):
        r, c = rng.uniform(0, side), rng.uniform(0, side)
        a, b = rng.uniform(9, 22), rng.uniform(7, 16)  # 0.25 um/px: 4-11 um nuclei
        rr, cc = ellipse(r, c, a, b, shape=(side, side), rotation=rng.uniform(0, np.pi))
        tone = rng.uniform(-25, 20)
        image[rr, cc] = np.array([92, 58, 140]) + tone + 18 * chromatin[rr, cc, None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class SyntheticSlide:
    """A square slide of ``side`` level-0 px tiled with flipped copies of a few texture blocks,
    white outside an ellipse of tissue; ``region(level, y0, x0, h, w)`` renders any window."""

    def __init__(self, side: int, seed: int = 0, n_blocks: int = 6):
        rng = np.random.default_rng(seed)
        self.side = side
        self.blocks = {0: [he_block(seed * 100 + k) for k in range(n_blocks)]}
        n_cells = -(-side // BLOCK)
        self.layout = rng.integers(0, n_blocks, (n_cells, n_cells))
        self.flips = rng.integers(0, 4, (n_cells, n_cells))

    def _blocks(self, level: int) -> list[np.ndarray]:
        if level not in self.blocks:
            f = 2**level
            self.blocks[level] = [b.reshape(BLOCK // f, f, BLOCK // f, f, 3).mean((1, 3)).astype(np.uint8)
                                  for b in self.blocks[0]]
        return self.blocks[level]

    def region(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint8 (h, w, 3) of level ``level`` (2**level downsample) from (y0, x0) of that level."""
        blocks = self._blocks(level)
        s = BLOCK // 2**level
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(y0 - y0 % s, y0 + h, s):
            for c0 in range(x0 - x0 % s, x0 + w, s):
                br, bc = r0 // s, c0 // s
                if br >= self.layout.shape[0] or bc >= self.layout.shape[1]:
                    continue
                flip = self.flips[br, bc]
                block = blocks[self.layout[br, bc]][:: -1 if flip & 1 else 1, :: -1 if flip & 2 else 1]
                ys, xs = max(r0, y0), max(c0, x0)
                ye, xe = min(r0 + s, y0 + h), min(c0 + s, x0 + w)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = block[ys - r0:ye - r0, xs - c0:xe - c0]
        size = self.side / 2**level
        rr, cc = np.ogrid[y0:y0 + h, x0:x0 + w]
        outside = ((rr + 0.5 - size / 2) / (0.47 * size)) ** 2 + ((cc + 0.5 - size / 2) / (0.44 * size)) ** 2 > 1
        out[outside | (rr >= size) | (cc >= size)] = BACKGROUND
        return out

    def write(self, path: Path, quality: int = 90) -> Path:
        """A generic pyramidal TIFF (JPEG tiles from Pillow, resolution tags) OpenSlide reads."""
        import tifffile
        from PIL import Image

        def encode(level: int, y: int, x: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(self.region(level, y, x, TILE, TILE)).save(buf, format="JPEG", quality=quality)
            return buf.getvalue()

        def tiles(level: int, n: int):
            """The level's JPEG tiles in row-major order, encoded by a thread per core, a few rows at a time."""
            self._blocks(level)  # before the threads share it
            corners = [(y, x) for y in range(0, n, TILE) for x in range(0, n, TILE)]
            with ThreadPoolExecutor(os.cpu_count()) as pool:
                for k in range(0, len(corners), 256):
                    yield from pool.map(lambda yx: encode(level, *yx), corners[k:k + 256])

        n_levels = 1
        while self.side // 2**n_levels >= 1024 and BLOCK // 2**n_levels >= 8:
            n_levels += 1
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for level in range(n_levels):
                n = self.side // 2**level
                res = 1e4 / (MPP * 2**level)
                tif.write(tiles(level, n), shape=(n, n, 3), dtype="uint8", tile=(TILE, TILE), photometric="rgb",
                          compression="jpeg", resolution=(res, res), resolutionunit="CENTIMETER",
                          subfiletype=1 if level else 0, metadata=None)
        return path


def bare_forward_seconds(store_path: Path, device: str, batch: int, max_tiles: int) -> tuple[float, int, int]:
    """Seconds a bare forward pass of the bundled network takes over all tiles of the store
    (timed on up to ``max_tiles`` of them, evenly spread, after one warm-up batch, and scaled),
    the tiles timed and the tile side."""
    import torch

    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor
    from wsi_ircr.slide.store import TileStore

    store = TileStore.open(store_path)
    picks = np.unique(np.linspace(0, store.n_tiles - 1, min(max_tiles, store.n_tiles)).round().astype(int))
    tiles = np.stack([store.read(int(i)) for i in picks])
    predictor = Predictor(load_checkpoint(None), device=device, batch_size=batch)
    predictor.predict_maps(tiles[:batch])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    predictor.predict_maps(tiles)
    seconds = time.perf_counter() - t0
    return seconds * store.n_tiles / len(picks), len(picks), store.tile_px


def check_disk(folder: Path, n_px: int) -> None:
    """Exit 2 with one line when the slide and its run would not fit in ``folder``."""
    need = n_px * BYTES_PER_PX
    free = shutil.disk_usage(folder).free
    if need > 0.9 * free:
        fail(f"a {n_px / 1e6:,.0f} Mpx slide needs about {need / 2**30:.1f} GiB in {folder} (slide, tile store, "
             f"results), only {free / 2**30:.1f} GiB are free; choose a smaller --side-px or another --dir")


def fail(message: str) -> None:
    """One line on stderr, exit status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_one(side: int, device: str, sets: list[str], folder: Path, forward_tiles: int) -> dict:
    """One slide: write, segment (child process), bare forward; the figures as a dict."""
    check_disk(folder, side * side)
    t0 = time.perf_counter()
    slide = SyntheticSlide(side).write(folder / f"synthetic_{side}.tiff")
    write_s = time.perf_counter() - t0
    out = folder / "out"
    cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(slide), "-o", str(out), "--quiet", "--device", device]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    with MemorySampler(child.pid, gpu=device.startswith("cuda")) as sampler:
        child.wait()
    wall_s = time.perf_counter() - t0
    if child.returncode != 0:
        fail(f"{' '.join(cmd)} exited with {child.returncode}")
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    forward_s, timed, tile_px = bare_forward_seconds(out / slide.stem / "tiles.zarr", device, summary["execution"]["batch_tiles"],
                                                     forward_tiles)
    n_tiles = summary["tiles"]["segmented"]
    area_mpx = side * side / 1e6
    result = {
        "side_px": side, "slide_mpx": area_mpx, "slide_mb": slide.stat().st_size / 2**20, "write_s": round(write_s, 1),
        "tiles": n_tiles, "tile_px": tile_px, "tile_mpx": n_tiles * tile_px**2 / 1e6, "nuclei": summary["nuclei"],
        "wall_s": round(wall_s, 2), "total_s": summary["seconds"]["total"],
        "slide_mpx_per_s": area_mpx / wall_s,
        "bare_forward_s": round(forward_s, 2), "bare_forward_tiles_timed": timed,
        "ratio_to_forward": wall_s / forward_s,
        "seconds": summary["seconds"], "task_seconds": summary["task_seconds"],
        "peak_rss_mb": round(sampler.peak_rss_mb, 1), "summary_peak_rss_mb": summary["peak_rss_mb"],
        "gpu_busy": float(np.mean(sampler.gpu_busy)) if sampler.gpu_busy else None,
    }
    shutil.rmtree(out)
    slide.unlink()
    return result


def markdown(results: list[dict], command: str, device: str, load_before: str, load_after: str) -> str:
    """One section of ``slide.md`` (load averages as ``common.load_average`` gives them)."""
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {device} on {machine(device)}",
        "",
        f"Command: `{command}`; load average {load_before} before, {load_after} after.",
        "",
        "| slide (level-0 px) | tiles | nuclei | wall s | slide Mpx/s | bare forward s | wall / forward | peak RSS MiB | GPU busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        busy = "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f} %"
        lines.append(f"| {r['side_px']}^2 ({r['slide_mpx']:.1f} Mpx) | {r['tiles']} | {r['nuclei']} | {r['wall_s']:.1f} | "
                     f"{r['slide_mpx_per_s']:.2f} | {r['bare_forward_s']:.1f} | {r['ratio_to_forward']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {busy} |")
    lines += ["", "Seconds per stage (driver wall; task busy seconds summed over threads):", ""]
    for r in results:
        lines.append(f"- {r['side_px']}^2: {json.dumps(r['seconds'])}; tasks {json.dumps(r['task_seconds'])}")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        lines += ["", f"Peak RSS from {lo['slide_mpx']:.0f} to {hi['slide_mpx']:.0f} Mpx "
                  f"({hi['slide_mpx'] / lo['slide_mpx']:.0f}x the area): {lo['peak_rss_mb']:.0f} -> "
                  f"{hi['peak_rss_mb']:.0f} MiB ({100 * (hi['peak_rss_mb'] / lo['peak_rss_mb'] - 1):+.1f} %)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side-px", type=int, default=2048, help="level-0 side of the 1x slide (a multiple of 1024)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 16], help="slide areas, multiples of the 1x area "
                        "(perfect squares: 1, 4, 16, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to wsi-ircr segment (e.g. workers=4)")
    parser.add_argument("--forward-tiles", type=int, default=24, help="tiles timed for the bare forward pass")
    parser.add_argument("--dir", type=Path, help="where slides and runs are written (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/slide.md")
    args = parser.parse_args()
    sides = []
    for scale in args.scales:
        root = round(scale**0.5)
        if root * root != scale or args.side_px < BLOCK or args.side_px % BLOCK:
            parser.error("--scales must be perfect squares and --side-px a multiple of 1024")
        sides.append(args.side_px * root)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    where = args.dir or Path(tempfile.gettempdir())
    check_disk(next(p for p in [where, *where.absolute().parents] if p.exists()), max(sides) ** 2)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-slide-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    try:
        results = []
        for side in sides:
            results.append(run_one(side, args.device, args.sets, folder, args.forward_tiles))
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    command = " ".join(["python -m benchmarks.speed.bench_slide", *sys.argv[1:]])
    text = markdown(results, command, args.device, load_before, load_average())
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine(args.device), "results": results}, indent=1))
    if not args.no_record:
        path = REPO / "benchmarks" / "slide.md"
        head = "" if path.exists() else ("# Whole-slide speed and memory (`python -m benchmarks.speed.bench_slide`)\n\n"
                                         "Each section is appended by the command it names.\n\n")
        with open(path, "a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
