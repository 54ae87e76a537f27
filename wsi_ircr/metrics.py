"""Instance segmentation metrics: AJI, Dice, panoptic quality (DQ, SQ, PQ) and object F1.

Inputs are instance maps of the same shape: integer arrays, 0 = background, any other
non-negative id = one object (ids need not be contiguous; the two maps' ids are
unrelated). All metrics come from one table of pairwise intersections built in a single
pass over the pixels (``np.bincount`` on combined ids), so a 1000x1000 tile with hundreds
of nuclei scores in a few milliseconds.

Definitions follow HoVer-Net's ``compute_stats`` (``get_fast_aji``, ``get_fast_pq``,
``get_dice_1``):

- AJI (Kumar et al. 2017): each ground-truth object is paired with the prediction of
  largest IoU (if it overlaps any); AJI = sum of paired intersections / (sum of paired
  unions + areas of unpaired ground-truth objects + areas of predictions paired with
  no ground-truth object). A prediction may be paired with several ground-truth objects.
- Dice: binary foreground Dice, 2|T & P| / (|T| + |P|).
- PQ: one-to-one matching at IoU > ``iou`` (unique for ``iou >= 0.5``; Hungarian
  matching on IoU otherwise); DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of matches,
  PQ = DQ * SQ. Object F1 = 2TP / (2TP + FP + FN) from the same matching (equals DQ).

Empty images: when neither map has an object every metric is 1 (nothing to find, nothing
found); when exactly one is empty every metric is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

METRIC_KEYS = ("aji", "dice", "pq", "dq", "sq", "f1")

_DENSE_MIN = 1 << 20  # bincount tables up to this size (or the pixel count) are dense


@dataclass(frozen=True)
class Overlap:
    """Areas and pairwise intersections of two instance maps (objects renumbered 1..n).

    area_true (n_true,), area_pred (n_pred,): object areas in px.
    pair_true, pair_pred (k,): 1-based object indices of every overlapping pair;
    pair_inter (k,): their intersection in px. Pairs are sorted by (pair_true, pair_pred).
    """

    area_true: np.ndarray
    area_pred: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_true(self) -> int:
        return len(self.area_true)

    @property
    def n_pred(self) -> int:
        return len(self.area_pred)

    def pair_union(self) -> np.ndarray:
        """Union in px of every overlapping pair, int64 (k,)."""
        return self.area_true[self.pair_true - 1] + self.area_pred[self.pair_pred - 1] - self.pair_inter

    def pair_iou(self) -> np.ndarray:
        """IoU of every overlapping pair, float64 (k,)."""
        return self.pair_inter / self.pair_union()


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 copy of ``labels`` with objects renumbered 1..n in id order, and their areas (n,)."""
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if flat.min() < 0:
        raise ValueError(f"instance ids must be >= 0, found {flat.min()}")
    max_id = int(flat.max())
    if max_id < max(_DENSE_MIN, flat.size):
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=max_id + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(max_id + 1, np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return lut[flat], counts[ids].astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        return inverse.astype(np.int64), counts[1:].astype(np.int64)
    return inverse.astype(np.int64) + 1, counts.astype(np.int64)


def overlap_table(true: np.ndarray, pred: np.ndarray) -> Overlap:
    """Areas and pairwise intersections of two integer instance maps of the same shape."""
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"instance maps differ in shape: true {true.shape}, pred {pred.shape}")
    for name, arr in (("true", true), ("pred", pred)):
        if arr.dtype.kind not in "iub":
            raise ValueError(f"{name} must be an integer instance map, got dtype {arr.dtype}")
    t, area_t = _renumber(true)
    p, area_p = _renumber(pred)
    both = (t > 0) & (p > 0)
    stride = len(area_p) + 1
    codes = t[both] * stride + p[both]
    if (len(area_t) + 1) * stride <= max(_DENSE_MIN, 2 * codes.size):
        counts = np.bincount(codes, minlength=(len(area_t) + 1) * stride)
        codes = np.flatnonzero(counts)
        inter = counts[codes]
    else:
        codes, inter = np.unique(codes, return_counts=True)
    return Overlap(area_t, area_p, codes // stride, codes % stride, inter.astype(np.int64))


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar 2017, HoVer-Net ``get_fast_aji``); 1.0 when both are empty."""
    return _aji(overlap_table(true, pred))


def _aji(ov: Overlap) -> float:
    if ov.n_true == 0 and ov.n_pred == 0:
        return 1.0
    union = ov.pair_union()
    iou = ov.pair_inter / union
    # best pair per ground-truth object: largest IoU, ties to the smallest prediction id
    order = np.lexsort((ov.pair_pred, -iou, ov.pair_true))
    first = np.ones(len(order), bool)
    first[1:] = ov.pair_true[order][1:] != ov.pair_true[order][:-1]
    best = order[first]
    paired_true = np.zeros(ov.n_true + 1, bool)
    paired_true[ov.pair_true[best]] = True
    paired_pred = np.zeros(ov.n_pred + 1, bool)
    paired_pred[ov.pair_pred[best]] = True
    inter_sum = ov.pair_inter[best].sum()
    union_sum = union[best].sum() + ov.area_true[~paired_true[1:]].sum() + ov.area_pred[~paired_pred[1:]].sum()
    return float(inter_sum / union_sum)


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary foreground Dice, 2|T & P| / (|T| + |P|); 1.0 when both are empty."""
    return _dice(overlap_table(true, pred))


