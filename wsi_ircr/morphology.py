"""Per-nucleus morphology, shared by PIAC priors (training) and slide export (measurements).

Every feature is computed for all instances at once from the horizontal pixel runs of the
label map (one run = one object's pixels that are consecutive in one row) and from its
border pixels, with no Python loop over instances. The values are those of
``skimage.measure.regionprops`` (``perimeter`` with 4-connectivity, ``solidity`` against
``convex_hull_image``), see :func:`instance_features`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FEATURES = ("area", "perimeter", "solidity", "circularity", "eccentricity", "extent", "mean_intensity")

# skimage.measure.perimeter: a border pixel's code is 1 + 2 * (4-neighbours on the border)
# + 10 * (diagonal neighbours on the border); the code gives its share of the perimeter.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def instance_features(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    features: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Morphological features of every instance in ``labels``, in pixel units.

    Args:
        labels: int (H, W) instance map, 0 = background, ids >= 0 (gaps allowed).
        image: optional uint8 (H, W, 3) RGB; ``mean_intensity`` is the mean grey level
            0.299 R + 0.587 G + 0.114 B (0-255, dark nuclei are low) inside each instance,
            NaN without an image.
        features: names from ``FEATURES`` to compute (None = all); the others are left out
            of the result. ``label``, ``centroid_rc`` and ``bbox_rc`` are always returned.

    Returns:
        ``{"label": (N,) int64, "centroid_rc": (N, 2) float64, "bbox_rc": (N, 4) int64
        (r0, c0, r1, c1) end-exclusive, then the requested float64 (N,) features in
        ``FEATURES`` order: "area" px^2, "perimeter" px, "solidity", "circularity"
        (4 pi area / perimeter^2, clipped to 1), "eccentricity", "extent", "mean_intensity"}``,
        ordered by label. ``perimeter``, ``solidity`` (area over the pixel count of the
        convex hull of the pixels' edge midpoints, hull borders included), ``eccentricity``
        and ``extent`` equal skimage ``regionprops`` up to rounding; ``mean_intensity`` is
        accumulated in float64 (regionprops: float32, ~1e-5 apart).
    """
    wanted = _requested(features)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"instance_features: labels must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"instance_features: labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("instance_features: labels must be >= 0 (0 = background)")
    if image is not None and np.shape(image)[:2] != labels.shape:
        raise ValueError(f"instance_features: image shape {np.shape(image)} does not match labels {labels.shape}")

    width = labels.shape[1] + 2
    flat = np.pad(labels, 1).ravel()
    steps = flat[1:] != flat[:-1]
    runs = _Runs.find(flat, width, steps)
    n = runs.n_objects
    area = np.bincount(runs.obj, weights=runs.length, minlength=n)
    out: dict[str, np.ndarray] = {
        "label": runs.object_labels,
        "centroid_rc": np.stack(runs.moments(second=False), axis=1) / np.maximum(area, 1)[:, None] + runs.origin_rc,
        "bbox_rc": runs.bbox_rc(),
    }
    perimeter = _perimeter(flat, width, steps, runs) if wanted & {"perimeter", "circularity"} else None
    for name in FEATURES:
        if name not in wanted:
            continue
        if name == "area":
            value = area
        elif name == "perimeter":
            value = perimeter
        elif name == "solidity":
            value = area / np.maximum(_convex_hull_area(runs), 1)
        elif name == "circularity":
            circularity = np.where(perimeter > 0, 4 * np.pi * area / np.maximum(perimeter, 1e-9) ** 2, 1.0)
            value = np.clip(circularity, 0.0, 1.0)
        elif name == "eccentricity":
            value = _eccentricity(runs, area)
        elif name == "extent":
            bbox = out["bbox_rc"]
            value = area / np.maximum((bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1]), 1)
        else:
            value = _mean_intensity(image, runs, area) if image is not None else np.full(n, np.nan)
        out[name] = np.asarray(value, np.float64)
    return out


def _requested(features: Iterable[str] | None) -> set[str]:
    """The requested feature names as a set; ValueError naming the unknown ones."""
    if features is None:
        return set(FEATURES)
    if isinstance(features, str):
        features = (features,)
    wanted = set(features)
    unknown = sorted(wanted - set(FEATURES))
    if unknown:
        raise ValueError(f"instance_features: unknown feature(s) {unknown}; choose from {', '.join(FEATURES)}")
    return wanted


