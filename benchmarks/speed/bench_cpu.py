"""The network on this CPU, per engine and precision, and the main job end to end, in one run.

    python -m benchmarks.speed.bench_cpu [--rounds 3] [--slide-rounds 2] [--threads 2] [--student MODEL]
    # appends a dated section to benchmarks/cpu.md

In one process, on one machine, interleaved round by round so that every variant sees the
same load:

- the reference workload: a fixed stack of 3x3 convolutions (3->32->64->64->32, ReLU),
  fp32, channels-last, on 4 x 512 x 512, best of the rounds -> Mpx/s. Figures in
  *reference-Mpx* are wall seconds x this rate: what the job costs in units of this machine.
- the bare forward of the bundled network on one segment tile (1024 x 1024 px) per variant:
  torch fp32 (NCHW and channels-last), torch bf16 (only where bf16 is native: emulated bf16
  is many times slower), and fp32 / int8 in each installed engine of the cpu-fast extra;
  best of the rounds -> Mpx/s. ``--student MODEL`` (default: the distilled CPU model,
  ``--model fast``, where it is bundled) adds rows ``student ...``: torch fp32 channels-last
  and each engine's fp32 / int8.
- end to end (torch fp32, torch bf16 where bf16 is native, and ``--slide-engines``):
  ``wsi-ircr segment examples/cmu-1-small-region.svs --precision P --set engine=E`` in a child
  process per variant (fresh output folder; its threads as a user gets them: all cores), the
  reference timed just before and after each, wall seconds from process start to exit, peak
  memory of the process tree, and the wall over the bare forward of what the run forwarded (its
  tiles' boxes around the tissue, ``wsi_ircr.slide.crop``) and of its whole tiles, at the rates
  measured above. The last engine variant of the default model runs once more with whole tiles
  (``--set skip_glass=false``). Two rows are the README's command as a user runs it, no
  precision or engine given (``auto``; the row names what it chose): as installed here, and
  with the cpu-fast extra hidden (its packages made unimportable in the child), where it is
  installed. ``--model fast`` runs torch fp32 and each engine's fp32 / int8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.common import CPU_FLAGS, REPO, MemorySampler, cpu_flags, load_average, machine

SLIDE = REPO / "examples" / "cmu-1-small-region.svs"
RESULTS = REPO / "benchmarks" / "cpu.md"
TILE_PX = 1024  # the segment default: 896 core + 2 x 64 halo
FAST = "fast"  # the distilled CPU model's --model name
STUDENT = "student"  # the row prefix of the --student model
CPU_FAST_MODULES = ("onnx", "onnxruntime", "openvino")  # what the cpu-fast extra installs (hidden for the 'no extra' row)


class SlideVariant(NamedTuple):
    """One end-to-end run: ``--precision``, ``--set engine=``, skip glass, ``--model`` (None:
    the default) and whether the cpu-fast extra's packages stay importable."""

    precision: str
    engine: str
    skip_glass: bool = True
    model: str | None = None
    cpu_fast: bool = True

    def label(self) -> str:
        return "-".join(map(str, self))


def hide_cpu_fast(folder: Path) -> dict[str, str]:
    """Environment for a child Python in which the cpu-fast extra's packages cannot be imported
    (as if not installed): a ``sitecustomize`` in ``folder``, first on PYTHONPATH, marks them
    absent in ``sys.modules`` (``find_spec`` gives None, ``import`` raises ImportError)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in CPU_FAST_MODULES))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def reference_network():
    """The fixed reference workload (never change it: its rate is the unit of every report)."""
    import torch
    from torch import nn

    widths = (3, 32, 64, 64, 32)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval().to(memory_format=torch.channels_last)


def default_student() -> str | None:
    """The distilled CPU model's name where it is bundled (``--model fast``), else None."""
    from wsi_ircr.model.checkpoint import BUNDLED_MODELS, bundled_model_path

    return FAST if FAST in BUNDLED_MODELS and bundled_model_path(FAST).exists() else None


