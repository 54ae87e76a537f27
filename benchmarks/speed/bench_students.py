"""Bare-forward cost of candidate CPU students against lite-m, before any is trained.

    python -m benchmarks.speed.bench_students [--threads 1] [--rounds 3]

Randomly initialised networks (weights do not change the cost) on one 1 x 3 x 1024 x 1024
segment tile, torch fp32 channels-last and ONNX Runtime int8 (when the cpu-fast extra is
installed; graphs exported into a temporary cache), interleaved round by round, best of the
rounds; printed as seconds and as a ratio to lite-m in the same engine. Ratios only: run it
on a quiet machine for absolute figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# name -> NucleiNet arguments; None: a registered architecture (model.net.BUILDERS)
CANDIDATES: dict[str, dict | None] = {
    "lite-m": None,
    "lite-s": None,
    "w16 (16,32,64,128) s8 h16": {"widths": (16, 32, 64, 128), "stem": 8, "head": 16},
    "w24 (24,48,96,128) s12 h16": {"widths": (24, 48, 96, 128), "stem": 12, "head": 16},
    "half (32,64,128,192) s16 h24": {"widths": (32, 64, 128, 192), "stem": 16, "head": 24, "half_res": True},
    "lite-m-half": None,
    "half (24,48,96,160) s16 h24": {"widths": (24, 48, 96, 160), "stem": 16, "head": 24, "half_res": True},
    "half (32,64,128) s24 h32": {"widths": (32, 64, 128), "stem": 24, "head": 32, "half_res": True},
    "half (48,96,128,192) s32 h32": {"widths": (48, 96, 128, 192), "stem": 32, "head": 32, "half_res": True},
}


def main() -> None:
    import torch

    from wsi_ircr.model import net as nets
    from wsi_ircr.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from wsi_ircr.model.engines import engine_network, installed_engines
    from wsi_ircr.model.postprocess import PostProcessConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    engine = "onnxruntime" in installed_engines()
    variants, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WSI_IRCR_CACHE"] = tmp
        for name, spec in CANDIDATES.items():
            arch = name if spec is None else f"candidate-{len(params)}"
            if spec is not None:
                nets.BUILDERS[arch] = lambda spec=spec: nets.NucleiNet(**spec)
            net = nets.build_model(arch).eval()
            params[name] = sum(p.numel() for p in net.parameters())
            variants[(name, "torch fp32")] = (net.to(memory_format=torch.channels_last), x_cl)
            if engine:
                path = Path(tmp) / f"{arch}.pt"
                save_checkpoint(path, Checkpoint(arch=arch, model_state=net.state_dict(), mpp=0.25, postprocess=PostProcessConfig()))
                variants[(name, "onnxruntime int8")] = (engine_network(load_checkpoint(path), "int8", "onnxruntime"), x)
        best = {key: float("inf") for key in variants}
        with torch.inference_mode():
            for fn, inp in variants.values():
                fn(inp)
            for _ in range(args.rounds):
                for key, (fn, inp) in variants.items():
                    t0 = time.perf_counter()
                    fn(inp)
                    best[key] = min(best[key], time.perf_counter() - t0)
    kinds = sorted({kind for _, kind in variants}, reverse=True)
    print(f"| candidate | parameters | {' | '.join(f'{k} s | x lite-m' for k in kinds)} |")
    print("|---|---|" + "---|---|" * len(kinds))
    for name in CANDIDATES:
        cells = " | ".join(f"{best[(name, k)]:.3f} | {best[(name, k)] / best[('lite-m', k)]:.2f}" for k in kinds)
        print(f"| {name} | {params[name] / 1e6:.2f} M | {cells} |")


if __name__ == "__main__":
    main()
