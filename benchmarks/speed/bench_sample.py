"""Wall time of the README's main job, the bundled sample slide, for several models / precisions.

    python -m benchmarks.speed.bench_sample [--rounds 2] [--variant NAME=MODEL.pt:bf16|fp32 ...]
    # appends to benchmarks/sample_slide.md

Each variant runs ``wsi-ircr segment examples/cmu-1-small-region.svs -o FRESH --quiet
--model MODEL --bf16|--fp32`` in a child process under the same environment; the variants run
interleaved (A, B, C, A, B, C, ...) so that every round sees the same machine load. Default
variants: the bundled model in bf16 and in fp32. Wall seconds from the parent (process start
to exit, what a user waits), and the nuclei found.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, load_average, machine

SLIDE = REPO / "examples" / "cmu-1-small-region.svs"
RESULTS = REPO / "benchmarks" / "sample_slide.md"


def parse_variant(text: str) -> tuple[str, str | None, str]:
    """``NAME=MODEL:bf16`` -> (name, model path or None for the bundled model, "bf16" | "fp32")."""
    name, _, rest = text.partition("=")
    model, _, precision = rest.rpartition(":")
    if not name or precision not in ("bf16", "fp32"):
        raise SystemExit(f"error: --variant {text!r}: expected NAME=MODEL.pt:bf16 or NAME=MODEL.pt:fp32 (MODEL empty = bundled)")
    return name, model or None, precision


def run_once(model: str | None, precision: str, out: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "wsi_ircr", "segment", str(SLIDE), "-o", str(out), "--quiet", f"--{precision}"]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / SLIDE.stem / "summary.json").read_text())
    return wall, int(summary["nuclei"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant] or [("bundled bf16", None, "bf16"), ("bundled fp32", None, "fp32")]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    nuclei: dict[str, int] = {}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, model, precision in variants:
                wall, n = run_once(model, precision, Path(tmp) / f"{r}-{len(walls[name])}-{name.replace(' ', '_')}")
                walls[name].append(wall)
                nuclei[name] = n
                print(f"round {r + 1} {name}: {wall:.1f} s, {n} nuclei", flush=True)
    lines = ["| variant | model | network precision | wall s per round | nuclei |", "|---|---|---|---|---|"]
    for name, model, precision in variants:
        lines.append(f"| {name} | {model or 'bundled'} | {precision} | {', '.join(f'{w:.1f}' for w in walls[name])} | {nuclei[name]} |")
    cmd = "python -m benchmarks.speed.bench_sample --rounds %d%s" % (args.rounds, "".join(f" --variant {shlex.quote(v)}" for v in args.variant))
    section = (f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, "
               f"load average {load_before} before: `{cmd}`\n\n"
               + "\n".join(lines) + "\n")
    print(section)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
