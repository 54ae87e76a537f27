"""Loss balancing: the automatic weight that gives MIAC a set fraction of the supervised gradient."""

from __future__ import annotations

import pytest
import torch

from wsi_ircr.train.balance import gradient_norm, matched_weight


def toy_losses():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    x = torch.rand(2, 3, 8, 8, generator=gen)
    target = torch.rand(2, 2, 8, 8, generator=gen)
    out = net(x)
    sup = ((out - target) ** 2).mean()
    term = 50.0 * ((out - out.detach().flip(-1)) ** 2).mean()
    return net, sup, term


@pytest.mark.parametrize("ratio", [0.1, 0.5, 2.0])
def test_matched_weight_gives_the_term_the_asked_fraction_of_the_gradient(ratio):
    net, sup, term = toy_losses()
    params = list(net.parameters())
    w = matched_weight(sup, term, params, ratio)
    assert w is not None and w > 0
    assert gradient_norm(w * term, params) == pytest.approx(ratio * gradient_norm(sup, params), rel=1e-5)
    (sup + w * term).backward()  # the graph is still there for the training step
    assert all(p.grad is not None for p in params)


def test_matched_weight_without_a_gradient_keeps_the_last_weight():
    net, sup, _ = toy_losses()
    params = list(net.parameters())
    assert matched_weight(sup, torch.zeros(()), params, 0.5) is None
    assert matched_weight(sup, 0.0 * sup, params, 0.5) is None
    with pytest.raises(ValueError):
        matched_weight(sup, sup, params, 0.0)
