"""Augmentation for Mean-Teacher training.

Geometry (numpy, per crop) is applied once, before the weak / strong split, so the
teacher's and the student's instances stay aligned. The weak and strong views are purely
photometric, batched torch ops with per-sample random parameters drawn from a
``torch.Generator`` (reproducible whatever the device of the batch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB; as scikit-image).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_GREY = (0.299, 0.587, 0.114)

# Ranges of the strong view at strength 1 (each scales linearly with ``strength``).
STAIN_SCALE = 0.2  # stain concentration factor in 1 +- this (per stain)
STAIN_SHIFT = 0.05  # plus a shift of +- this optical density (per stain)
BRIGHTNESS = 0.15  # intensity factor in 1 +- this
CONTRAST = 0.25  # contrast about the image mean grey, factor in 1 +- this
SATURATION = 0.25  # saturation about each pixel's grey, factor in 1 +- this
BLUR_SIGMA_PX = 1.5  # Gaussian blur sigma uniform in [0, this]
NOISE_STD = 0.03  # additive Gaussian noise, std uniform in [0, this]


def geometric_augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flip + rot90 (the 8 symmetries of the square), the same for image and labels.

    Args:
        image: uint8 (H, W, C).
        labels: int (H, W) instance map (all zeros for unlabelled crops).
        rng: the random source (two draws).

    Returns:
        (image uint8 (H', W', C), labels int32 (H', W')); H', W' = W, H after an odd
        rotation of a non-square crop. (Scale jitter happens where crops are cut:
        ``train.data.CropSampler``.)
    """
    if image.ndim != 3 or image.shape[:2] != labels.shape:
        raise ValueError(f"geometric_augment: image {image.shape} and labels {labels.shape} do not match")
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels, dtype=np.int32)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device, cols: int = 1) -> torch.Tensor:
    """(n, cols) uniform in [lo, hi] drawn on the CPU from ``gen``, moved to ``device``."""
    return (lo + (hi - lo) * torch.rand(n, cols, generator=gen, dtype=torch.float64)).to(device=device, dtype=torch.float32)


def _check(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"{what}: expected float (N, 3, H, W) in [0, 1], got {tuple(x.shape)} {x.dtype}")


def weak_view(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.05) -> torch.Tensor:
    """Teacher view: the batch times a per-sample brightness factor in 1 +- ``brightness``.

    Args:
        x: float (N, 3, H, W) in [0, 1], any device.
        generator: CPU ``torch.Generator`` for the per-sample factors.
        brightness: 0 gives the identity.

    Returns:
        float (N, 3, H, W) in [0, 1], same device and dtype.
    """
    _check(x, "weak_view")
    factor = _uniform(generator, x.shape[0], 1 - brightness, 1 + brightness, x.device)
    return (x * factor.to(x.dtype)[:, :, None, None]).clamp_(0.0, 1.0)


def _hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample stain jitter in H&E-DAB optical-density space: s' = s * scale + shift.

    ``scale``, ``shift``: (N, 3). Identity (up to rounding) for scale 1, shift 0.
    """
    hed_from_rgb = _HED_FROM_RGB.to(x.device, torch.float32)
    rgb_from_hed = _RGB_FROM_HED.to(x.device, torch.float32)
    od = -torch.log(x.clamp_min(1e-6))
    stains = torch.einsum("nkhw,kc->nchw", od, hed_from_rgb)
    stains = stains * scale[:, :, None, None] + shift[:, :, None, None]
    return torch.exp(-torch.einsum("nkhw,kc->nchw", stains, rgb_from_hed))


def _colour_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness (N, 1), contrast about the mean grey (N, 1), saturation about grey (N, 1)."""
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype)[None, :, None, None]
    grey = (x * w).sum(dim=1, keepdim=True)
    x = grey + saturation[:, :, None, None] * (x - grey)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    x = mean + contrast[:, :, None, None] * (x - mean)
    return x * brightness[:, :, None, None]


def _gaussian_blur(x: torch.Tensor, sigma_px: torch.Tensor, radius_px: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (N, 1) in px (0 = identity), reflect padding."""
    n, c, h, w = x.shape
    r = torch.arange(-radius_px, radius_px + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (r[None] / sigma_px.clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius_px, radius_px, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius_px, radius_px), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def strong_view(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Student view: stain (HED) jitter, brightness / contrast / saturation, blur, noise.

    Every sample gets its own parameters, uniform in the ranges of the module constants
    (``STAIN_SCALE`` ... ``NOISE_STD``) times ``strength``; 0 gives the identity. Purely
    photometric: no pixel moves.

    Args:
        x: float (N, 3, H, W) in [0, 1], any device; H, W > blur radius.
        generator: CPU ``torch.Generator``; the same state gives the same output.
        strength: >= 0, scales every range.

    Returns:
        float (N, 3, H, W) in [0, 1], same device.
    """
    _check(x, "strong_view")
    if strength < 0:
        raise ValueError(f"strong_view: strength must be >= 0, got {strength}")
    n, dev, s = x.shape[0], x.device, strength
    stain_scale = _uniform(generator, n, 1 - STAIN_SCALE * s, 1 + STAIN_SCALE * s, dev, cols=3)
    stain_shift = _uniform(generator, n, -STAIN_SHIFT * s, STAIN_SHIFT * s, dev, cols=3)
    brightness = _uniform(generator, n, 1 - BRIGHTNESS * s, 1 + BRIGHTNESS * s, dev)
    contrast = _uniform(generator, n, 1 - CONTRAST * s, 1 + CONTRAST * s, dev)
    saturation = _uniform(generator, n, 1 - SATURATION * s, 1 + SATURATION * s, dev)
    sigma = _uniform(generator, n, 0.0, BLUR_SIGMA_PX * s, dev)
    noise_std = _uniform(generator, n, 0.0, NOISE_STD * s, dev)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    out = _hed_jitter(x.float(), stain_scale, stain_shift)
    out = _colour_jitter(out, brightness, contrast, saturation)
    radius = max(1, math.ceil(3 * BLUR_SIGMA_PX * s))
    out = _gaussian_blur(out, sigma, radius)
    noise_gen = torch.Generator(device=dev).manual_seed(noise_seed)
    out = out + noise_std[:, :, None, None] * torch.randn(out.shape, generator=noise_gen, device=dev, dtype=out.dtype)
    return out.clamp_(0.0, 1.0).to(x.dtype)