def forward_variants(threads: int, student: str | None = None) -> dict[str, tuple[str, str, object, object]]:
    """name -> (precision, engine, callable network, input) for every variant that runs here;
    ``student`` (a ``--model`` value) adds its rows, named ``student ...``."""
    import torch

    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.engines import engine_network, installed_engines
    from wsi_ircr.model.precision import native_bf16

    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(None)
    x = torch.rand(1, 3, TILE_PX, TILE_PX, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    net = checkpoint.build()
    net_cl = checkpoint.build().to(memory_format=torch.channels_last)
    variants = {
        "reference": ("fp32", "torch", reference_network(), torch.rand(4, 3, 512, 512).contiguous(memory_format=torch.channels_last)),
        "torch fp32 NCHW": ("fp32", "torch", net, x),
        "torch fp32 channels-last": ("fp32", "torch", net_cl, x_cl),
    }
    if native_bf16(torch.device("cpu")):
        def bf16_net(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net_cl(t)
        variants["torch bf16 channels-last"] = ("bf16", "torch", bf16_net, x_cl)
    for engine in installed_engines():
        for precision in ("fp32", "int8"):
            variants[f"{engine} {precision}"] = (precision, engine, engine_network(checkpoint, precision, engine), x)
    if student:
        small = load_checkpoint(student)
        variants[f"{STUDENT} torch fp32 channels-last"] = ("fp32", "torch", small.build().to(memory_format=torch.channels_last), x_cl)
        for engine in installed_engines():
            for precision in ("fp32", "int8"):
                variants[f"{STUDENT} {engine} {precision}"] = (precision, engine, engine_network(small, precision, engine), x)
    return variants


def time_forwards(variants: dict, rounds: int) -> dict[str, float]:
    """Best seconds per call of each variant over ``rounds`` interleaved rounds (after one warm-up call)."""
    import torch

    best = {name: float("inf") for name in variants}
    with torch.inference_mode():
        for _, _, fn, x in variants.values():
            fn(x)
        for r in range(rounds):
            for name, (_, _, fn, x) in variants.items():
                t0 = time.perf_counter()
                fn(x)
                best[name] = min(best[name], time.perf_counter() - t0)
            print(f"forward round {r + 1}: " + ", ".join(f"{n} {best[n]:.2f} s" for n in variants), flush=True)
    return best


def reference_rate(net, x, calls: int = 3) -> float:
    """Mpx/s of the reference workload, best of ``calls``."""
    import torch

    best = float("inf")
    with torch.inference_mode():
        for _ in range(calls):
            t0 = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t0)
    return x.shape[0] * x.shape[2] * x.shape[3] / 1e6 / best


def forwarded_mpx(skip_glass: bool) -> float:
    """Mpx the network runs on for the sample slide at the segment defaults: the boxes of its
    tissue tiles (``pipeline.forward_boxes``)."""
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.slide.config import SegmentConfig
    from wsi_ircr.slide.crop import box_area
    from wsi_ircr.slide.pipeline import forward_boxes, plan_slide
    from wsi_ircr.slide.reader import open_slide

    with open_slide(SLIDE) as reader:
        plan = plan_slide(reader, SegmentConfig(), load_checkpoint(None).mpp)
    return sum(map(box_area, forward_boxes(plan, plan.tiles, skip_glass))) / 1e6


def segment_command(v: SlideVariant, out: Path) -> list[str]:
    """The ``wsi-ircr segment`` command line of ``v`` (``auto`` precision and engine: the
    README's command as a user types it, neither option given)."""
    return [sys.executable, "-m", "wsi_ircr", "segment", str(SLIDE), "-o", str(out), "--quiet",
            *(["--device", "cpu", "--precision", v.precision] if v.precision != "auto" else []),
            *(["--set", f"engine={v.engine}"] if v.engine != "auto" else []),
            *(["--set", "skip_glass=false"] if not v.skip_glass else []), *(["--model", v.model] if v.model else [])]


def run_slide(v: SlideVariant, out: Path) -> tuple[float, float, dict]:
    """Wall seconds, peak MiB of the process tree and summary.json of one segment run."""
    cmd = segment_command(v, out)
    env = None if v.cpu_fast else hide_cpu_fast(out.parent / f"no-cpu-fast-{out.name}")
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, env=env)
    with MemorySampler(child.pid) as sampler:
        code = child.wait()
    wall = time.perf_counter() - t0
    if code:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {code}")
    return wall, sampler.peak_rss_mb, json.loads((out / SLIDE.stem / "summary.json").read_text())


