"""NP + HV maps -> instance maps in torch, batched, on the maps' device (a GPU's path).

The same steps and ``PostProcessConfig`` as :func:`wsi_ircr.model.postprocess.instances_from_maps`
(the reference), with data-parallel primitives instead of scipy / scikit-image:

- connected components (4-connected, as ``ndimage.label``) by max-label propagation with
  pointer jumping;
- hole filling as background components that do not reach the border;
- Gaussian smoothing with scipy's ``reflect`` border and ``np.gradient`` differences;
- the marker watershed as a flood by elevation levels: at each level, labelled pixels at
  or below it give their label to unlabelled neighbours (the lowest such neighbour wins,
  as the lowest pixel leaves the reference's priority queue first), until nothing changes.

Instances agree with the reference up to pixels where two basins meet within one level
(see ``benchmarks/speed/bench_postprocess.py``); ids differ (1..n per image in another order).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from wsi_ircr.model.postprocess import PostProcessConfig

FLOOD_LEVELS = 32  # elevation quantiles of the flood: more = closer to the reference, slower
_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # 4-connectivity (ndimage.label's and watershed's default)


def _shift(x: torch.Tensor, dr: int, dc: int, fill) -> torch.Tensor:
    """(N, H, W) -> y with y[:, r, c] = x[:, r + dr, c + dc], ``fill`` beyond the border."""
    h, w = x.shape[-2:]
    y = torch.full_like(x, fill)
    y[:, max(-dr, 0):h - max(dr, 0), max(-dc, 0):w - max(dc, 0)] = x[:, max(dr, 0):h - max(-dr, 0), max(dc, 0):w - max(-dc, 0)]
    return y


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of bool (N, H, W): int64 (N, H, W), 0 = background; each
    component's label is 1 + the flat index (over the batch) of one of its pixels, so labels
    of different images never collide."""
    n = mask.numel()
    index = torch.arange(1, n + 1, device=mask.device, dtype=torch.int64).view(mask.shape)
    labels = torch.where(mask, index, 0)
    while True:
        grown = labels
        for dr, dc in _SHIFTS:
            grown = torch.maximum(grown, _shift(labels, dr, dc, 0))
        grown = torch.where(mask, grown, 0)
        for _ in range(4):  # pointer jumping: a label names a pixel of the same component
            flat = grown.view(-1)
            grown = torch.where(mask, flat[(grown - 1).clamp(min=0)].view(mask.shape), 0)
        if torch.equal(grown, labels):
            return labels
        labels = grown


def _fill_holes(fg: torch.Tensor) -> torch.Tensor:
    """``ndimage.binary_fill_holes`` of bool (N, H, W): background not 4-connected to the border becomes foreground."""
    background = connected_components(~fg)
    border = torch.zeros_like(fg)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    reaches = torch.zeros(fg.numel() + 1, dtype=torch.bool, device=fg.device)
    reaches[background[border & ~fg]] = True
    reaches[0] = False
    return ~reaches[background]


def _remove_small(labels: torch.Tensor, min_px: int) -> torch.Tensor:
    """Labels of fewer than ``min_px`` pixels set to 0."""
    sizes = torch.bincount(labels.view(-1), minlength=labels.numel() + 1)
    small = sizes < min_px
    small[0] = False
    return torch.where(small[labels], 0, labels)