class _Runs:
    """Horizontal runs of equal non-zero labels, grouped by object then row.

    Attributes (R runs, N objects):
        object_labels: int64 (N,) ascending ids; obj: int64 (R,) object index of each run,
            non-decreasing; row, c0, c1: int64 (R,) row and first/last column (inclusive),
            rows ascending within an object; length: int64 (R,) c1 - c0 + 1;
        origin_rc: int64 (N, 2) bbox corner (moment sums are taken relative to it);
        order: int64 (R,) raster index of each run (runs in raster order are ``[argsort(order)]``);
        lookup: int64 id -> object index table, None when the ids are too large for one.
    """

    def __init__(self, object_labels: np.ndarray, obj: np.ndarray, row: np.ndarray, c0: np.ndarray,
                 c1: np.ndarray, order: np.ndarray, lookup: np.ndarray | None):
        self.object_labels = object_labels
        self.n_objects = len(object_labels)
        self.obj, self.row, self.c0, self.c1, self.order = obj, row, c0, c1, order
        self.length = c1 - c0 + 1
        self.lookup = lookup
        self.object_starts = np.flatnonzero(np.r_[True, obj[1:] != obj[:-1]]) if len(obj) else np.zeros(0, np.int64)
        if self.n_objects:
            self.origin_rc = np.stack([row[self.object_starts], np.minimum.reduceat(c0, self.object_starts)], axis=1)
        else:
            self.origin_rc = np.zeros((0, 2), np.int64)

    @classmethod
    def find(cls, flat: np.ndarray, width: int, steps: np.ndarray) -> _Runs:
        """Runs of the raveled zero-padded label map ``flat`` ((H + 2) * (W + 2),) of padded
        row length ``width``; ``steps`` (len - 1,) is ``flat[1:] != flat[:-1]``."""
        foreground = flat != 0
        start = np.flatnonzero(steps & foreground[1:]) + 1
        end = np.flatnonzero(steps & foreground[:-1])
        run_labels = flat[start].astype(np.int64)
        object_labels, obj, lookup = _index_labels(run_labels)
        order = np.argsort(obj, kind="stable")
        start, end = start[order], end[order]
        row, c0 = np.divmod(start, width)
        return cls(object_labels, obj[order], row - 1, c0 - 1, end % width - 1, order, lookup)

    def index_of(self, values: np.ndarray) -> np.ndarray:
        """Object index of each id in ``values`` (ids that are present)."""
        if self.lookup is not None:
            return self.lookup[values]
        return np.searchsorted(self.object_labels, values)

    def bbox_rc(self) -> np.ndarray:
        """int64 (N, 4) (r0, c0, r1, c1), end-exclusive."""
        if not self.n_objects:
            return np.zeros((0, 4), np.int64)
        ends = np.r_[self.object_starts[1:], len(self.obj)] - 1
        return np.stack([self.origin_rc[:, 0], self.origin_rc[:, 1], self.row[ends] + 1,
                         np.maximum.reduceat(self.c1, self.object_starts) + 1], axis=1)

    def per_object(self, per_run: np.ndarray) -> np.ndarray:
        """float64 (N,) sums of a per-run quantity over each object's runs."""
        return np.bincount(self.obj, weights=per_run, minlength=self.n_objects)

    def moments(self, second: bool = True) -> tuple[np.ndarray, ...]:
        """float64 (N,) sums of r, c (and with ``second`` r^2, c^2 and r c) over each
        object's pixels, in coordinates relative to ``origin_rc``."""
        origin = self.origin_rc[self.obj]
        r = (self.row - origin[:, 0]).astype(np.float64)
        a = (self.c0 - origin[:, 1]).astype(np.float64)
        b = (self.c1 - origin[:, 1]).astype(np.float64)
        sum_c = (a + b) * self.length / 2
        if not second:
            return self.per_object(r * self.length), self.per_object(sum_c)
        sum_cc = (b * (b + 1) * (2 * b + 1) - (a - 1) * a * (2 * a - 1)) / 6
        return (self.per_object(r * self.length), self.per_object(sum_c), self.per_object(r * r * self.length),
                self.per_object(sum_cc), self.per_object(r * sum_c))


