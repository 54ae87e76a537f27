"""Instance metrics on hand-computed cases, and against a direct per-object implementation."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ircr.metrics import (
    METRIC_KEYS,
    aji,
    dice,
    mean_scores,
    object_f1,
    overlap_table,
    panoptic_quality,
    score_instances,
)


def canvas(shape=(12, 12)) -> np.ndarray:
    return np.zeros(shape, np.int32)


def check(true, pred, *, aji_, dice_, dq, sq, f1):
    s = score_instances(true, pred)
    assert s["aji"] == pytest.approx(aji_)
    assert s["dice"] == pytest.approx(dice_)
    assert s["dq"] == pytest.approx(dq)
    assert s["sq"] == pytest.approx(sq)
    assert s["pq"] == pytest.approx(dq * sq)
    assert s["f1"] == pytest.approx(f1)
    # the single-metric functions agree with score_instances
    assert aji(true, pred) == pytest.approx(aji_)
    assert dice(true, pred) == pytest.approx(dice_)
    assert panoptic_quality(true, pred) == pytest.approx((dq, sq, dq * sq))
    assert object_f1(true, pred) == pytest.approx(f1)
    return s


def test_perfect_match_with_relabelled_ids_scores_one():
    true = canvas()
    true[0:3, 0:3] = 1
    true[5:9, 5:7] = 2
    true[10:12, 0:5] = 3
    pred = np.zeros_like(true, dtype=np.int64)
    pred[true == 1] = 40
    pred[true == 2] = 7
    pred[true == 3] = 10**12  # far beyond any dense table
    s = check(true, pred, aji_=1.0, dice_=1.0, dq=1.0, sq=1.0, f1=1.0)
    assert (s["n_true"], s["n_pred"]) == (3, 3)


def test_split_one_true_into_two_predictions():
    # GT: a 4x4 square (16 px). Prediction: its left 4x3 (12 px) and right 4x1 (4 px).
    # AJI: the GT pairs with the left part (IoU 12/16 = 0.75 > 4/16): inter 12, union 16;
    #      the right part is paired with no GT, its 4 px join the union -> 12 / 20 = 0.6.
    # PQ: left part matches (IoU 0.75 > 0.5): TP 1, FP 1 (right part), FN 0
    #      -> DQ = F1 = 1 / (1 + 0.5) = 2/3, SQ = 0.75. Dice: same foreground -> 1.
    true = canvas()
    true[2:6, 2:6] = 1
    pred = canvas()
    pred[2:6, 2:5] = 1
    pred[2:6, 5:6] = 2
    s = check(true, pred, aji_=0.6, dice_=1.0, dq=2 / 3, sq=0.75, f1=2 / 3)
    assert (s["n_true"], s["n_pred"]) == (1, 2)


def test_even_split_matches_nothing_at_iou_one_half():
    # GT 4x4 (16 px) split into two 4x2 halves (8 px each): IoU 0.5 each, not > 0.5.
    # AJI: GT pairs with one half (8 / 16), the other half adds 8 to the union -> 8 / 24.
    # PQ: no match -> TP 0, FP 2, FN 1 -> DQ = SQ = PQ = F1 = 0.
    true = canvas()
    true[2:6, 2:6] = 5
    pred = canvas()
    pred[2:6, 2:4] = 1
    pred[2:6, 4:6] = 2
    check(true, pred, aji_=1 / 3, dice_=1.0, dq=0.0, sq=0.0, f1=0.0)


def test_merge_two_true_into_one_prediction():
    # GT: left 4x3 (12 px) and right 4x1 (4 px) of a 4x4 square; prediction: the square.
    # AJI: both GT objects pair with the one prediction (it may be reused):
    #      inter 12 + 4, union 16 + 16 -> 16 / 32 = 0.5.
    # PQ: only the left GT matches (IoU 0.75): TP 1, FP 0, FN 1 -> DQ = F1 = 2/3, SQ 0.75.
    true = canvas()
    true[2:6, 2:5] = 1
    true[2:6, 5:6] = 2
    pred = canvas()
    pred[2:6, 2:6] = 9
    check(true, pred, aji_=0.5, dice_=1.0, dq=2 / 3, sq=0.75, f1=2 / 3)


def test_missed_object():
    # GT: A 3x3 (9 px) and B 2x2 (4 px); prediction: A exactly, B missed.
    # AJI: A inter 9 union 9; B unpaired adds 4 -> 9 / 13.
    # PQ: TP 1, FN 1 -> DQ = F1 = 2/3, SQ 1. Dice: 2 * 9 / (13 + 9) = 9/11.
    true = canvas()
    true[0:3, 0:3] = 1
    true[8:10, 8:10] = 2
    pred = canvas()
    pred[0:3, 0:3] = 3
    check(true, pred, aji_=9 / 13, dice_=9 / 11, dq=2 / 3, sq=1.0, f1=2 / 3)


def test_false_positive():
    # GT: A 3x3 (9 px); prediction: A exactly plus a 2x2 (4 px) elsewhere.
    # AJI: 9 / (9 + 4). PQ: TP 1, FP 1 -> DQ = F1 = 2/3, SQ 1. Dice: 18 / 22.
    true = canvas()
    true[0:3, 0:3] = 1
    pred = canvas()
    pred[0:3, 0:3] = 1
    pred[8:10, 8:10] = 2
    check(true, pred, aji_=9 / 13, dice_=9 / 11, dq=2 / 3, sq=1.0, f1=2 / 3)


def test_shift_by_one_pixel():
    # GT 4x4 square (16 px); prediction: the same square one column to the right.
    # Intersection 4x3 = 12, union 20 -> IoU 0.6 = AJI = SQ; matched, so DQ = F1 = 1.
    # Dice: 2 * 12 / 32 = 0.75.
    true = canvas()
    true[2:6, 2:6] = 1
    pred = canvas()
    pred[2:6, 3:7] = 1
    check(true, pred, aji_=0.6, dice_=0.75, dq=1.0, sq=0.6, f1=1.0)


def test_shift_by_two_pixels_loses_the_match():
    # Intersection 4x2 = 8, union 24 -> IoU 1/3 = AJI; not matched at 0.5:
    # TP 0, FP 1, FN 1 -> DQ = SQ = F1 = 0. Dice: 16 / 32 = 0.5.
    true = canvas()
    true[2:6, 2:6] = 1
    pred = canvas()
    pred[2:6, 4:8] = 1
    check(true, pred, aji_=1 / 3, dice_=0.5, dq=0.0, sq=0.0, f1=0.0)
    # a lower threshold accepts the pair: TP 1 -> DQ 1, SQ 1/3
    assert panoptic_quality(true, pred, iou=0.3) == pytest.approx((1.0, 1 / 3, 1 / 3))
    assert object_f1(true, pred, iou=0.3) == pytest.approx(1.0)


def test_low_threshold_matching_is_one_to_one_and_optimal():
    # GT g1 = cols 0-3, g2 = cols 4-7 (4 rows each, 16 px). Predictions: p1 = cols 2-5
    # (IoU 8/24 = 1/3 with each GT), p2 = cols 6-9 (IoU 8/24 with g2 only).
    # At IoU > 0.3 the best one-to-one matching is g1-p1, g2-p2 (not g2-p1 alone):
    # TP 2, FP 0, FN 0 -> DQ 1, SQ 1/3.
    true = np.zeros((4, 12), np.int32)
    true[:, 0:4] = 1
    true[:, 4:8] = 2
    pred = np.zeros_like(true)
    pred[:, 2:6] = 1
    pred[:, 6:10] = 2
    assert panoptic_quality(true, pred, iou=0.3) == pytest.approx((1.0, 1 / 3, 1 / 3))


def test_empty_images():
    empty = canvas()
    one = canvas()
    one[1:4, 1:4] = 1
    s = check(empty, empty, aji_=1.0, dice_=1.0, dq=1.0, sq=1.0, f1=1.0)
    assert (s["n_true"], s["n_pred"]) == (0, 0)
    check(empty, one, aji_=0.0, dice_=0.0, dq=0.0, sq=0.0, f1=0.0)
    check(one, empty, aji_=0.0, dice_=0.0, dq=0.0, sq=0.0, f1=0.0)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="shape"):
        score_instances(canvas((4, 4)), canvas((4, 5)))
    with pytest.raises(ValueError, match="integer"):
        score_instances(canvas().astype(np.float32), canvas())
    with pytest.raises(ValueError, match=">= 0"):
        score_instances(canvas() - 1, canvas())
    with pytest.raises(ValueError, match="iou"):
        panoptic_quality(canvas(), canvas(), iou=1.0)


def test_mean_scores_averages_metrics_only():
    a = {**dict.fromkeys(METRIC_KEYS, 1.0), "n_true": 3, "n_pred": 4}
    b = {**dict.fromkeys(METRIC_KEYS, 0.5), "n_true": 1, "n_pred": 0}
    assert mean_scores([a, b]) == dict.fromkeys(METRIC_KEYS, 0.75)
    with pytest.raises(ValueError):
        mean_scores([])


# --- cross-check against a direct implementation of the definitions ------------------


def reference_scores(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """AJI, DQ, SQ by explicit loops over objects (HoVer-Net get_fast_aji / get_fast_pq)."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    inter_sum = union_sum = 0
    used = set()
    for t in t_ids:
        tm = true == t
        best, best_iou = None, 0.0
        for p in p_ids:
            pm = pred == p
            iou = (tm & pm).sum() / (tm | pm).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            union_sum += tm.sum()
        else:
            pm = pred == best
            inter_sum += (tm & pm).sum()
            union_sum += (tm | pm).sum()
            used.add(best)
    union_sum += sum((pred == p).sum() for p in p_ids if p not in used)
    tp_ious = []
    for t in t_ids:
        for p in p_ids:
            tm, pm = true == t, pred == p
            iou = (tm & pm).sum() / (tm | pm).sum()
            if iou > 0.5:
                tp_ious.append(iou)
    tp = len(tp_ious)
    dq = tp / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(t_ids) - tp))
    sq = sum(tp_ious) / tp if tp else 0.0
    return inter_sum / union_sum, dq, sq