def _reflect_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` samples on both sides of ``dim`` by half-sample symmetry (scipy's ``reflect``)."""
    n = x.shape[dim]
    parts = [x]
    while r > 0:
        k = min(r, n)
        parts = [parts[0].narrow(dim, 0, k).flip(dim)] + parts + [parts[-1].narrow(dim, parts[-1].shape[dim] - k, k).flip(dim)]
        r -= k
    return torch.cat(parts, dim)


def gaussian_filter(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """``ndimage.gaussian_filter`` (truncate 4, ``reflect`` border) of float (B, H, W) over H and W."""
    if sigma_px <= 0:
        return x
    r = int(4.0 * sigma_px + 0.5)
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    y = _reflect_pad(x, r, 2)[:, None]
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))[:, 0]
    y = _reflect_pad(y, r, 1)[:, None]
    return F.conv2d(y, kernel.view(1, 1, -1, 1))[:, 0]


def _gradient(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``np.gradient`` along ``dim`` (central inside, one-sided at the ends)."""
    n = x.shape[dim]
    inner = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)
    return torch.cat([first, inner, last], dim)


def boundary_energy(hv: torch.Tensor, smooth_sigma_px: float) -> torch.Tensor:
    """Float (N, 2, H, W) HV -> float32 (N, H, W) energy, as ``postprocess.boundary_energy``."""
    h, v = gaussian_filter(hv.float().flatten(0, 1), smooth_sigma_px).unflatten(0, (-1, 2)).unbind(1)
    return torch.clamp(torch.maximum(-_gradient(h, 2), -_gradient(v, 1)), min=0.0)


def _opening3(mask: torch.Tensor) -> torch.Tensor:
    """``ndimage.binary_opening`` with a 3x3 square (outside the image counts as background)."""
    x = F.pad(mask[:, None].float(), (1, 1, 1, 1), value=0.0)
    eroded = -F.max_pool2d(-x, 3, stride=1)
    return F.max_pool2d(eroded, 3, stride=1, padding=1)[:, 0] > 0.5


def flood(elevation: torch.Tensor, markers: torch.Tensor, mask: torch.Tensor, levels: int = FLOOD_LEVELS) -> torch.Tensor:
    """Marker-controlled watershed of float (N, H, W) ``elevation`` from int64 ``markers``
    (0 = none) inside bool ``mask``, 4-connected; pixels no marker reaches stay 0."""
    labels = torch.where(mask, markers, 0)
    inside = elevation[mask]
    if inside.numel() == 0 or not bool((labels > 0).any()):
        return labels
    sample = inside[torch.linspace(0, inside.numel() - 1, min(inside.numel(), 1 << 20), device=inside.device).long()]
    qs = torch.quantile(sample.float(), torch.linspace(0, 1, levels + 1, device=inside.device)[1:])
    thresholds = torch.cat([qs, torch.tensor([math.inf], device=qs.device)]).tolist()
    inf = torch.tensor(math.inf, device=elevation.device, dtype=elevation.dtype)
    for level in thresholds:
        while True:
            active = (labels > 0) & (elevation <= level)
            best_e = torch.full_like(elevation, math.inf)
            best_l = torch.zeros_like(labels)
            for dr, dc in _SHIFTS:
                e = torch.where(_shift(active, dr, dc, False), _shift(elevation, dr, dc, 0), inf)
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_l = torch.where(better, _shift(labels, dr, dc, 0), best_l)
            new = mask & (labels == 0) & (best_l > 0)
            if not bool(new.any()):
                break
            labels = torch.where(new, best_l, labels)
    return labels


def _relabel_sequential(labels: torch.Tensor) -> torch.Tensor:
    """Per image, labels -> 1..n in order of label value; int32."""
    n, h, w = labels.shape
    ids = torch.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return torch.zeros_like(labels, dtype=torch.int32)
    image = (ids - 1) // (h * w)  # a label is 1 + a flat pixel index of its own image
    first = torch.searchsorted(image, torch.arange(n, device=labels.device))
    rank = torch.arange(len(ids), device=labels.device) - first[image] + 1
    pos = torch.searchsorted(ids, labels.clamp(min=1)).clamp(max=len(ids) - 1)
    return torch.where(labels > 0, rank[pos], 0).to(torch.int32)


@torch.inference_mode()
def instances_from_maps_torch(np_prob: torch.Tensor, hv: torch.Tensor, config: PostProcessConfig = PostProcessConfig(),
                              *, mpp: float, levels: int = FLOOD_LEVELS) -> torch.Tensor:
    """Instance maps of a batch, on the maps' device.

    Args:
        np_prob: float (N, H, W) nucleus probability.
        hv: float (N, 2, H, W) horizontal / vertical offsets to the centre in [-1, 1].
        config: thresholds in physical units (the reference's).
        mpp: resolution of the maps (um per pixel).
        levels: elevation levels of the flood.

    Returns:
        int32 (N, H, W), 0 = background, ids 1..n_i in each image.
    """
    px = config.in_pixels(mpp)
    np_prob, hv = np_prob.float(), hv.float()
    fg = np_prob >= config.np_threshold
    if not bool(fg.any()):
        return torch.zeros(np_prob.shape, dtype=torch.int32, device=np_prob.device)
    fg = _fill_holes(fg)
    fg = _remove_small(connected_components(fg), px["min_area_px"]) > 0
    energy = boundary_energy(hv, px["smooth_sigma_px"])
    radius = torch.hypot(hv[:, 0], hv[:, 1])
    markers = fg & (energy < px["edge_threshold"]) & (radius < config.marker_radius)
    markers = _remove_small(connected_components(_opening3(markers)), px["min_marker_px"])
    labels = flood(energy + radius * 0.05, markers, fg, levels)
    unreached = fg & (labels == 0)
    if bool(unreached.any()):
        labels = torch.where(unreached, connected_components(unreached), labels)
    return _relabel_sequential(_remove_small(labels, px["min_area_px"]))
