"""Training data: labelled / unlabelled / validation tiles in memory, and crop sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.train.config import DataConfig, SourceConfig


@dataclass
class TileSet:
    """Whole tiles: ``images`` uint8 (H, W, 3); ``labels`` int32 (H, W) or None (unlabelled).

    Labelled sets from several sources also carry, per tile, ``ignore`` (bool (H, W), True =
    not annotated, or None) and ``binary`` (True: the labels are nucleus masks, not instances).
    """

    stems: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] | None = None
    ignore: list[np.ndarray | None] | None = None
    binary: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def partial(self) -> bool:
        """True when some tile has unannotated pixels or binary labels (losses need masks)."""
        return any(m is not None for m in self.ignore or ()) or any(self.binary or ())

    def extend(self, other: TileSet) -> None:
        """Append ``other``'s labelled tiles, keeping per-tile ``ignore`` / ``binary`` aligned."""
        n = len(self)
        self.ignore = (self.ignore or [None] * n) + (other.ignore or [None] * len(other))
        self.binary = (self.binary or [False] * n) + (other.binary or [False] * len(other))
        self.stems += other.stems
        self.images += other.images
        self.labels = (self.labels or []) + (other.labels or [])


@dataclass
class TrainData:
    """The tiles of a run; ``sources``: where they came from (``train.provenance.describe_sources``)."""

    labelled: TileSet
    unlabelled: TileSet
    val: TileSet
    sources: list[dict] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "labelled": self.labelled.stems,
            "unlabelled": self.unlabelled.stems,
            "val": self.val.stems,
            "n_nuclei_labelled": int(sum(len(np.unique(l)) - 1 for l in self.labelled.labels or [])),
        }


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _resampled(tiles: TileSet, from_mpp: float, to_mpp: float) -> TileSet:
    """Training tiles at ``to_mpp``: images bilinear (antialiased), labels and ignore masks nearest."""
    from wsi_ircr.model.resample import resize_image, resize_labels, same_mpp, scaled_shape

    if same_mpp(from_mpp, to_mpp):
        return tiles
    shapes = [scaled_shape(im.shape[:2], from_mpp, to_mpp) for im in tiles.images]
    images = [resize_image(im, s) for im, s in zip(tiles.images, shapes)]
    labels = None if tiles.labels is None else [resize_labels(lab, s) for lab, s in zip(tiles.labels, shapes)]
    ignore = None if tiles.ignore is None else [m if m is None else resize_labels(m, s) > 0 for m, s in zip(tiles.ignore, shapes)]
    return TileSet(tiles.stems, images, labels, ignore, tiles.binary)


def load_source(source: SourceConfig, base_dir: Path, model_mpp: float, files: list | None = None) -> TileSet:
    """The tiles of one extra labelled source at ``model_mpp`` (``exclude``d stems left out);
    each tile's files (image, label map, ignore mask if any) are appended to ``files``."""
    from wsi_ircr.io.images import check_pair, pair_folders, read_image, read_label

    all_pairs = pair_folders(_resolve(base_dir, source.images), _resolve(base_dir, source.labels))
    missing = sorted(set(source.exclude) - {stem for stem, _, _ in all_pairs})
    if missing:
        raise UserError(f"{source.images}: exclude lists {len(missing)} stem(s) not in the folder, e.g. {missing[0]!r}; fix the list")
    pairs = [p for p in all_pairs if p[0] not in set(source.exclude)]
    if not pairs:
        raise UserError(f"{source.images}: every tile of this source is excluded; remove the source or shorten exclude")
    tiles = TileSet([], [], [], [], [source.kind == "binary"] * len(pairs))
    for stem, image_path, label_path in pairs:
        image, label = read_image(image_path), read_label(label_path)
        check_pair(image, label, (image_path, label_path))
        ignore = None
        if source.ignore:
            ignore_path = _resolve(base_dir, source.ignore) / label_path.name
            if ignore_path.exists():
                ignore = read_label(ignore_path) > 0
                check_pair(image, ignore, (image_path, ignore_path))
        tiles.stems.append(stem)
        tiles.images.append(image)
        tiles.labels.append((label > 0).astype(np.int32) if source.kind == "binary" else label)
        tiles.ignore.append(ignore)
        if files is not None:
            files.append((image_path, label_path) + ((ignore_path,) if ignore is not None else ()))
    return _resampled(tiles, source.mpp, model_mpp)


