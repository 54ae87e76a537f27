"""Loss balancing: a weight that gives one loss term a set fraction of another's gradient norm."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def gradient_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    """L2 norm of d(loss)/d(params) over all ``params`` (the graph is kept for later backward passes)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.float() ** 2).sum()) for g in grads if g is not None))


def matched_weight(reference: torch.Tensor, term: torch.Tensor, params: Iterable[torch.Tensor], ratio: float,
                   eps: float = 1e-12) -> float | None:
    """The weight w with ||d(w * term)/dp|| = ``ratio`` * ||d(reference)/dp|| over ``params``.

    Returns None when ``term`` has no gradient (e.g. nothing matched): keep the last weight.
    """
    if ratio <= 0:
        raise ValueError(f"matched_weight: ratio must be > 0, got {ratio}")
    params = [p for p in params if p.requires_grad]
    if not term.requires_grad:
        return None
    term_norm = gradient_norm(term, params)
    if term_norm <= eps:
        return None
    return ratio * gradient_norm(reference, params) / term_norm
