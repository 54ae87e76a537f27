"""MIAC: matching-driven instance-aware consistency.

Teacher and student predictions are post-processed into instances, matched one-to-one
(Hungarian on centroid distance, pairs farther than about a nucleus radius rejected), and
the consistency loss only looks at matched instances: inside them, and, weighted by
beta, on a band around their boundaries. Unmatched instances add nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from wsi_ircr.train.losses import consistency_map, teacher_confidence


def instance_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present in ``labels`` (int (H, W), 0 = background) and their centroids.

    Returns:
        (ids int64 (K,) ascending, centroid_rc float64 (K, 2) in px (row, col)).
    """
    flat = np.asarray(labels).ravel()
    counts = np.bincount(flat)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    if ids.size == 0:
        return ids.astype(np.int64), np.zeros((0, 2))
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    sum_r = np.bincount(flat, weights=rows)[ids]
    sum_c = np.bincount(flat, weights=cols)[ids]
    return ids.astype(np.int64), np.stack([sum_r, sum_c], axis=1) / counts[ids, None]


def match_instances(teacher_labels: np.ndarray, student_labels: np.ndarray, max_dist_px: float) -> np.ndarray:
    """One-to-one teacher-student instance matching by centroid distance.

    Hungarian assignment (``linear_sum_assignment``) on the centroid distances, with pairs
    farther than ``max_dist_px`` priced out of the assignment (so a far instance never
    displaces a feasible pair) and then rejected.

    Args:
        teacher_labels, student_labels: int (H, W) instance maps, 0 = background.
        max_dist_px: largest accepted centroid distance, px (about a nucleus radius).

    Returns:
        int64 (K, 2) of (teacher_id, student_id), sorted by teacher id; (0, 2) if none.
    """
    if max_dist_px < 0:
        raise ValueError(f"match_instances: max_dist_px must be >= 0, got {max_dist_px}")
    t_ids, t_rc = instance_centroids(teacher_labels)
    s_ids, s_rc = instance_centroids(student_labels)
    if t_ids.size == 0 or s_ids.size == 0:
        return np.zeros((0, 2), np.int64)
    dist = cdist(t_rc, s_rc)
    feasible = dist <= max_dist_px
    cost = np.where(feasible, dist, max_dist_px + 1.0 + 2.0 * dist.max())
    rows, cols = linear_sum_assignment(cost)
    keep = feasible[rows, cols]
    return np.stack([t_ids[rows[keep]], s_ids[cols[keep]]], axis=1).astype(np.int64)