def load_train_data(cfg: DataConfig, base_dir: Path = Path("."), model_mpp: float | None = None) -> TrainData:
    """Read the folders of ``cfg`` (relative paths resolve against ``base_dir``) and split them.

    Labelled and unlabelled training tiles are resampled from ``cfg.mpp`` to ``model_mpp``
    (None: no resampling); validation tiles stay at ``cfg.mpp``, where their labels are.
    Without ``images`` and ``labels`` only ``unlabelled`` (and ``extra``) tiles are read.
    ``sources`` describes every file read (dataset, tile count, content hash, licence).
    """
    from scipy import ndimage

    from wsi_ircr.io.images import check_pair, list_images, pair_folders, read_image, read_label
    from wsi_ircr.train.provenance import describe_sources

    if bool(cfg.images) != bool(cfg.labels):
        raise UserError("training data: set both data.images and data.labels (folders of tiles and instance maps), e.g. --images DIR --labels DIR")
    pairs = pair_folders(_resolve(base_dir, cfg.images), _resolve(base_dir, cfg.labels)) if cfg.images else []
    by_stem = {stem: (img, lab) for stem, img, lab in pairs}
    for name, stems in (("include", cfg.include), ("val", cfg.val)):
        missing = [s for s in stems if s not in by_stem]
        if missing:
            raise UserError(f"data.{name}: {len(missing)} stem(s) not found in {cfg.images}, e.g. {missing[0]!r}; fix the list or the folder")
    pool = [s for s in (cfg.include or sorted(by_stem)) if s not in set(cfg.val)]
    if not pool and cfg.images and cfg.labelled != 0:
        raise UserError(f"{cfg.images}: no labelled tiles left for training after removing the validation stems")
    rng = np.random.default_rng(cfg.label_seed)
    n_lab = len(pool) if cfg.labelled is None else cfg.labelled
    if cfg.labelled_fraction is not None:
        n_lab = max(1, round(cfg.labelled_fraction * len(pool)))
    if n_lab > len(pool):
        raise UserError(f"data.labelled={n_lab} but only {len(pool)} labelled tiles are in the training pool; lower it")
    order = rng.permutation(len(pool))
    lab_stems = sorted(pool[i] for i in order[:n_lab])
    unl_stems = sorted(pool[i] for i in order[n_lab:])

    binary = cfg.labels_kind == "binary"

    def load(stems: list[str], with_labels: bool, components: bool = False) -> TileSet:
        """Tiles of ``stems``; binary masks become 0/1 (training) or, ``components``, their
        connected components (validation scoring)."""
        images, labels = [], []
        for s in stems:
            image = read_image(by_stem[s][0])
            images.append(image)
            if with_labels:
                label = read_label(by_stem[s][1])
                check_pair(image, label, by_stem[s])
                if binary:
                    label = ndimage.label(label > 0)[0].astype(np.int32) if components else (label > 0).astype(np.int32)
                labels.append(label)
        if binary and with_labels and not components:  # NP-only tiles (TileSet.partial)
            return TileSet(list(stems), images, labels, [None] * len(stems), [True] * len(stems))
        return TileSet(list(stems), images, labels if with_labels else None)

    unlabelled = load(unl_stems, with_labels=False)
    files = {"labelled": [by_stem[s] for s in lab_stems], "validation": [by_stem[s] for s in sorted(cfg.val)],
             "unlabelled": [by_stem[s][:1] for s in unl_stems]}
    if cfg.unlabelled:
        for path in list_images(_resolve(base_dir, cfg.unlabelled)):
            unlabelled.stems.append(path.stem)
            unlabelled.images.append(read_image(path))
            files["unlabelled"].append((path,))
    to_mpp = cfg.mpp if model_mpp is None else model_mpp
    labelled = _resampled(load(lab_stems, True), cfg.mpp, to_mpp)
    for source in cfg.extra:
        labelled.extend(load_source(source, base_dir, to_mpp, files["labelled"]))
    return TrainData(labelled, _resampled(unlabelled, cfg.mpp, to_mpp), load(sorted(cfg.val), True, components=True),
                     describe_sources(files))