def _index_labels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ascending distinct ids int64 (N,), index of each value in them int64 (len,),
    id -> index lookup table or None when the ids are too large for one)."""
    top = int(values.max(initial=0))
    if top <= 8 * len(values) + 65536:
        present = np.bincount(values, minlength=top + 1) > 0
        lookup = np.cumsum(present) - 1
        return np.flatnonzero(present).astype(np.int64), lookup[values], lookup
    object_labels, index = np.unique(values, return_inverse=True)
    return object_labels.astype(np.int64), index.astype(np.int64), None


def _perimeter(flat: np.ndarray, width: int, steps: np.ndarray, runs: _Runs) -> np.ndarray:
    """skimage ``perimeter(image, 4)`` of each object's own mask: float64 (N,) px.

    A border pixel differs from one of its 4-neighbours (outside the map counts as
    background); its weight depends on which of its 8 neighbours are border pixels of the
    same object, exactly as skimage's convolution code.
    """
    border = np.zeros(len(flat), bool)
    vertical = flat[width:] != flat[:-width]
    border[width:-width] = vertical[:-width] | vertical[width:]
    border[1:-1] |= steps[:-1] | steps[1:]
    border &= flat != 0
    index = np.flatnonzero(border)
    own = flat[index]
    border_labels = np.zeros_like(flat)
    border_labels[index] = own
    code = np.ones(len(index), np.int64)
    for offset, weight in ((-1, 2), (1, 2), (-width, 2), (width, 2),
                           (-width - 1, 10), (-width + 1, 10), (width - 1, 10), (width + 1, 10)):
        code += weight * (border_labels[index + offset] == own)
    return np.bincount(runs.index_of(own), weights=_PERIMETER_WEIGHTS[code], minlength=runs.n_objects)


def _eccentricity(runs: _Runs, area: np.ndarray) -> np.ndarray:
    """sqrt(1 - l2 / l1) of the eigenvalues l1 >= l2 of each object's pixel covariance
    (skimage's inertia tensor has the same eigenvalues); 0 when l1 = 0."""
    s_r, s_c, s_rr, s_cc, s_rc = runs.moments()
    n = np.maximum(area, 1)
    var_r = np.maximum(s_rr / n - (s_r / n) ** 2, 0.0)
    var_c = np.maximum(s_cc / n - (s_c / n) ** 2, 0.0)
    cov = s_rc / n - s_r * s_c / n**2
    half_trace = (var_r + var_c) / 2
    root = np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    l1 = half_trace + root
    l2 = np.maximum(half_trace - root, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0.0, 1.0)), 0.0)


def _mean_intensity(image: np.ndarray, runs: _Runs, area: np.ndarray) -> np.ndarray:
    """Mean grey level 0.299 R + 0.587 G + 0.114 B of each object: float64 (N,).

    The grey image is float32 like regionprops' intensity image; sums are float64.
    """
    if not runs.n_objects:
        return np.zeros(0)
    channels = np.asarray(image)[..., :3]
    height, width = channels.shape[:2]
    grey = np.zeros(height * width + 1, np.float32)
    np.matmul(channels.reshape(-1, 3).astype(np.float32, copy=False), _GREY_WEIGHTS, out=grey[:-1])
    raster = np.empty_like(runs.order)
    raster[runs.order] = np.arange(len(runs.order))
    start = (runs.row * width + runs.c0)[raster]
    bounds = np.stack([start, start + runs.length[raster]], axis=1).ravel()
    sums = np.add.reduceat(grey, bounds, dtype=np.float64)[::2]
    per_run = np.empty(len(start))
    per_run[raster] = sums
    return runs.per_object(per_run) / np.maximum(area, 1)


