"""Untrained checkpoints whose output still varies over an image (for pipeline tests that
need deterministic, non-empty instances but no accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_ircr.model.checkpoint import Checkpoint, save_checkpoint
from wsi_ircr.model.inference import predict_maps_tensor
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import PostProcessConfig


def signal_checkpoint(path: Path, image: np.ndarray, mpp: float = 0.25, seed: int = 0) -> Path:
    """Random weights, BatchNorm statistics from ``image`` (uint8 (H, W, 3)), and an NP
    threshold at the 70th percentile of its probabilities, so about 30 % is foreground."""
    torch.manual_seed(seed)
    net = build_model("lite-s")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    x = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        net.train()(x)
        prob, _ = predict_maps_tensor(net.eval(), x)
    threshold = float(np.clip(np.quantile(prob.numpy(), 0.7), 0.01, 0.99))
    post = PostProcessConfig(np_threshold=threshold, min_area_um2=8 * mpp**2, min_marker_um2=4 * mpp**2)
    save_checkpoint(path, Checkpoint(arch="lite-s", model_state=net.state_dict(), mpp=mpp, postprocess=post))
    return path


def synthetic_signal_model(path: Path) -> Path:
    """``signal_checkpoint`` calibrated on a 256 px synthetic H&E tile with 20 nuclei (seed 7)."""
    from synthetic_slides import synthetic_he

    image, _ = synthetic_he((256, 256), n_nuclei=20, seed=7)
    return signal_checkpoint(path, image)