def tuned_forwards(threads: int, rounds: int, student: str | None) -> dict[str, float]:
    """``time_forwards`` in a child process whose malloc is set as ``segment`` sets it
    (``wsi_ircr.slide.memory``); this process keeps glibc's defaults, so the reference workload
    (the unit) is timed as it always was."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.speed.bench_cpu", "--forwards-json", "--threads",
                           str(threads), "--rounds", str(rounds), "--student", student or ""], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def slide_variant_list(variants: dict, slide_engines: list[str], student: str | None) -> list[SlideVariant]:
    """The end-to-end runs: torch fp32, torch bf16 where native (a ``variants`` row), each of
    ``slide_engines``' precisions, the last of those on whole tiles, the default (``auto``) with
    and, where the extra is installed, without the cpu-fast extra, and the student's runs."""
    from wsi_ircr.model.engines import installed_engines

    runs = [SlideVariant("fp32", "torch")]
    runs += [SlideVariant(p, e) for n, (p, e, _, _) in variants.items() if n == "torch bf16 channels-last"]
    runs += [SlideVariant(p, e) for n, (p, e, _, _) in variants.items() if e in slide_engines and not n.startswith(STUDENT)]
    runs.append(runs[-1]._replace(skip_glass=False))  # again, on whole tiles
    runs.append(SlideVariant("auto", "auto"))
    if installed_engines():
        runs.append(SlideVariant("auto", "auto", cpu_fast=False))
    if student:
        runs += [SlideVariant("fp32", "torch", model=student)] + [
            SlideVariant(p, e, model=student) for n, (p, e, _, _) in variants.items() if e in slide_engines and n.startswith(STUDENT)]
    return runs


def forward_name(precision: str, engine: str, model: str | None) -> str:
    """The bare-forward row that a run of ``precision`` in ``engine`` ran (torch: channels-last)."""
    name = f"torch {precision} channels-last" if engine == "torch" else f"{engine} {precision}"
    return f"{STUDENT} {name}" if model else name


