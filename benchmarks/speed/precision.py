"""bf16 against fp32 on this CPU: network speed, and what it does to the instances.

    python -m benchmarks.speed.precision speed [--threads 1]          # appends to benchmarks/precision.md
    python -m benchmarks.speed.precision accuracy MODEL.pt [...]      # 4 Kumar validation tiles

``speed``: crop Mpx/s of a forward + backward + AdamW step (8 x 192 px, as in training) and of
an inference forward (4 x 512 px), fp32 and bf16 autocast, channels-last, for every ``lite``
network. Blocks alternate (fp32, bf16, fp32, bf16) so both see the same machine load; the
best block of each is kept.
``accuracy``: each checkpoint segments the 4 Kumar validation tiles with the network in fp32
and in bf16 autocast (the same post-processing, always fp32): AJI of each against the labels,
and AJI of the bf16 instances against the fp32 ones. Validation tiles only, never test tiles.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO, load_average, machine

RESULTS = REPO / "benchmarks" / "precision.md"


def _rate(step, pixels: int, steps: int) -> float:
    """Mpx/s of ``steps`` calls of ``step`` after one warm-up call."""
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return pixels * steps / (time.perf_counter() - t0) / 1e6


def speed(threads: int, blocks: int, steps: int, record: bool) -> None:
    from wsi_ircr.model.inference import native_bf16
    from wsi_ircr.model.net import BUILDERS, build_model

    torch.set_num_threads(threads)
    rows = []
    for arch in BUILDERS:
        net = build_model(arch).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        x_train = torch.rand(8, 3, 192, 192).contiguous(memory_format=torch.channels_last)
        x_infer = torch.rand(4, 3, 512, 512).contiguous(memory_format=torch.channels_last)
        best: dict[str, float] = {}
        for block in range(2 * blocks):
            bf16 = bool(block % 2)

            def train_step() -> None:
                net.train()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = net(x_train)
                loss = out["np"].float().square().mean() + out["hv"].float().square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def infer_step() -> None:
                net.eval()
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    net(x_infer)

            key = "bf16" if bf16 else "fp32"
            for kind, fn, px in (("train", train_step, x_train.numel() // 3), ("infer", infer_step, x_infer.numel() // 3)):
                best[f"{kind} {key}"] = max(best.get(f"{kind} {key}", 0.0), _rate(fn, px, steps))
        rows.append((arch, best))
    head = ("| arch | train fp32 Mpx/s | train bf16 Mpx/s | bf16 / fp32 | infer fp32 Mpx/s | infer bf16 Mpx/s "
            "| bf16 / fp32 |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for arch, b in rows:
        lines.append(f"| {arch} | {b['train fp32']:.3f} | {b['train bf16']:.3f} | {b['train bf16'] / b['train fp32']:.2f} "
                     f"| {b['infer fp32']:.3f} | {b['infer bf16']:.3f} | {b['infer bf16'] / b['infer fp32']:.2f} |")
    section = (f"\n{machine()}, {threads} thread(s), "
               f"native bf16 {native_bf16(torch.device('cpu'))}, load average {load_average()} at the end, "
               f"{time.strftime('%Y-%m-%d')}: `python -m benchmarks.speed.precision speed --threads {threads}`\n\n" + "\n".join(lines) + "\n")
    print(section)
    if record:
        with RESULTS.open("a") as f:
            f.write(section)


def accuracy(models: list[Path], threads: int) -> None:
    from wsi_ircr.io.images import read_image, read_label
    from wsi_ircr.metrics import aji, mean_scores, score_instances
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    torch.set_num_threads(threads)
    stems = json.loads((DATA / "meta.json").read_text())["kumar_split"]["val"]
    tiles = [(read_image(DATA / "images" / f"{s}.tif"), read_label(DATA / "labels" / f"{s}.png")) for s in stems]
    print(f"| model | fp32 AJI | bf16 AJI | bf16 vs fp32 instances AJI |  ({len(stems)} Kumar validation tiles)")
    print("|---|---|---|---|")
    for path in models:
        checkpoint = load_checkpoint(path)
        predictors = {key: Predictor(checkpoint, device="cpu", precision=key) for key in ("fp32", "bf16")}
        scores: dict[str, list] = {key: [] for key in predictors}
        agreement = []
        for image, labels in tiles:
            out = {}
            for key, predictor in predictors.items():
                out[key] = predictor.segment_image(image, 0.25)
                scores[key].append(score_instances(labels, out[key]))
            agreement.append(aji(out["fp32"], out["bf16"]))
        m = {k: mean_scores(v)["aji"] for k, v in scores.items()}
        print(f"| {path.parent.name}/{path.name} | {m['fp32']:.4f} | {m['bf16']:.4f} | {np.mean(agreement):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--blocks", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--no-record", action="store_true")
    a = sub.add_parser("accuracy")
    a.add_argument("models", type=Path, nargs="+")
    a.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.cmd == "speed":
        speed(args.threads, args.blocks, args.steps, not args.no_record)
    else:
        accuracy(args.models, args.threads)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
