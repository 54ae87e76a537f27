"""Versions of the packages that shape results, recorded in checkpoints and summaries."""

from __future__ import annotations


def versions() -> dict[str, str]:
    """``{"wsi_ircr": ..., "torch": ..., "numpy": ..., ...}`` (plain strings)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import wsi_ircr

    out = {"wsi_ircr": wsi_ircr.__version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "scikit-image", "zarr", "dask", "distributed", "openslide-python", "openslide-bin", "shapely"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