def slide_row_name(v: SlideVariant, precision: str, engine: str) -> str:
    """'fp32, torch', 'student: int8, onnxruntime', 'int8, onnxruntime, whole tiles', or for the
    default 'default (auto: bf16, torch)' / 'default without the cpu-fast extra (auto: ...)'."""
    if v.precision == "auto":
        return f"default{'' if v.cpu_fast else ' without the cpu-fast extra'} (auto: {precision}, {engine})"
    return f"{'student: ' if v.model else ''}{precision}, {engine}{'' if v.skip_glass else ', whole tiles'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forwards-json", action="store_true",
                        help="only time the forwards with segment's malloc settings and print them as JSON (internal)")
    parser.add_argument("--rounds", type=int, default=3, help="forward rounds (best of)")
    parser.add_argument("--slide-rounds", type=int, default=2, help="end-to-end rounds per variant (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slide-engines", nargs="*", default=["onnxruntime"],
                        help="engines run end to end besides torch fp32 (default: the cpu-fast extra's)")
    parser.add_argument("--student", default=None,
                        help="a second model timed as 'student' rows (a --model value; path relative to the repository; "
                             "default: fast where bundled; '' for none)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    args.student = default_student() if args.student is None else (args.student or None)
    if args.forwards_json:
        from wsi_ircr.slide.memory import limit_malloc_arenas

        limit_malloc_arenas()
        with contextlib.redirect_stdout(sys.stderr):
            best = time_forwards(forward_variants(args.threads, args.student), args.rounds)
        print(json.dumps(best))
        return

    load_before = load_average()
    variants = forward_variants(args.threads, args.student)
    best = time_forwards(variants, args.rounds)
    ref_rate = 4 * 512 * 512 / 1e6 / best.pop("reference")
    tile_mpx = TILE_PX * TILE_PX / 1e6
    default_rates = {name: tile_mpx / s for name, s in best.items()}
    tuned = tuned_forwards(args.threads, args.rounds, args.student)
    rates = {name: tile_mpx / tuned[name] for name in default_rates}  # what segment's forwards run with
    base = rates["torch fp32 channels-last"]

    slide_variants = slide_variant_list(variants, args.slide_engines, args.student)
    walls: dict[SlideVariant, list[float]] = {v: [] for v in slide_variants}
    ref_mpx: dict[SlideVariant, list[float]] = {v: [] for v in slide_variants}
    _, _, ref_net, ref_x = variants["reference"]
    peaks: dict[SlideVariant, float] = {}
    summaries: dict[SlideVariant, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.slide_rounds):
            for v in slide_variants:
                out = Path(tmp) / f"{r}-{v.label()}"
                before = reference_rate(ref_net, ref_x)
                wall, peak, summary = run_slide(v, out)
                local_rate = (before + reference_rate(ref_net, ref_x)) / 2
                walls[v].append(wall)
                ref_mpx[v].append(wall * local_rate)
                peaks[v] = max(peaks.get(v, 0.0), peak)
                summaries[v] = summary
                print(f"slide round {r + 1} {v}: {wall:.1f} s, {summary['nuclei']} nuclei, {peak:.0f} MiB", flush=True)
    load_after = load_average()

    have = set(cpu_flags())
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"{machine()}; CPU flags: " + ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in CPU_FLAGS.values())
        + f"; {args.threads} threads; load average (1/5/15 min) {load_before} at the start, {load_after} at the end.\n",
        f"`python -m benchmarks.speed.bench_cpu --rounds {args.rounds} --slide-rounds {args.slide_rounds} --threads {args.threads}"
        f" --slide-engines {' '.join(args.slide_engines)}{f' --student {args.student}' if args.student else ''}`\n",
        f"Reference workload: **{ref_rate:.3f} Mpx/s** (best of {args.rounds}).\n",
        "Bare forwards: Mpx/s with segment's malloc settings (a child process, `wsi_ircr.slide.memory`: the "
        "figures below use these) and with glibc's defaults (this process; earlier sections).\n",
        f"| bare forward, 1 x {TILE_PX} x {TILE_PX} | precision | engine | Mpx/s (best of {args.rounds}) "
        "| glibc defaults | x torch fp32 channels-last | reference-Mpx per Mpx |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rate in rates.items():
        precision, engine = variants[name][:2]
        lines.append(f"| {name} | {precision} | {engine} | {rate:.3f} | {default_rates[name]:.3f} | {rate / base:.2f} "
                     f"| {ref_rate / rate:.2f} |")
    if args.slide_rounds:
        lines += ["", "Reference-Mpx of a slide run: its wall x the reference rate timed just before and after it "
                  "(the mean of the two), so the load it ran under divides out.", "",
                  "Wall / bare forward: the best wall over the bare forward (at the tile rate above) of the Mpx "
                  "the run forwarded (its boxes) and of its whole tiles.", "",
                  "| end to end, sample slide | wall s per round | reference-Mpx (best) | tiles | Mpx forwarded "
                  "| wall / bare forward (forwarded) | (whole tiles) | peak MiB | nuclei |",
                  "|---|---|---|---|---|---|---|---|---|"]
        mpx = {skip: forwarded_mpx(skip) for skip in (True, False)}
        for v in slide_variants:
            summary = summaries[v]
            tiles = int(summary["tiles"]["segmented"])
            ran = summary.get("execution") or {}
            precision, engine = ran.get("precision", v.precision), ran.get("engine", v.engine)  # what auto chose
            name = forward_name(precision, engine, v.model)
            wall = min(walls[v])
            whole_s, forwarded_s = tiles * tile_mpx / rates[name], mpx[v.skip_glass] / rates[name]
            lines.append(f"| {slide_row_name(v, precision, engine)} "
                         f"| {', '.join(f'{w:.1f}' for w in walls[v])} | {min(ref_mpx[v]):.1f} | {tiles} "
                         f"| {mpx[v.skip_glass]:.1f} | {wall / forwarded_s:.2f} | {wall / whole_s:.2f} | {peaks[v]:.0f} "
                         f"| {summary['nuclei']} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write(section)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
