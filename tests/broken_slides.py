"""Slides with a broken tile: a JPEG-tiled TIFF whose one tile's data ends early, as a damaged
copy or a scanner fault leaves it (OpenSlide then fails every read touching that tile)."""

from __future__ import annotations

import shutil
from pathlib import Path

from synthetic_slides import write_pyramidal_tiff


def break_tile(path: Path, tile_index: int, page: int = 0) -> tuple[int, int]:
    """Overwrite bytes in the middle of tile ``tile_index`` (row-major) of IFD ``page`` with JPEG
    end-of-image markers, so it cannot be decoded; returns (offset, byte count) of its data."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[page].dataoffsets[tile_index], tif.pages[page].databytecounts[tile_index]
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\xff\xd9" * 16)
    return offset, count


def intact_and_broken(folder: Path, image_rgb, mpp: float, n_levels: int, tile_rc: tuple[int, int],
                      tile_px: int = 256) -> tuple[Path, Path]:
    """``folder/intact-L{n_levels}.tiff`` and the same file with level-0 tile ``tile_rc`` broken
    (``folder/broken-L{n_levels}.tiff``)."""
    folder.mkdir(parents=True, exist_ok=True)
    intact = write_pyramidal_tiff(folder / f"intact-L{n_levels}.tiff", image_rgb, mpp=mpp, n_levels=n_levels,
                                  tile=tile_px)
    broken = folder / f"broken-L{n_levels}.tiff"
    shutil.copyfile(intact, broken)
    cols = -(-image_rgb.shape[1] // tile_px)
    break_tile(broken, tile_rc[0] * cols + tile_rc[1])
    return intact, broken