def _lookup(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels of ``labels`` whose id is in ``ids``."""
    lut = np.zeros(max(int(labels.max(initial=0)), int(ids.max(initial=0))) + 1, bool)
    lut[ids] = True
    lut[0] = False
    return lut[labels]


def _disk(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius_px**2


def matched_masks(
    teacher_labels: np.ndarray, student_labels: np.ndarray, matches: np.ndarray, band_px: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Where MIAC looks: inside matched instances, and a band around their boundaries.

    The boundary of a matched teacher instance is where the 3 x 3 Sobel gradient of its
    mask can be non-zero (its 3 x 3 morphological gradient: one pixel either side of the
    contour, including between two touching instances); the band is that edge dilated by
    a disk of radius ``band_px``. Band pixels on unmatched instances (teacher or student)
    are removed, so unmatched instances contribute nothing.

    Args:
        teacher_labels, student_labels: int (H, W) instance maps.
        matches: int (K, 2) of (teacher_id, student_id) from ``match_instances``.
        band_px: dilation radius of the edge, px (0 = the edge alone).

    Returns:
        (inside float32 (H, W) 0/1: union of matched teacher and student pixels,
        band float32 (H, W) 0/1).
    """
    teacher_labels, student_labels = np.asarray(teacher_labels), np.asarray(student_labels)
    if teacher_labels.shape != student_labels.shape:
        raise ValueError(f"matched_masks: teacher {teacher_labels.shape} and student {student_labels.shape} differ")
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    if band_px < 0:
        raise ValueError(f"matched_masks: band_px must be >= 0, got {band_px}")
    if not matches.size:
        return np.zeros(teacher_labels.shape, np.float32), np.zeros(teacher_labels.shape, np.float32)
    in_t = _lookup(teacher_labels, matches[:, 0])
    in_s = _lookup(student_labels, matches[:, 1])
    inside = in_t | in_s
    matched_t = np.where(in_t, teacher_labels, 0)
    hi = ndi.maximum_filter(matched_t, 3)
    edge = (hi != ndi.minimum_filter(matched_t, 3)) & (hi > 0)
    band = ndi.binary_dilation(edge, _disk(band_px)) if band_px else edge
    unmatched = ((teacher_labels > 0) & ~in_t) | ((student_labels > 0) & ~in_s)
    band &= ~(unmatched & ~inside)
    return inside.astype(np.float32), band.astype(np.float32)


def instance_weights(teacher_labels: np.ndarray, student_labels: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """Per-instance normalisation of MIAC's inside term: every matched pair weighs the same.

    Pixels of matched pair k (the union of its teacher and student instances) get
    ``1 / |union_k|``, so each pair's pixels sum to 1 and the map sums to the number of
    pairs; a large nucleus no longer outweighs small ones. Used in place of ``inside``.

    Args:
        teacher_labels, student_labels: int (H, W) instance maps.
        matches: int (K, 2) of (teacher_id, student_id) from ``match_instances``.

    Returns:
        float32 (H, W), 0 outside matched instances.
    """
    teacher_labels, student_labels = np.asarray(teacher_labels), np.asarray(student_labels)
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    if not matches.size:
        return np.zeros(teacher_labels.shape, np.float32)
    pair = np.arange(1, len(matches) + 1)
    lut_t = np.zeros(max(int(teacher_labels.max()), int(matches[:, 0].max())) + 1, np.int64)
    lut_s = np.zeros(max(int(student_labels.max()), int(matches[:, 1].max())) + 1, np.int64)
    lut_t[matches[:, 0]], lut_s[matches[:, 1]] = pair, pair
    t_pair, s_pair = lut_t[teacher_labels], lut_s[student_labels]
    s_only = np.where(s_pair != t_pair, s_pair, 0)  # student pixels not already counted for the same pair
    n = len(matches) + 1
    area = np.bincount(t_pair.ravel(), minlength=n) + np.bincount(s_only.ravel(), minlength=n)
    inv = np.zeros(n, np.float64)
    inv[1:] = 1.0 / np.maximum(area[1:], 1)
    return (inv[t_pair] + inv[s_only]).astype(np.float32)


def miac_loss(
    student_out: dict[str, torch.Tensor],
    teacher_out: dict[str, torch.Tensor],
    inside: torch.Tensor,
    band: torch.Tensor,
    beta: float = 0.5,
    teacher_temperature: float = 1.0,
    np_mode: str = "prob",
    hv: bool = True,
    min_confidence: float = 0.0,
) -> torch.Tensor:
    """MIAC consistency: mean squared student-teacher difference inside matched instances
    plus ``beta`` times the same on their boundary band.

    The per-pixel difference is ``losses.consistency_map`` (by default softmax nucleus
    probability and HV maps; the teacher is detached). Each term is a weighted mean over its
    mask's pixels in the batch, so it is 0, never NaN, when nothing matched.

    Args:
        student_out, teacher_out: ``{"np": (N, 2, H, W) logits, "hv": (N, 2, H, W)}``.
        inside, band: float (N, H, W) masks from ``matched_masks`` (stacked, on the device);
            ``inside`` may be ``instance_weights`` instead (each matched pair weighs the same).
        beta: weight of the boundary term.
        teacher_temperature: sharpening of the teacher's nucleus probability (1 = none),
            see ``losses.consistency_map``.
        np_mode, hv: what is compared (``losses.consistency_map``).
        min_confidence: pixels where the teacher's confidence |2 p_t - 1| is below this are
            left out of both terms (0 = none left out).

    Returns:
        scalar tensor.
    """
    diff = consistency_map(student_out, teacher_out, teacher_temperature, np_mode, hv)
    inside, band = inside.to(diff.dtype), band.to(diff.dtype)
    if min_confidence > 0:
        sure = (teacher_confidence(teacher_out, teacher_temperature) >= min_confidence).to(diff.dtype)
        inside, band = inside * sure, band * sure
    inner = (inside * diff).sum() / inside.sum().clamp_min(1e-8)
    edge = (band * diff).sum() / band.sum().clamp_min(1e-8)
    return inner + beta * edge
