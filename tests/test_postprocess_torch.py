"""The torch post-processing against the scikit-image reference, on synthetic maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from wsi_ircr.metrics import aji
from wsi_ircr.model.postprocess import PostProcessConfig, boundary_energy, instances_from_maps
from wsi_ircr.model.postprocess_torch import (
    _fill_holes,
    _opening3,
    connected_components,
    flood,
    gaussian_filter,
    instances_from_maps_torch,
)
from wsi_ircr.model.postprocess_torch import boundary_energy as boundary_energy_torch
from wsi_ircr.train.targets import hv_targets


def touching_nuclei(seed: int, shape_rc=(96, 128), n: int = 14) -> np.ndarray:
    """int32 instance map of ``n`` ellipses of 6-11 px radius, many touching (later ones on top)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape_rc)
    labels = np.zeros(shape_rc, np.int32)
    for k in range(1, n + 1):
        r, c = rng.uniform(0, shape_rc[0]), rng.uniform(0, shape_rc[1])
        a, b = rng.uniform(6, 11, 2)
        labels[((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1] = k
    return labels


def noisy_maps(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability (H, W) and HV (2, H, W) like a network's: blurred, with noise."""
    rng = np.random.default_rng(seed)
    prob = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0) + rng.normal(0, 0.08, labels.shape)
    hv = hv_targets(labels) + rng.normal(0, 0.05, (2, *labels.shape))
    return np.clip(prob, 0, 1).astype(np.float32), np.clip(hv, -1, 1).astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps are equal up to relabelling (0 stays 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (np.all((pairs[0] == 0) == (pairs[1] == 0)) and len(np.unique(pairs[0])) == pairs.shape[1]
            and len(np.unique(pairs[1])) == pairs.shape[1])


@pytest.mark.parametrize("seed", range(4))
def test_connected_components_equal_ndimage_label(seed):
    mask = np.random.default_rng(seed).random((3, 40, 50)) < 0.55
    labels = connected_components(torch.from_numpy(mask)).numpy()
    for image, got in zip(mask, labels):
        assert same_partition(ndi.label(image)[0], got)
    # labels never collide between images of a batch
    assert not set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])


@pytest.mark.parametrize("seed", range(3))
def test_fill_holes_and_opening_equal_ndimage(seed):
    mask = ndi.binary_dilation(np.random.default_rng(seed).random((2, 60, 70)) < 0.08, iterations=2)
    mask[:, 20:30, 20:30] = True
    mask[:, 24:26, 24:26] = False  # a hole
    t = torch.from_numpy(mask)
    filled = _fill_holes(t).numpy()
    opened = _opening3(t).numpy()
    for k in range(2):
        np.testing.assert_array_equal(filled[k], ndi.binary_fill_holes(mask[k]))
        np.testing.assert_array_equal(opened[k], ndi.binary_opening(mask[k], structure=np.ones((3, 3), bool)))
    assert filled[:, 25, 25].all()


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.5])
def test_energy_equals_the_reference(sigma):
    hv = np.random.default_rng(1).uniform(-1, 1, (2, 33, 47)).astype(np.float32)
    got = boundary_energy_torch(torch.from_numpy(hv)[None], sigma)[0].numpy()
    np.testing.assert_allclose(got, boundary_energy(hv, sigma), atol=2e-6)
    x = torch.from_numpy(hv[:1])
    np.testing.assert_allclose(gaussian_filter(x, 3.0)[0].numpy(), ndi.gaussian_filter(hv[0], 3.0), atol=2e-6)


def test_flood_gives_each_basin_its_marker():
    # two basins: elevation rises away from two seeds; the ridge between them is at column 10
    cols = np.arange(21, dtype=np.float32)
    elevation = np.tile(np.minimum(np.abs(cols - 3), np.abs(cols - 17)), (5, 1))
    markers = np.zeros((5, 21), np.int64)
    markers[2, 3], markers[2, 17] = 7, 9
    mask = np.ones((5, 21), bool)
    mask[:, 0] = False
    out = flood(torch.from_numpy(elevation)[None], torch.from_numpy(markers)[None], torch.from_numpy(mask)[None])[0]
    assert (out[:, 1:10] == 7).all() and (out[:, 11:] == 9).all() and (out[:, 0] == 0).all()
    assert set(out[:, 10].tolist()) <= {7, 9}


@pytest.mark.parametrize("seed", range(3))
def test_instances_agree_with_the_reference_on_noisy_maps(seed):
    truth = [touching_nuclei(seed * 10 + k) for k in range(2)]
    maps = [noisy_maps(t, seed) for t in truth]
    probs = torch.from_numpy(np.stack([m[0] for m in maps]))
    hvs = torch.from_numpy(np.stack([m[1] for m in maps]))
    got = instances_from_maps_torch(probs, hvs, mpp=0.25)
    assert got.dtype == torch.int32 and got.shape == probs.shape
    for k, (prob, hv) in enumerate(maps):
        ref = instances_from_maps(prob, hv, mpp=0.25)
        out = got[k].numpy()
        assert ref.max() >= 8  # the maps are hard enough to mean something
        assert np.array_equal(np.unique(out), np.arange(out.max() + 1))  # 1..n per image
        assert out.max() == ref.max()
        assert aji(ref, out) >= 0.99


def test_batch_equals_one_image_at_a_time():
    maps = [noisy_maps(touching_nuclei(s), s) for s in (5, 6, 7)]
    probs = torch.from_numpy(np.stack([m[0] for m in maps]))
    hvs = torch.from_numpy(np.stack([m[1] for m in maps]))
    batch = instances_from_maps_torch(probs, hvs, mpp=0.25)
    for k in range(3):
        alone = instances_from_maps_torch(probs[k:k + 1], hvs[k:k + 1], mpp=0.25)[0]
        assert same_partition(batch[k].numpy(), alone.numpy())


def test_the_config_and_mpp_are_honoured():
    labels = touching_nuclei(3)
    prob, hv = noisy_maps(labels, 3)
    p, h = torch.from_numpy(prob)[None], torch.from_numpy(hv)[None]
    strict = PostProcessConfig(np_threshold=0.95)
    assert (instances_from_maps_torch(p, h, strict, mpp=0.25) > 0).sum() < (instances_from_maps_torch(p, h, mpp=0.25) > 0).sum()
    # 400 um^2 is 6,400 px at 0.25 um/px (none so large) but 100 px at 2 um/px
    big = PostProcessConfig(min_area_um2=400.0)
    assert instances_from_maps_torch(p, h, big, mpp=0.25).max() == 0
    assert instances_from_maps_torch(p, h, big, mpp=2.0).max() > 0


def test_empty_maps_give_zeros():
    out = instances_from_maps_torch(torch.zeros(2, 16, 16), torch.zeros(2, 2, 16, 16), mpp=0.25)
    assert out.shape == (2, 16, 16) and out.dtype == torch.int32 and not out.any()


@pytest.mark.gpu
def test_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU comparison runs only where torch sees a GPU")
    maps = [noisy_maps(touching_nuclei(s), s) for s in (8, 9)]
    probs = torch.from_numpy(np.stack([m[0] for m in maps]))
    hvs = torch.from_numpy(np.stack([m[1] for m in maps]))
    cpu = instances_from_maps_torch(probs, hvs, mpp=0.25)
    gpu = instances_from_maps_torch(probs.cuda(), hvs.cuda(), mpp=0.25).cpu()
    for k in range(2):
        assert aji(cpu[k].numpy(), gpu[k].numpy()) >= 0.999
