"""Training data: labelled / unlabelled / validation tiles in memory, and crop sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_ircr.errors import UserError
from wsi_ircr.train.config import DataConfig


@dataclass
class TileSet:
    """Whole tiles: ``images`` uint8 (H, W, 3); ``labels`` int32 (H, W) or None (unlabelled)."""

    stems: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.stems)


@dataclass
class TrainData:
    labelled: TileSet
    unlabelled: TileSet
    val: TileSet

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
    """Training tiles at ``to_mpp``: images bilinear (antialiased), labels nearest."""
    from wsi_ircr.model.resample import resize_image, resize_labels, same_mpp, scaled_shape

    if same_mpp(from_mpp, to_mpp):
        return tiles
    shapes = [scaled_shape(im.shape[:2], from_mpp, to_mpp) for im in tiles.images]
    images = [resize_image(im, s) for im, s in zip(tiles.images, shapes)]
    labels = None if tiles.labels is None else [resize_labels(lab, s) for lab, s in zip(tiles.labels, shapes)]
    return TileSet(tiles.stems, images, labels)


def load_train_data(cfg: DataConfig, base_dir: Path = Path("."), model_mpp: float | None = None) -> TrainData:
    """Read the folders of ``cfg`` (relative paths resolve against ``base_dir``) and split them.

    Labelled and unlabelled training tiles are resampled from ``cfg.mpp`` to ``model_mpp``
    (None: no resampling); validation tiles stay at ``cfg.mpp``, where their labels are.
    """
    from wsi_ircr.io.images import check_pair, list_images, pair_folders, read_image, read_label

    if not cfg.images or not cfg.labels:
        raise UserError("training data: set data.images and data.labels (folders of tiles and instance maps), e.g. --images DIR --labels DIR")
    pairs = pair_folders(_resolve(base_dir, cfg.images), _resolve(base_dir, cfg.labels))
    by_stem = {stem: (img, lab) for stem, img, lab in pairs}
    for name, stems in (("include", cfg.include), ("val", cfg.val)):
        missing = [s for s in stems if s not in by_stem]
        if missing:
            raise UserError(f"data.{name}: {len(missing)} stem(s) not found in {cfg.images}, e.g. {missing[0]!r}; fix the list or the folder")
    pool = [s for s in (cfg.include or sorted(by_stem)) if s not in set(cfg.val)]
    if not pool:
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

    def load(stems: list[str], with_labels: bool) -> TileSet:
        images, labels = [], []
        for s in stems:
            image = read_image(by_stem[s][0])
            images.append(image)
            if with_labels:
                label = read_label(by_stem[s][1])
                check_pair(image, label, by_stem[s])
                labels.append(label)
        return TileSet(list(stems), images, labels if with_labels else None)

    unlabelled = load(unl_stems, with_labels=False)
    if cfg.unlabelled:
        for path in list_images(_resolve(base_dir, cfg.unlabelled)):
            unlabelled.stems.append(path.stem)
            unlabelled.images.append(read_image(path))
    to_mpp = cfg.mpp if model_mpp is None else model_mpp
    return TrainData(_resampled(load(lab_stems, True), cfg.mpp, to_mpp), _resampled(unlabelled, cfg.mpp, to_mpp),
                     load(sorted(cfg.val), True))


class CropSampler:
    """Random geometrically augmented crops from whole tiles.

    A crop of ``crop_px + 2 * margin_px`` is cut and augmented; HV targets are computed on
    it so nuclei cut by the final ``crop_px`` border keep the targets of their full shape.
    """

    def __init__(self, tiles: TileSet, crop_px: int, rng: np.random.Generator, margin_px: int = 32):
        if not len(tiles):
            raise ValueError("CropSampler needs at least one tile")
        small = [(s, im.shape[:2]) for s, im in zip(tiles.stems, tiles.images) if min(im.shape[:2]) < crop_px]
        if small:
            stem, (h, w) = small[0]
            raise UserError(f"tile {stem!r} is {h}x{w} px, smaller than crop_px={crop_px} ({len(small)} such tile(s)); "
                            f"lower crop_px (a multiple of 16) or remove the small tiles")
        self.tiles, self.crop_px, self.rng, self.margin_px = tiles, crop_px, rng, margin_px

    def _window(self, shape_rc: tuple[int, int]) -> tuple[int, int]:
        size = self.crop_px + 2 * self.margin_px
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
        (labels and hv only for labelled tiles), C = crop_px."""
        from wsi_ircr.train.augment import geometric_augment
        from wsi_ircr.train.targets import hv_targets

        size, m, c = self.crop_px + 2 * self.margin_px, self.margin_px, self.crop_px
        images, labels, hvs = [], [], []
        for _ in range(n):
            i = int(self.rng.integers(len(self.tiles)))
            image = self.tiles.images[i]
            r0, c0 = self._window(image.shape[:2])
            crop = self._cut(image, r0, c0, size)
            if self.tiles.labels is None:
                crop, _ = geometric_augment(crop, np.zeros(crop.shape[:2], np.int32), self.rng)
                images.append(crop[m : m + c, m : m + c])
                continue
            lab = self._cut(self.tiles.labels[i], r0, c0, size)
            crop, lab = geometric_augment(crop, lab, self.rng)
            images.append(crop[m : m + c, m : m + c])
            labels.append(lab[m : m + c, m : m + c])
            hvs.append(hv_targets(lab)[:, m : m + c, m : m + c])
        out = {"image": np.ascontiguousarray(np.stack(images))}
        if labels:
            out["labels"] = np.stack(labels).astype(np.int32)
            out["hv"] = np.stack(hvs).astype(np.float32)
        return out
