"""Inference speed of the network builders (and post-processing) on this machine.

    python -m benchmarks.speed.bench_network [--threads 2] [--device cpu]   # appends to benchmarks/network.md

Measures forward passes of 2 x 1024 x 1024 tiles (the segment default) in bf16 autocast where
it is native (CUDA, CPUs with AVX512-BF16 / AMX; as segment does) and fp32 elsewhere,
channels_last, after one warm-up batch; and the HV watershed of the bundled model on one
1024 x 1024 MoNuSeg-like tile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from wsi_ircr.model.inference import native_bf16, predict_maps_tensor
from wsi_ircr.model.net import BUILDERS, build_model

from benchmarks.common import REPO, machine


def forward_mpx_per_s(name: str, device: torch.device, repeats: int) -> tuple[float, float]:
    net = build_model(name).to(device).eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 1024, 1024, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=native_bf16(device)):
        predict_maps_tensor(net, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict_maps_tensor(net, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return x.shape[0] * 1024 * 1024 / seconds / 1e6, params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [f"\n## {machine(args.device)}: {args.device}, {args.threads} threads, "
             f"{'bf16' if native_bf16(device) else 'fp32'}\n",
             "Command: `python -m benchmarks.speed.bench_network --threads %d --device %s`\n" % (args.threads, args.device),
             "| network | parameters (M) | forward Mpx/s |", "|---|---|---|"]
    for name in BUILDERS:
        mpx, params = forward_mpx_per_s(name, device, args.repeats)
        lines.append(f"| {name} | {params:.2f} | {mpx:.2f} |")
    from wsi_ircr.model.checkpoint import bundled_model_path, load_checkpoint
    from wsi_ircr.model.inference import Predictor

    if bundled_model_path().exists():
        rng = np.random.default_rng(0)
        image = np.full((1024, 1024, 3), (225, 180, 215), np.uint8)
        rr, cc = np.mgrid[:1024, :1024]
        for r, c in rng.integers(20, 1004, size=(800, 2)):
            image[(rr - r) ** 2 + (cc - c) ** 2 < 81] = (90, 40, 140)
        predictor = Predictor(load_checkpoint(None), device=args.device)
        prob, hv = predictor.predict_maps(image[None])
        t0 = time.perf_counter()
        labels = predictor.instances(prob[0], hv[0])
        seconds = time.perf_counter() - t0
        lines.append(f"\nHV watershed post-processing (1 thread, numpy/scikit-image): {1.048576 / seconds:.2f} Mpx/s "
                     f"({labels.max()} instances on a synthetic 1024 x 1024 tile)")
    text = "\n".join(lines) + "\n"
    with open(REPO / "benchmarks" / "network.md", "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
