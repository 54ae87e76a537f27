"""PIAC: prior-driven instance-aware consistency.

Morphology priors are 1-D kernel densities of nucleus features fitted on the labelled
ground truth. A teacher instance whose features are improbable under the priors (mean
normalised density below tau) is dropped; the others are up-weighted. Background pixels
keep weight 1, so the student still learns background where the teacher sees no nucleus.
Two modes use these weights: ``"pseudo_label"`` trains the student on the kept teacher
instances with the supervised loss (``piac_targets`` + ``losses.instance_loss``), and
``"consistency"`` weights the squared teacher-student difference (``piac_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsi_ircr.errors import UserError
from wsi_ircr.morphology import FEATURES, instance_features
from wsi_ircr.train.losses import consistency_map

DEFAULT_FEATURES = ("area", "solidity", "circularity", "mean_intensity", "extent")
GRID_POINTS = 256
_QUANTILES = (0.05, 0.5, 0.95)
_CHUNK = 8192


@dataclass(frozen=True)
class FeatureDensity:
    """A 1-D Gaussian KDE of one feature, tabulated on ``len(density)`` points in [lo, hi].

    ``density`` is normalised to a maximum of 1 and is 0 outside [lo, hi].
    ``quantiles`` are the 5 %, 50 %, 95 % quantiles of the fitted values, ``n`` their count.
    """

    name: str
    lo: float
    hi: float
    bandwidth: float
    n: int
    quantiles: tuple[float, float, float]
    density: np.ndarray

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Normalised density at ``values`` (N,): float64 in [0, 1]; NaN values get 0."""
        grid = np.linspace(self.lo, self.hi, len(self.density))
        out = np.interp(np.asarray(values, np.float64), grid, self.density, left=0.0, right=0.0)
        return np.nan_to_num(out, nan=0.0)


def _fit_density(name: str, values: np.ndarray) -> FeatureDensity:
    """Gaussian KDE with Scott's bandwidth (robust spread: min(std, IQR / 1.349)) on a grid
    from the 0.5 % to the 99.5 % quantile widened by three bandwidths."""
    n = values.size
    q_lo, q25, q75, q_hi = np.quantile(values, [0.005, 0.25, 0.75, 0.995])
    spread = values.std()
    iqr = (q75 - q25) / 1.349
    if iqr > 0:
        spread = min(spread, iqr)
    floor = 1e-3 * max(abs(float(np.median(values))), 1e-3)
    bandwidth = max(spread * n ** (-1 / 5), floor)
    lo, hi = q_lo - 3 * bandwidth, q_hi + 3 * bandwidth
    grid = np.linspace(lo, hi, GRID_POINTS)
    density = np.zeros(GRID_POINTS)
    for start in range(0, n, _CHUNK):
        chunk = values[start : start + _CHUNK]
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / bandwidth) ** 2).sum(axis=1)
    density /= density.max()
    quantiles = tuple(float(q) for q in np.quantile(values, _QUANTILES))
    return FeatureDensity(name, float(lo), float(hi), float(bandwidth), int(n), quantiles, density)


