"""Image tiles and instance label maps on disk: reading, writing, pairing folders by stem.

Images: RGB PNG, TIFF or JPEG -> uint8 (H, W, 3). Labels: 2-D integer instance maps
(0 = background) as PNG, TIFF or .npy -> int32 (H, W). TIFF goes through tifffile, the
rest through Pillow. Every bad file or folder is a ``UserError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
_TIFF = (".tif", ".tiff")
_LABEL_HINT = "save label maps as uint16 PNG/TIFF or .npy"
_PNG_MAX_ID = np.iinfo(np.uint16).max


def _read_errors() -> tuple[type[Exception], ...]:
    import tifffile
    from PIL import Image

    # RuntimeError: imagecodecs decode errors; SyntaxError: some broken PNGs in Pillow
    return (OSError, ValueError, RuntimeError, SyntaxError, Image.DecompressionBombError, tifffile.TiffFileError)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def _require_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: is not a file")


def _read_tiff(path: Path) -> np.ndarray:
    """First series, full-resolution level; samples moved last (Y, X[, S])."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("no image data in the TIFF file")
        level = tif.series[0].levels[0]
        arr, axes = level.asarray(), level.axes
    if "S" in axes and axes.index("S") < axes.index("Y"):
        arr = np.moveaxis(arr, axes.index("S"), -1)
    return arr


def _shape_text(arr: np.ndarray) -> str:
    return "x".join(str(n) for n in arr.shape)


def _describe(arr: np.ndarray) -> str:
    """E.g. ``RGB uint8 (1000x1000x3)``, ``float32 (1000x1000)``."""
    kind = {3: "RGB ", 4: "RGBA "}.get(arr.shape[-1], "") if arr.ndim == 3 else ""
    return f"{kind}{arr.dtype} ({_shape_text(arr)})"


def _squeeze_leading(arr: np.ndarray) -> np.ndarray:
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Grey, grey+alpha, RGB or RGBA of uint8 / uint16 / float in [0, 1] -> uint8 (H, W, 3)."""
    arr = _squeeze_leading(arr)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise UserError(f"{path}: expected a 2-D grey or RGB image, found {_describe(arr)}; save tiles as 8-bit RGB PNG/TIFF/JPEG")
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif arr.dtype.kind == "f" and arr.size and np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0:
        arr = np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise UserError(f"{path}: unsupported pixel type {_describe(arr)}; save tiles as 8-bit RGB PNG/TIFF/JPEG")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def read_image(path: str | Path) -> np.ndarray:
    """An RGB tile as uint8 (H, W, 3): alpha dropped, grey repeated, uint16 scaled to 0..255."""
    from PIL import Image

    path = Path(path)
    _require_file(path)
    try:
        if path.suffix.lower() in _TIFF:
            arr = _read_tiff(path)
        else:
            with Image.open(path) as img:
                high_depth = img.mode.startswith("I") or img.mode == "F"
                arr = np.array(img if high_depth else img.convert("RGB"))
            if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= _PNG_MAX_ID:
                arr = arr.astype(np.uint16)
    except _read_errors() as e:
        raise UserError(f"{path}: cannot read image ({_reason(e)}); expected an RGB PNG, TIFF or JPEG") from None
    return _to_rgb_uint8(arr, path)


def read_label(path: str | Path) -> np.ndarray:
    """A 2-D integer instance map (0 = background) from PNG, TIFF or .npy, as int32 (H, W)."""
    from PIL import Image

    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in _TIFF:
            arr = _read_tiff(path)
        else:
            with Image.open(path) as img:
                arr = np.array(img)
    except _read_errors() as e:
        raise UserError(f"{path}: cannot read label map ({_reason(e)}); {_LABEL_HINT}") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    arr = _squeeze_leading(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise UserError(f"{path}: expected a 2-D integer instance map, found {_describe(arr)}; {_LABEL_HINT}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise UserError(f"{path}: instance ids must be in 0..2147483647, found {arr.min()}..{arr.max()}; {_LABEL_HINT}")
    return arr.astype(np.int32)


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write an instance map as a 16-bit grey PNG, atomically.

    Ids above 65535 are renumbered 1..n (ids carry no meaning beyond identity); more than
    65535 instances do not fit and raise ``UserError``.
    """
    from PIL import Image

    from wsi_ircr.io.atomic import atomic_path

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"write_label_png needs a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"instance ids must be >= 0, found {labels.min()}")
    if labels.size and labels.max() > _PNG_MAX_ID:
        ids, inverse = np.unique(labels, return_inverse=True)
        n = len(ids) - (ids[0] == 0)
        if n > _PNG_MAX_ID:
            raise UserError(f"{path}: {n} instances do not fit a uint16 PNG (at most {_PNG_MAX_ID}); segment smaller images")
        labels = inverse.reshape(labels.shape) + (ids[0] != 0)
    with atomic_path(path) as tmp:
        Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")


def _stems(stems: Iterable[str], limit: int = 3) -> str:
    """``a, b, c, ... (12 in all)``."""
    names = sorted(stems)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _index_folder(folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    """Files of ``folder`` with one of ``extensions`` (case-insensitive), by stem; hidden files skipped."""
    if not folder.exists():
        raise UserError(f"{folder}: {what} folder not found; check the path")
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; pass the folder that holds the {what}")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions or not path.is_file():
            continue
        if path.stem in by_stem:
            raise UserError(f"{folder}: {by_stem[path.stem].name} and {path.name} share the stem {path.stem!r}; keep one file per stem")
        by_stem[path.stem] = path
    if not by_stem:
        raise UserError(f"{folder}: no {what} found (expected {' '.join(extensions)} files); check the path")
    return by_stem


def pair_folders(images_dir: str | Path, labels_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, image path, label path) for every image, matched by file stem, sorted by stem.

    Every image needs a label map and every label map an image, one file per stem.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    images = _index_folder(images_dir, IMAGE_EXTENSIONS, "images")
    labels = _index_folder(labels_dir, LABEL_EXTENSIONS, "label maps")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise UserError(
            f"{len(unlabelled)} image(s) in {images_dir} have no label map in {labels_dir} "
            f"({_stems(unlabelled)}); add the label maps (same stem, {'/'.join(LABEL_EXTENSIONS)}) or move those images out"
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserError(
            f"{len(orphans)} label map(s) in {labels_dir} have no image in {images_dir} "
            f"({_stems(orphans)}); add the images (same stem) or move those label maps out"
        )
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def list_images(images_dir: str | Path) -> list[Path]:
    """Image files of an unlabelled folder, sorted by stem (one file per stem)."""
    images = _index_folder(Path(images_dir), IMAGE_EXTENSIONS, "images")
    return [images[stem] for stem in sorted(images)]


def check_pair(image: np.ndarray, label: np.ndarray, paths: tuple[Path, Path]) -> None:
    """``UserError`` unless ``label`` (H, W) has the size of ``image`` (H, W, 3); paths = (image, label)."""
    if image.shape[:2] != label.shape:
        image_path, label_path = paths
        h, w = label.shape[:2]
        ih, iw = image.shape[:2]
        raise UserError(f"{label_path}: label map is {h}x{w} px but {image_path} is {ih}x{iw} px; label maps must have their image's size")