def random_instances(rng: np.random.Generator, shape=(40, 40), n=12) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for i in range(n):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        rad = rng.uniform(2, 6)
        out[(rr - r) ** 2 + (cc - c) ** 2 < rad**2] = rng.integers(1, 1000)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_direct_implementation_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    true = random_instances(rng)
    # a perturbed copy: shifted, some objects dropped, some new ones
    pred = np.roll(true, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1))
    pred[np.isin(pred, rng.choice(np.unique(pred), 2))] = 0
    extra = random_instances(rng, n=3)
    pred = np.where(extra > 0, extra + 5000, pred)
    ref_aji, ref_dq, ref_sq = reference_scores(true, pred)
    s = score_instances(true, pred)
    assert s["aji"] == pytest.approx(ref_aji)
    assert s["dq"] == pytest.approx(ref_dq)
    assert s["sq"] == pytest.approx(ref_sq)
    assert s["f1"] == pytest.approx(ref_dq)


def test_overlap_table_counts_every_overlapping_pixel():
    rng = np.random.default_rng(3)
    true, pred = random_instances(rng), random_instances(rng)
    ov = overlap_table(true, pred)
    assert ov.pair_inter.sum() == np.count_nonzero((true > 0) & (pred > 0))
    assert ov.area_true.sum() == np.count_nonzero(true)
    assert ov.n_pred == len(np.unique(pred)) - 1
    assert np.all(ov.pair_inter > 0)