class MorphologyPriors:
    """Per-feature normalised densities of ground-truth nuclei; scores instances in [0, 1]."""

    def __init__(self, densities: Sequence[FeatureDensity]):
        if not densities:
            raise ValueError("MorphologyPriors needs at least one feature density")
        self.densities = tuple(densities)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.densities)

    @classmethod
    def fit(
        cls,
        label_maps: Sequence[np.ndarray],
        images: Sequence[np.ndarray] | None,
        features: Sequence[str] = DEFAULT_FEATURES,
    ) -> MorphologyPriors:
        """Fit one KDE per feature on every nucleus of the labelled set.

        Args:
            label_maps: int (H, W) ground-truth instance maps.
            images: the matching uint8 (H, W, 3) RGB images (needed for ``mean_intensity``).
            features: names from ``wsi_ircr.morphology.FEATURES``, in pixel units.
        """
        unknown = [f for f in features if f not in FEATURES]
        if unknown or not features:
            raise UserError(f"PIAC priors: unknown feature(s) {unknown or '(none given)'}; choose from {', '.join(FEATURES)}")
        if images is not None and len(images) != len(label_maps):
            raise UserError(f"PIAC priors: {len(label_maps)} label maps but {len(images)} images; pass one image per label map")
        if images is None and "mean_intensity" in features:
            raise UserError("PIAC priors: 'mean_intensity' needs the images; pass them or drop the feature")
        tables = [instance_features(lab, None if images is None else img) for lab, img in zip(label_maps, images or [None] * len(label_maps))]
        densities = []
        for name in features:
            values = np.concatenate([t[name] for t in tables]) if tables else np.zeros(0)
            values = values[np.isfinite(values)]
            if values.size < 2:
                raise UserError(f"PIAC priors: the labelled set has {values.size} nuclei with a valid {name!r}; label at least 2 nuclei or turn PIAC off")
            densities.append(_fit_density(name, values))
        return cls(densities)

    def score(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Mean normalised density over the prior's features: float64 (N,) in [0, 1].

        ``features`` is ``instance_features(...)`` output (or any mapping of name -> (N,)).
        """
        missing = [d.name for d in self.densities if d.name not in features]
        if missing:
            raise ValueError(f"MorphologyPriors.score: features {missing} are missing")
        return np.mean([d(features[d.name]) for d in self.densities], axis=0)

    def to_dict(self) -> dict:
        """Plain lists, floats, ints and strings (JSON and ``torch.load(weights_only=True)`` safe)."""
        return {
            "version": 1,
            "features": [
                {"name": d.name, "lo": d.lo, "hi": d.hi, "bandwidth": d.bandwidth, "n": d.n,
                 "quantiles": list(d.quantiles), "density": [float(v) for v in d.density]}
                for d in self.densities
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> MorphologyPriors:
        """Inverse of ``to_dict``; a malformed dict raises ``UserError``."""
        try:
            if data["version"] != 1:
                raise ValueError(f"version {data['version']!r} is not 1")
            densities = []
            for f in data["features"]:
                density = np.asarray(f["density"], np.float64)
                if density.ndim != 1 or density.size < 2 or not float(f["hi"]) > float(f["lo"]):
                    raise ValueError(f"feature {f.get('name')!r} has a bad grid")
                densities.append(FeatureDensity(str(f["name"]), float(f["lo"]), float(f["hi"]), float(f["bandwidth"]),
                                                int(f["n"]), tuple(float(q) for q in f["quantiles"]), density))
            return cls(densities)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"PIAC morphology priors are malformed ({exc}); refit them from the labelled data or use another checkpoint") from exc

    def describe(self) -> str:
        """One line per feature: count, median, 5-95 % range and bandwidth."""
        return "\n".join(
            f"{d.name}: n={d.n} median {d.quantiles[1]:.4g}, 90 % in [{d.quantiles[0]:.4g}, {d.quantiles[2]:.4g}], bandwidth {d.bandwidth:.3g}"
            for d in self.densities
        )


def piac_weight_map(
    teacher_labels: np.ndarray,
    image: np.ndarray,
    priors: MorphologyPriors,
    tau: float = 0.35,
    w_good: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel weights of the PIAC loss from the teacher's instances.

    Background pixels weigh 1; an instance scoring below ``tau`` under the priors is
    dropped (weight 0: the teacher's prediction there is implausible, the student is not
    pulled towards it); the others weigh ``w_good`` (the paper's "up-weight the rest by w").

    Args:
        teacher_labels: int (H, W) instance map post-processed from the teacher.
        image: uint8 (H, W, 3) RGB crop the teacher saw (before photometric views).
        priors: fitted ``MorphologyPriors``.
        tau: score threshold in [0, 1]; w_good: weight >= 0 of plausible instances.

    Returns:
        (weight float32 (H, W), scores float64 (N,) of the instances in ascending label order).
    """
    if not 0.0 <= tau <= 1.0 or w_good < 0:
        raise ValueError(f"piac_weight_map: need tau in [0, 1] and w_good >= 0, got {tau}, {w_good}")
    teacher_labels = np.asarray(teacher_labels)
    table = instance_features(teacher_labels, image, features=priors.features)
    scores = priors.score(table) if table["label"].size else np.zeros(0)
    lut = np.ones(int(teacher_labels.max(initial=0)) + 1, np.float32)
    lut[table["label"]] = np.where(scores >= tau, w_good, 0.0)
    return lut[teacher_labels], scores


def piac_targets(teacher_labels: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels of the kept teacher instances (the ``"pseudo_label"`` PIAC mode).

    Dropped instances (weight 0 in ``piac_weight_map``) are removed from the targets; the
    loss ignores their pixels through the same weight, so they are neither nucleus nor
    background to the student.

    Args:
        teacher_labels: int (H, W) teacher instance map; weight: float (H, W) PIAC weights.

    Returns:
        (nucleus target uint8 (H, W), HV target float32 (2, H, W)).
    """
    from wsi_ircr.train.targets import hv_targets, np_targets

    kept = np.where(np.asarray(weight) > 0, np.asarray(teacher_labels), 0)
    return np_targets(kept), hv_targets(kept)


def piac_loss(student_out: dict[str, torch.Tensor], teacher_out: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """Weighted student-teacher consistency: sum(weight * diff) / sum(weight) over the batch.

    ``diff`` is ``losses.consistency_map`` (softmax nucleus probability and HV maps, the
    teacher detached); ``weight`` is float (N, H, W), stacked ``piac_weight_map`` outputs.
    0 (not NaN) when every weight is 0.
    """
    diff = consistency_map(student_out, teacher_out)
    weight = weight.to(diff.dtype)
    return (weight * diff).sum() / weight.sum().clamp_min(1e-8)
