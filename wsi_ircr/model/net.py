"""Compact HoVer-Net-style encoder-decoder with NP and HV heads, built by name.

Input: float tensor (N, 3, H, W) of RGB in [0, 1]; H and W multiples of 16 are cheapest
(any size works: the decoder resizes to the skip connections).
Output: dict ``{"np": (N, 2, H, W) logits (background, nucleus),
"hv": (N, 2, H, W) horizontal (x) / vertical (y) offset to the nucleus centre in [-1, 1]}``.

Design for whole slides on CPU and GPU: a cheap full-resolution stem, the residual
U-Net encoder/decoder at 1/2 to 1/16 resolution, and a full-resolution fusion layer that
feeds two 3x3 heads (HoVer-Net's NP and HV branches; no type branch). ``lite-l-fr``
adds a residual block at full resolution to both the stem and the fusion (measured in
benchmarks/recipe.md, row lfr2000: no gain over lite-l).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

_MEAN = (0.70, 0.55, 0.70)
_STD = (0.17, 0.20, 0.15)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class ConvBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual (1x1 when widths differ) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(c_in, c_out),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x), inplace=True)


class NucleiNet(nn.Module):
    """Stem (full res) -> residual U-Net (1/2 .. 1/2**len(widths)) -> fusion -> NP, HV heads.

    ``full_res_blocks`` residual blocks follow the stem's conv and the fusion's conv
    (0: one conv each, the original layout and state-dict keys).
    ``half_res``: the stem sees each 2 x 2 block of pixels as 12 channels (pixel unshuffle) and
    the heads predict 4 x 2 channels that a pixel shuffle lays back out at full resolution, so
    every convolution runs at 1/2 resolution or below (the CPU students; about 1/4 the work).
    """

    def __init__(self, widths: tuple[int, ...], stem: int, head: int, full_res_blocks: int = 0, half_res: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.half_res = half_res
        factor = 2 if half_res else 1
        self.stem = _conv_bn_relu(3 * factor**2, stem)
        if full_res_blocks:
            self.stem.extend(ConvBlock(stem, stem) for _ in range(full_res_blocks))
        chain = (stem, *widths)
        self.down = nn.ModuleList(ConvBlock(a, b) for a, b in zip(chain[:-1], chain[1:]))
        rev = widths[::-1]
        self.up = nn.ModuleList(ConvBlock(a + b, b) for a, b in zip(rev[:-1], rev[1:]))
        self.fuse = _conv_bn_relu(widths[0] + stem, head)
        if full_res_blocks:
            self.fuse.extend(ConvBlock(head, head) for _ in range(full_res_blocks))
        self.np_head = nn.Conv2d(head, 2 * factor**2, 3, padding=1)
        self.hv_head = nn.Conv2d(head, 2 * factor**2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        if self.half_res:
            x = F.pixel_unshuffle(F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if h % 2 or w % 2 else x, 2)
        s0 = self.stem(x)
        skips = []
        y = s0
        for block in self.down:
            y = block(F.max_pool2d(y, 2))
            skips.append(y)
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=s0.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([y, s0], dim=1))
        np_logits, hv = self.np_head(y), self.hv_head(y)
        if self.half_res:
            np_logits, hv = F.pixel_shuffle(np_logits, 2)[..., :h, :w], F.pixel_shuffle(hv, 2)[..., :h, :w]
        return {"np": np_logits, "hv": torch.tanh(hv)}


BUILDERS: dict[str, Callable[[], NucleiNet]] = {
    "lite-s": lambda: NucleiNet((24, 48, 96, 160), stem=12, head=16),
    "lite-m": lambda: NucleiNet((32, 64, 128, 192), stem=16, head=24),
    "lite-l": lambda: NucleiNet((48, 96, 192, 384), stem=24, head=32),
    "lite-l-fr": lambda: NucleiNet((48, 96, 192, 384), stem=24, head=32, full_res_blocks=1),
    "lite-m-half": lambda: NucleiNet((32, 64, 128, 192), stem=24, head=32, half_res=True),
}


def build_model(name: str) -> NucleiNet:
    """Build the network registered as ``name`` (see ``BUILDERS``), randomly initialised."""
    if name not in BUILDERS:
        from wsi_ircr.errors import UserError

        raise UserError(f"unknown architecture {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name]()
