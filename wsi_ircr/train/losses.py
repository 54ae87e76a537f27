"""Supervised NP / HV losses (HoVer-Net) and the per-pixel consistency shared by MIAC and PIAC."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SMOOTH = 1e-3


def np_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice on the nucleus channel plus cross-entropy.

    Args:
        logits: float (N, 2, H, W), channels (background, nucleus).
        target: long (N, H, W), 1 = nucleus, 0 = background.
        weight: optional float (N, H, W) pixel weights >= 0; a 0 removes a pixel from
            both terms. Without it every pixel weighs 1.

    Returns:
        scalar: weighted mean CE + (1 - Dice), Dice over the whole batch as in HoVer-Net.
    """
    if weight is None:
        weight = torch.ones_like(target, dtype=logits.dtype)
    ce = F.cross_entropy(logits, target, reduction="none")
    ce = (weight * ce).sum() / weight.sum().clamp_min(1e-8)
    prob = torch.softmax(logits, dim=1)[:, 1]
    tgt = target.to(prob.dtype)
    inter = (weight * prob * tgt).sum()
    denom = (weight * prob).sum() + (weight * tgt).sum()
    dice = 1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)
    return ce + dice


def _sobel_kernels(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """HoVer-Net's ``size`` x ``size`` Sobel-like kernels, (2, 1, size, size): d/dx then d/dy.

    Entry (i, j) of the x kernel is x / (x^2 + y^2) with x = j - size // 2 (columns) and
    y = i - size // 2 (rows); the y kernel is its transpose. Both respond positively to
    a map that increases along their axis (``conv2d`` is a correlation).
    """
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    norm = x * x + y * y + 1e-15
    return torch.stack([x / norm, y / norm])[:, None]


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """d(h)/dx and d(v)/dy of HV maps (N, 2, H, W) by 5 x 5 Sobel, zero-padded: (N, 2, H, W)."""
    kernels = _sobel_kernels(5, hv.device, hv.dtype)
    return F.conv2d(hv, kernels, padding=2, groups=2)


def hv_loss(pred: torch.Tensor, target: torch.Tensor, fg: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """HoVer-Net HV loss: MSE over all pixels + MSGE (squared Sobel-gradient error) inside ``fg``.

    Args:
        pred, target: float (N, 2, H, W), channel 0 horizontal (x), 1 vertical (y), in [-1, 1].
        fg: (N, H, W) nucleus mask (0/1 or soft weights) where the gradient term counts.
        weight: optional float (N, H, W) pixel weights >= 0 of the MSE term (a weighted
            mean); the gradient term uses ``fg`` alone, so pass ``fg * weight`` to weight it.

    Returns:
        scalar; the gradient term is 0 when ``fg`` is empty.
    """
    sq = (pred - target) ** 2
    if weight is None:
        mse = torch.mean(sq)
    else:
        w = weight.to(pred.dtype)[:, None]
        mse = (w * sq).sum() / (2.0 * w.sum()).clamp_min(1e-8)
    diff = (hv_gradients(pred) - hv_gradients(target)) ** 2
    focus = fg.to(pred.dtype)[:, None]
    msge = (focus * diff).sum() / (2.0 * focus.sum()).clamp_min(1e-8)
    return mse + msge


def instance_loss(out: dict[str, torch.Tensor], target_np: torch.Tensor, target_hv: torch.Tensor,
                  weight: torch.Tensor | None = None, hv_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The supervised loss of one batch: NP Dice + CE plus HV MSE + MSGE (HoVer-Net).

    Args:
        out: ``{"np": (N, 2, H, W) logits, "hv": (N, 2, H, W)}`` network output.
        target_np: long (N, H, W), 1 = nucleus; target_hv: float (N, 2, H, W) from ``hv_targets``.
        weight: optional float (N, H, W) pixel weights >= 0 (0 = ignore the pixel).
        hv_weight: optional float (N, H, W) weights of the HV terms alone (default: ``weight``),
            e.g. 0 on crops whose labels are binary masks.

    Returns:
        scalar tensor.
    """
    hv_weight = weight if hv_weight is None else hv_weight
    fg = target_np.to(out["hv"].dtype)
    if hv_weight is not None:
        fg = fg * hv_weight.to(fg.dtype)
    return np_loss(out["np"].float(), target_np, weight) + hv_loss(out["hv"].float(), target_hv, fg, hv_weight)


def consistency_map(student_out: dict[str, torch.Tensor], teacher_out: dict[str, torch.Tensor],
                    teacher_temperature: float = 1.0, np_mode: str = "prob", hv: bool = True) -> torch.Tensor:
    """Per-pixel squared student-teacher difference, the teacher detached: float (N, H, W).

    By default ``(p_s - p_t)^2 + ((h_s - h_t)^2 + (v_s - v_t)^2) / 2`` with p the softmax
    nucleus probability of the ``"np"`` logits and h, v the ``"hv"`` channels. The teacher's
    logits are divided by ``teacher_temperature`` first: below 1 its probabilities are
    sharpened towards 0 / 1, so agreeing by turning both outputs soft stops paying.

    Args:
        np_mode: what the nucleus term compares: ``"prob"`` (p, above), ``"logit"`` (the
            nucleus log-odds z = logit_1 - logit_0, ``(z_s - z_t)^2``: its gradient does not
            vanish where the teacher is sure, so agreeing by turning soft costs), or ``"off"``.
        hv: include the HV term.
    """
    if teacher_temperature <= 0:
        raise ValueError(f"consistency_map: teacher_temperature must be > 0, got {teacher_temperature}")
    if np_mode not in ("prob", "logit", "off"):
        raise ValueError(f"consistency_map: np_mode must be 'prob', 'logit' or 'off', got {np_mode!r}")
    if np_mode == "off" and not hv:
        raise ValueError("consistency_map: np_mode='off' and hv=False leave nothing to compare")
    s_np, t_np = student_out["np"], teacher_out["np"].detach() / teacher_temperature
    diff = torch.zeros_like(s_np[:, 0])
    if np_mode == "prob":
        diff = diff + (torch.softmax(s_np, dim=1)[:, 1] - torch.softmax(t_np, dim=1)[:, 1]) ** 2
    elif np_mode == "logit":
        diff = diff + ((s_np[:, 1] - s_np[:, 0]) - (t_np[:, 1] - t_np[:, 0])) ** 2
    if hv:
        diff = diff + ((student_out["hv"] - teacher_out["hv"].detach()) ** 2).mean(dim=1)
    return diff


def teacher_confidence(teacher_out: dict[str, torch.Tensor], teacher_temperature: float = 1.0) -> torch.Tensor:
    """|2 p_t - 1| of the teacher's (temperature-scaled) nucleus probability: float (N, H, W) in [0, 1]."""
    p_t = torch.softmax(teacher_out["np"].detach() / teacher_temperature, dim=1)[:, 1]
    return (2.0 * p_t - 1.0).abs()


def mean_teacher_loss(s_out: dict[str, torch.Tensor], t_out: dict[str, torch.Tensor], confidence: float = 0.0) -> torch.Tensor:
    """Squared teacher-student difference of the NP softmax and the HV maps (Mean Teacher).

    Args:
        s_out, t_out: student and teacher outputs, ``np`` (N, 2, H, W) logits and ``hv`` (N, 2, H, W).
        confidence: c in [0, 1); c > 0 keeps only pixels where the teacher is sure,
            |2 p - 1| >= c with p its nucleus probability, and averages over those (0 if none).

    Returns:
        scalar: mean over the kept pixels of the NP term plus the HV term.
    """
    s_prob, t_prob = torch.softmax(s_out["np"], 1), torch.softmax(t_out["np"], 1)
    np_sq = ((s_prob - t_prob) ** 2).mean(1)
    hv_sq = ((s_out["hv"] - t_out["hv"]) ** 2).mean(1)
    if confidence <= 0:
        return np_sq.mean() + hv_sq.mean()
    keep = (teacher_confidence(t_out) >= confidence).to(np_sq.dtype)
    return ((np_sq + hv_sq) * keep).sum() / keep.sum().clamp_min(1.0)


def anchor_l2(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP: sum over every parameter of (theta - theta_0)^2, the squared distance of the
    weights ``params`` from the starting weights ``anchors`` (same shapes, no gradient)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
