"""Training throughput: crop Mpx/s of the real training step against a bare forward+backward.

    python -m benchmarks.speed.bench_train_speed [--threads 2] [--set KEY=VALUE ...]   # appends to benchmarks/train_speed.md

The real step is ``Trainer.train_step`` on ``configs/train/recipe.yaml`` (MoNuSeg Kumar pool
from ../shared): crop sampling, geometric and photometric augmentation, HV targets, the
supervised loss, AdamW, gradient clipping and the EMA update; validation is added at its
amortised cost (one ``validate`` call divided by ``val_every``). The bare step is the same
network, batch, memory layout (channels-last) and optimiser on a fixed random batch with a
trivial loss. Blocks of steps
alternate (bare, real, bare, real, ...) so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, load_average, machine


def main() -> None:
    from wsi_ircr.config import load_config
    from wsi_ircr.model.net import build_model
    from wsi_ircr.train.config import TrainConfig
    from wsi_ircr.train.data import load_train_data
    from wsi_ircr.train.loop import Trainer, fit_priors, validate

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    config = REPO / "configs/train/recipe.yaml"
    cfg = load_config(TrainConfig, config, [f"threads={args.threads}", *args.overrides])
    torch.set_num_threads(args.threads)
    data = load_train_data(cfg.data, config.parent, cfg.model_mpp)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), data, fit_priors(data))
        bare = build_model(cfg.arch).to(memory_format=torch.channels_last)  # the trainer's layout
        opt = torch.optim.AdamW(bare.parameters(), lr=cfg.lr)
        x = torch.rand(cfg.batch_size, 3, cfg.crop_px, cfg.crop_px).contiguous(memory_format=torch.channels_last)

        def bare_step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.amp):  # the trainer's precision
                out = bare(x)
            loss = out["np"].float().mean() + out["hv"].float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        bare_step()
        trainer.train_step()
        times = {"bare": 0.0, "real": 0.0}
        for _ in range(args.blocks):
            for name, step in (("bare", bare_step), ("real", trainer.train_step)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name] += time.perf_counter() - t0
        t0 = time.perf_counter()
        validate(trainer.eval_net(), data.val, cfg, trainer.device)
        val_seconds = time.perf_counter() - t0
    n = args.blocks * args.steps
    mpx = cfg.batch_size * cfg.crop_px**2 / 1e6
    bare_s, real_s = times["bare"] / n, times["real"] / n
    real_val_s = real_s + val_seconds / cfg.val_every
    row = (f"| {cfg.arch} | {'bf16' if trainer.amp else 'fp32'} | {cfg.model_mpp} | {cfg.batch_size} x {cfg.crop_px} | {mpx / bare_s:.3f} | {mpx / real_s:.3f} | "
           f"{mpx / real_val_s:.3f} | {bare_s / real_val_s:.2f} | {val_seconds:.1f} s / {cfg.val_every} steps |")
    print(row)
    if args.no_record:
        return
    cmd = "python -m benchmarks.speed.bench_train_speed --threads %d%s" % (args.threads, "".join(f" --set {o}" for o in args.overrides))
    text = (f"\n{machine()}, {args.threads} threads, load average {load_average()} "
            f"at the end, {time.strftime('%Y-%m-%d')}: `{cmd}`\n\n" + HEADER + row + "\n")
    with open(REPO / "benchmarks/train_speed.md", "a") as f:
        f.write(text)


HEADER = ("| arch | precision | mpp | batch | bare fwd+bwd Mpx/s | train step Mpx/s | with validation Mpx/s | trained / bare "
          "| validation |\n|---|---|---|---|---|---|---|---|---|\n")

if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