def _convex_hull_area(runs: _Runs) -> np.ndarray:
    """Pixel count of each object's ``skimage.morphology.convex_hull_image``: int64 (N,).

    skimage takes the convex hull of the four edge midpoints (r +- 1/2, c) and (r, c +- 1/2)
    of every pixel and counts the pixel centres inside or on it. Only the first and last
    pixel of each row can be hull vertices, so the hull's left side at height y is the
    lower convex envelope of the left edge points of the rows (and the right side the upper
    envelope of the right points). Both envelopes are found for all objects at once in
    doubled (integer) coordinates; the centres of each row are then counted exactly.
    """
    n = runs.n_objects
    if not n:
        return np.zeros(0, np.int64)
    # One entry per (object, row): leftmost and rightmost column.
    new_row = np.r_[True, (runs.obj[1:] != runs.obj[:-1]) | (runs.row[1:] != runs.row[:-1])]
    first = np.flatnonzero(new_row)
    last = np.r_[first[1:], len(runs.obj)] - 1
    obj, row = runs.obj[first], runs.row[first]
    left, right = runs.c0[first], runs.c1[last]
    # Left side as x = X / 2 at height y = Y / 2, right side negated: both become lower envelopes.
    seg = np.concatenate([obj, obj + n])
    ys = np.concatenate([row, row]) * 2
    xs = np.concatenate([left, -right]) * 2
    seg = np.repeat(seg, 3)
    y = (ys[:, None] + np.array([-1, 0, 1])).ravel()
    x = (xs[:, None] + np.array([0, -1, 0])).ravel()
    # Consecutive rows share the height between them: keep the lower point.
    dup = (seg[1:] == seg[:-1]) & (y[1:] == y[:-1])
    x[1:][dup] = np.minimum(x[1:][dup], x[:-1][dup])
    keep = np.r_[~dup, True]
    seg, y, x = seg[keep], y[keep], x[keep]
    alive = _lower_envelope(seg, y, x)
    seg, y, x = seg[alive], y[alive], x[alive]
    # Count the pixel centres of every row of every object's bounding box.
    bbox = runs.bbox_rc()
    heights = bbox[:, 2] - bbox[:, 0]
    q_obj = np.repeat(np.arange(n), heights)
    q_row = bbox[q_obj, 0] + np.arange(len(q_obj)) - np.repeat(np.cumsum(heights) - heights, heights)
    stride = 2 * int(bbox[:, 2].max()) + 4
    key = seg * stride + y + 1
    lo_left = _interpolate(key, y, x, q_obj * stride + 2 * q_row + 1, 2 * q_row)
    lo_right = _interpolate(key, y, x, (q_obj + n) * stride + 2 * q_row + 1, 2 * q_row)
    # Pixel centres c with lo_left / 2 <= c <= -lo_right / 2.
    num_l, den_l = lo_left
    num_r, den_r = lo_right
    c_min = -((-num_l) // (2 * den_l))
    c_max = (-num_r) // (2 * den_r)
    count = np.maximum(c_max - c_min + 1, 0)
    return np.bincount(q_obj, weights=count, minlength=n).astype(np.int64)


def _lower_envelope(seg: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Vertices of the lower convex envelope of x(y) within each segment: bool mask.

    ``seg`` is grouped and ``y`` strictly increasing within a segment (int64). A point on or
    above the chord of its current neighbours is not a vertex; all such points are dropped
    at once and only the neighbours of dropped points are tested again, until none is.
    """
    n = len(seg)
    prev = np.arange(n) - 1
    nxt = np.arange(n) + 1
    alive = np.ones(n, bool)
    inner = np.ones(n, bool)
    inner[0] = inner[-1] = False
    inner[1:][seg[1:] != seg[:-1]] = False
    inner[:-1][seg[:-1] != seg[1:]] = False
    candidates = np.flatnonzero(inner)
    while candidates.size:
        p, s = prev[candidates], nxt[candidates]
        above = (x[candidates] - x[p]) * (y[s] - y[p]) >= (x[s] - x[p]) * (y[candidates] - y[p])
        dropped = candidates[above]
        if not dropped.size:
            break
        alive[dropped] = False
        run_first = dropped[alive[prev[dropped]]]
        run_last = dropped[alive[nxt[dropped]]]
        before, after = prev[run_first], nxt[run_last]
        nxt[before] = after
        prev[after] = before
        # before[i] < after[i] <= before[i + 1]: interleaved they are sorted.
        candidates = np.stack([before, after], axis=1).ravel()
        candidates = candidates[np.r_[True, candidates[1:] != candidates[:-1]] & inner[candidates]]
    return alive


def _interpolate(key: np.ndarray, y: np.ndarray, x: np.ndarray, query_key: np.ndarray,
                 query_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Envelope value at ``query_y`` as an exact fraction (numerator, denominator > 0) of
    doubled coordinates; ``key`` (sorted) and ``query_key`` locate the segment and height."""
    a = np.searchsorted(key, query_key, side="right") - 1
    b = np.minimum(a + 1, len(key) - 1)
    den = y[b] - y[a]
    at_vertex = (den == 0) | (y[a] == query_y)
    den = np.where(at_vertex, 1, den)
    num = np.where(at_vertex, x[a], x[a] * den + (x[b] - x[a]) * (query_y - y[a]))
    return num, den