class CropSampler:
    """Random geometrically augmented crops from whole tiles.

    A crop of ``crop_px + 2 * margin_px`` is cut and augmented; HV targets are computed on
    it so nuclei cut by the final ``crop_px`` border keep the targets of their full shape.
    ``scale_jitter`` s > 0 zooms every crop by a factor z uniform in [1 - s, 1 + s] (nuclei sizes
    vary between scanners and slides): a window of size / z px is cut from the tile (real
    context, no mirrored border) and resized to the crop's size, the image bilinearly and the
    labels by nearest neighbour.
    """

    def __init__(self, tiles: TileSet, crop_px: int, rng: np.random.Generator, margin_px: int = 32, scale_jitter: float = 0.0):
        if not len(tiles):
            raise ValueError("CropSampler needs at least one tile")
        small = [(s, im.shape[:2]) for s, im in zip(tiles.stems, tiles.images) if min(im.shape[:2]) < crop_px]
        if small:
            stem, (h, w) = small[0]
            raise UserError(f"tile {stem!r} is {h}x{w} px, smaller than crop_px={crop_px} ({len(small)} such tile(s)); "
                            f"lower crop_px (a multiple of 16) or remove the small tiles")
        if not 0 <= scale_jitter < 1:
            raise ValueError(f"scale_jitter must be in [0, 1), got {scale_jitter}")
        self.tiles, self.crop_px, self.rng, self.margin_px = tiles, crop_px, rng, margin_px
        self.scale_range = (1 - scale_jitter, 1 + scale_jitter) if scale_jitter > 0 else None
        areas = np.array([im.shape[0] * im.shape[1] for im in tiles.images], np.float64)
        self.tile_p = None if np.all(areas == areas[0]) else areas / areas.sum()  # crops in proportion to area

    def _window(self, shape_rc: tuple[int, int], size: int) -> tuple[int, int]:
        r = self.rng.integers(-self.margin_px, max(shape_rc[0] - size + self.margin_px, -self.margin_px) + 1)
        c = self.rng.integers(-self.margin_px, max(shape_rc[1] - size + self.margin_px, -self.margin_px) + 1)
        return int(r), int(c)

    @staticmethod
    def _cut(array: np.ndarray, r0: int, c0: int, size: int) -> np.ndarray:
        """``size`` x ``size`` window at (r0, c0), reflect-padded where it leaves the array."""
        h, w = array.shape[:2]
        pad = [(max(-r0, 0), max(r0 + size - h, 0)), (max(-c0, 0), max(c0 + size - w, 0))]
        window = array[max(r0, 0) : r0 + size, max(c0, 0) : c0 + size]
        if any(p for pair in pad for p in pair):
            mode = "reflect" if array.ndim == 3 else "constant"
            window = np.pad(window, pad + [(0, 0)] * (array.ndim - 2), mode=mode)
        return window

    def sample(self, n: int) -> dict[str, np.ndarray]:
        """``{"image": uint8 (n, C, C, 3), "labels": int32 (n, C, C), "hv": float32 (n, 2, C, C)}``
        (labels and hv only for labelled tiles), C = crop_px. Sets with unannotated pixels or
        binary labels (``TileSet.partial``) add ``"valid"`` float32 (n, C, C), 1 = annotated,
        and ``"hv_valid"`` float32 (n,), 1 = instance labels (HV targets mean something)."""
        from wsi_ircr.model.resample import resize_image, resize_labels
        from wsi_ircr.train.augment import geometric_augment
        from wsi_ircr.train.targets import hv_targets

        size, m, c = self.crop_px + 2 * self.margin_px, self.margin_px, self.crop_px
        partial = self.tiles.labels is not None and self.tiles.partial
        images, labels, hvs, valid, hv_valid = [], [], [], [], []
        for _ in range(n):
            i = int(self.rng.choice(len(self.tiles), p=self.tile_p)) if self.tile_p is not None else int(self.rng.integers(len(self.tiles)))
            image = self.tiles.images[i]
            src = size if self.scale_range is None else round(size / self.rng.uniform(*self.scale_range))
            r0, c0 = self._window(image.shape[:2], src)
            crop = resize_image(self._cut(image, r0, c0, src), (size, size))
            if self.tiles.labels is None:
                crop, _ = geometric_augment(crop, np.zeros(crop.shape[:2], np.int32), self.rng)
                images.append(crop[m : m + c, m : m + c])
                continue
            lab = resize_labels(self._cut(self.tiles.labels[i], r0, c0, src), (size, size))
            ignore = self.tiles.ignore[i] if partial else None
            if ignore is not None:  # the mask rides along as a 4th channel through the same geometry
                mask = resize_labels(self._cut(ignore.astype(np.uint8), r0, c0, src), (size, size)).astype(np.uint8)
                crop = np.concatenate([crop, mask[..., None]], axis=2)
            crop, lab = geometric_augment(crop, lab, self.rng)
            images.append(crop[m : m + c, m : m + c, :3])
            labels.append(lab[m : m + c, m : m + c])
            hvs.append(hv_targets(lab)[:, m : m + c, m : m + c])
            if partial:
                valid.append(1.0 - crop[m : m + c, m : m + c, 3] if ignore is not None else np.ones((c, c)))
                hv_valid.append(0.0 if self.tiles.binary[i] else 1.0)
        out = {"image": np.ascontiguousarray(np.stack(images))}
        if valid:
            out["valid"] = np.stack(valid).astype(np.float32)
            out["hv_valid"] = np.array(hv_valid, np.float32)
        if labels:
            out["labels"] = np.stack(labels).astype(np.int32)
            out["hv"] = np.stack(hvs).astype(np.float32)
        return out