def _dice(ov: Overlap) -> float:
    # every pixel that is foreground in both maps lies in exactly one overlapping pair
    total = int(ov.area_true.sum() + ov.area_pred.sum())
    return 1.0 if total == 0 else 2.0 * int(ov.pair_inter.sum()) / total


def _check_iou(iou: float) -> None:
    if not 0.0 <= iou < 1.0:
        raise ValueError(f"iou threshold must be in [0, 1), got {iou}")


def match_instances(ov: Overlap, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches with IoU > ``iou``: true and pred object indices of ``ov``, IoUs (each (tp,)).

    For ``iou >= 0.5`` the match is unique (two objects of one non-overlapping map cannot
    both cover more than half of the same object); below 0.5 it maximises the total IoU.
    """
    _check_iou(iou)
    pair_iou = ov.pair_iou()
    keep = pair_iou > iou
    t, p, v = ov.pair_true[keep], ov.pair_pred[keep], pair_iou[keep]
    if iou >= 0.5 or len(v) == 0:
        return t, p, v
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix

    ut, ti = np.unique(t, return_inverse=True)
    up, pi = np.unique(p, return_inverse=True)
    cost = coo_matrix((v, (ti, pi)), shape=(len(ut), len(up))).toarray()
    rows, cols = linear_sum_assignment(-cost)
    ok = cost[rows, cols] > iou
    return ut[rows[ok]], up[cols[ok]], cost[rows[ok], cols[ok]]


def _pq_f1(ov: Overlap, iou: float = 0.5) -> tuple[float, float, float, float]:
    """(DQ, SQ, PQ, F1) from one matching."""
    _check_iou(iou)
    if ov.n_true == 0 and ov.n_pred == 0:
        return 1.0, 1.0, 1.0, 1.0
    _, _, ious = match_instances(ov, iou)
    tp = len(ious)
    fp, fn = ov.n_pred - tp, ov.n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.sum() / tp) if tp else 0.0
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)
    return float(dq), sq, float(dq * sq), f1


def panoptic_quality(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) with one-to-one matching at IoU > ``iou``; (1, 1, 1) when both are empty."""
    return _pq_f1(overlap_table(true, pred), iou)[:3]


def object_f1(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """Object-level F1 = 2TP / (2TP + FP + FN) with matching at IoU > ``iou``; 1.0 when both are empty."""
    return _pq_f1(overlap_table(true, pred), iou)[3]


def score_instances(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """All metrics of one image: {"aji", "dice", "pq", "dq", "sq", "f1", "n_true", "n_pred"}."""
    ov = overlap_table(true, pred)
    dq, sq, pq, f1 = _pq_f1(ov)
    return {
        "aji": _aji(ov),
        "dice": _dice(ov),
        "pq": pq,
        "dq": dq,
        "sq": sq,
        "f1": f1,
        "n_true": ov.n_true,
        "n_pred": ov.n_pred,
    }


def mean_scores(scores: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per-image average of each metric in ``METRIC_KEYS`` (counts are left out)."""
    scores = list(scores)
    if not scores:
        raise ValueError("mean_scores needs at least one image's scores")
    return {k: float(np.mean([s[k] for s in scores])) for k in METRIC_KEYS}
