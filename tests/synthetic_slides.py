"""Synthetic H&E images and slide files (generic pyramidal TIFF, Aperio SVS) for tests.

Plain functions, not fixtures: test modules build their fixtures from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_ircr.slide.reader import downsample_2x

BACKGROUND_RGB = (242, 242, 240)
TISSUE_RGB = (232, 160, 200)
NUCLEUS_RGB = (95, 55, 140)


def pyramid_levels(image_rgb: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """[image, image/2, image/4, ...] by 2x2 area means (the ``ArrayReader`` pyramid)."""
    levels = [np.ascontiguousarray(image_rgb)]
    for _ in range(1, n_levels):
        levels.append(downsample_2x(levels[-1]))
    return levels


def write_pyramidal_tiff(
    path: str | Path,
    image_rgb: np.ndarray,
    mpp: float,
    n_levels: int = 3,
    tile: int = 256,
    compression: str = "jpeg",
) -> Path:
    """Write a tiled pyramidal generic TIFF (one IFD per level, 2x downsamples) with
    resolution tags in pixels per centimetre, so OpenSlide reads it as ``generic-tiff``
    with ``openslide.mpp-x == mpp``. ``compression``: 'jpeg' (quality 95), 'deflate', 'none'.
    """
    import tifffile

    path = Path(path)
    kwargs = _compression_kwargs(compression)
    with tifffile.TiffWriter(path, bigtiff=image_rgb.nbytes > 2**31) as tif:
        for k, level in enumerate(pyramid_levels(image_rgb, n_levels)):
            res = 1e4 / (mpp * 2**k)
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                metadata=None,
                **kwargs,
            )
    return path


def write_aperio_svs(
    path: str | Path,
    image_rgb: np.ndarray,
    mpp: float,
    n_levels: int = 2,
    tile: int = 256,
    compression: str = "jpeg",
    app_mag: float = 20,
) -> Path:
    """Write an Aperio-style SVS: tiled levels whose ImageDescription starts with
    ``Aperio Image Library`` and carries ``|MPP = ...|AppMag = ...``, plus a stripped
    thumbnail, so OpenSlide reports vendor ``aperio``, ``mpp`` and ``app_mag``.
    """
    import tifffile

    path = Path(path)
    kwargs = _compression_kwargs(compression)
    levels = pyramid_levels(image_rgb, n_levels)
    h, w = image_rgb.shape[:2]
    codec = "JPEG/RGB Q=95" if compression == "jpeg" else "RGB"
    with tifffile.TiffWriter(path, bigtiff=image_rgb.nbytes > 2**31) as tif:
        for k, level in enumerate(levels):
            desc = (
                f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                f"-> {level.shape[1]}x{level.shape[0]} {codec}"
            )
            if k == 0:
                desc += f"|AppMag = {app_mag:g}|MPP = {mpp:.4f}|Filename = synthetic"
            tif.write(level, tile=(tile, tile), photometric="rgb", description=desc,
                      subfiletype=0, metadata=None, **kwargs)
            if k == 0:
                thumb = levels[-1]
                tif.write(thumb, photometric="rgb", metadata=None, subfiletype=0,
                          description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> "
                          f"{thumb.shape[1]}x{thumb.shape[0]} - |AppMag = {app_mag:g}|MPP = {mpp:.4f}")
    return path


def _compression_kwargs(compression: str) -> dict:
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": 95}}
    if compression == "deflate":
        return {"compression": "zlib"}
    if compression == "none":
        return {}
    raise ValueError(f"compression must be 'jpeg', 'deflate' or 'none', got {compression!r}")


def _smooth_noise(shape_rc: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape_rc), sigma)
    return noise / (noise.std() + 1e-9)


def tissue_region(shape_rc: tuple[int, int], seed: int, fraction: float = 0.6) -> np.ndarray:
    """bool (H, W): one smooth blob-like tissue region covering about ``fraction`` of the image."""
    h, w = shape_rc
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:h, 0:w]
    radial = np.hypot((rr - h / 2) / (h / 2), (cc - w / 2) / (w / 2))
    field = -radial + 0.15 * _smooth_noise(shape_rc, max(2.0, min(h, w) / 12), rng)
    return field >= np.quantile(field, 1 - fraction)


def synthetic_he(
    shape_rc: tuple[int, int],
    n_nuclei: int,
    seed: int,
    radius_px: tuple[float, float] = (4.0, 9.0),
    tissue_fraction: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E patch: pink tissue with dark purple elliptical nuclei on white glass.

    Returns ``(image uint8 (H, W, 3), labels int32 (H, W))``; labels are 1..n_nuclei, one per
    nucleus, non-overlapping and separated by at least one background pixel, all inside
    the tissue region (``tissue_fraction`` of the image). Semi-axes are drawn from
    ``radius_px``. Raises ValueError when the nuclei do not fit.
    """
    from skimage.draw import ellipse

    h, w = shape_rc
    rng = np.random.default_rng(seed)
    tissue = tissue_region(shape_rc, seed, tissue_fraction) if tissue_fraction < 1 else np.ones(shape_rc, bool)
    labels = np.zeros(shape_rc, np.int32)
    blocked = ~tissue
    placed, attempts = 0, 0
    while placed < n_nuclei:
        attempts += 1
        if attempts > 200 * max(n_nuclei, 1):
            raise ValueError(f"only {placed} of {n_nuclei} nuclei fit in {shape_rc}; use a larger image")
        a, b = rng.uniform(*radius_px, size=2)
        r, c = rng.uniform(0, h), rng.uniform(0, w)
        angle = rng.uniform(0, np.pi)
        rr, cc = ellipse(r, c, a, b, shape=shape_rc, rotation=angle)
        if rr.size < 4 or blocked[rr, cc].any():
            continue
        placed += 1
        labels[rr, cc] = placed
        rr, cc = ellipse(r, c, a + 2, b + 2, shape=shape_rc, rotation=angle)
        blocked[rr, cc] = True
    shade = _smooth_noise(shape_rc, 3.0, rng)[..., None]
    image = np.empty((h, w, 3), np.float32)
    image[:] = BACKGROUND_RGB
    image[tissue] = TISSUE_RGB
    image[tissue] += 12 * shade[tissue]
    nuclei = labels > 0
    image[nuclei] = NUCLEUS_RGB
    image[nuclei] += 15 * shade[nuclei]
    image += rng.normal(0, 3, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def write_leica_scn(path: str | Path, image_rgb: np.ndarray, mpp: float, offset_xy: tuple[int, int],
                    margin_xy: tuple[int, int] = (100, 60)) -> Path:
    """Write a Leica SCN (BigTIFF with the SCN XML) whose one brightfield main image lies at
    level-0 ``offset_xy`` of a larger collection, so OpenSlide reports
    ``openslide.bounds-x/-y = offset_xy`` and bounds-width/-height = the image size.
    Two levels (1x, 2x downsampled), deflate, ``mpp`` in the resolution tags."""
    import tifffile

    path = Path(path)
    h, w = image_rgb.shape[:2]
    nm = mpp * 1000
    cw, ch = w + offset_xy[0] + margin_xy[0], h + offset_xy[1] + margin_xy[1]
    levels = pyramid_levels(image_rgb, 2)
    dims = "\n".join(f'        <dimension sizeX="{lv.shape[1]}" sizeY="{lv.shape[0]}" r="{k}" ifd="{k}"/>'
                     for k, lv in enumerate(levels))
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
  <collection name="synthetic" uuid="00000000-0000-0000-0000-000000000001" sizeX="{round(cw * nm)}" sizeY="{round(ch * nm)}">
    <image name="main" uuid="00000000-0000-0000-0000-000000000002">
      <creationDate>2024-01-01T00:00:00Z</creationDate>
      <device model="Leica SCN400;Leica SCN" version="1.5"/>
      <pixels sizeX="{w}" sizeY="{h}">
{dims}
      </pixels>
      <view sizeX="{round(w * nm)}" sizeY="{round(h * nm)}" offsetX="{round(offset_xy[0] * nm)}" offsetY="{round(offset_xy[1] * nm)}" spacingZ="0"/>
      <scanSettings>
        <objectiveSettings><objective>40</objective></objectiveSettings>
        <illuminationSettings><numericalAperture>0.65</numericalAperture><illuminationSource>brightfield</illuminationSource></illuminationSettings>
      </scanSettings>
    </image>
  </collection>
</scn>"""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, level in enumerate(levels):
            res = 1e4 / (mpp * 2**k)
            tif.write(level, tile=(256, 256), photometric="rgb", description=xml if k == 0 else None,
                      resolution=(res, res), resolutionunit="CENTIMETER", compression="zlib", metadata=None)
    return path
