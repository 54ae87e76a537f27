"""Network builders, watershed post-processing, checkpoints and sliding-window inference."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_ircr.config import from_dict
from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from wsi_ircr.model.inference import Predictor, predict_maps_tensor, resolve_device
from wsi_ircr.model.net import BUILDERS, build_model
from wsi_ircr.model.postprocess import PostProcessConfig, instances_from_maps
from wsi_ircr.train.targets import hv_targets


def disk_labels(shape_rc: tuple[int, int], centres_rc: list[tuple[float, float]], radius_px: float) -> np.ndarray:
    """int32 instance map: disks of ``radius_px``; where two overlap, the nearer centre wins."""
    rr, cc = np.mgrid[: shape_rc[0], : shape_rc[1]]
    dist = np.stack([np.hypot(rr - r, cc - c) for r, c in centres_rc])
    return np.where(dist.min(0) <= radius_px, dist.argmin(0) + 1, 0).astype(np.int32)


def best_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    ids, counts = np.unique(pred[truth], return_counts=True)
    keep = ids > 0
    if not keep.any():
        return 0.0
    match = pred == ids[keep][counts[keep].argmax()]
    return float((truth & match).sum() / (truth | match).sum())


def small_checkpoint(seed: int = 0, **changes) -> Checkpoint:
    torch.manual_seed(seed)
    net = build_model("lite-s")
    fields = dict(arch="lite-s", model_state=net.state_dict(), mpp=0.5, postprocess=PostProcessConfig())
    fields.update(changes)
    return Checkpoint(**fields)


# --- net --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("shape_hw", [(32, 48), (40, 56)])
def test_builders_give_np_logits_and_bounded_hv(arch, shape_hw):
    net = build_model(arch).eval()
    x = torch.rand(2, 3, *shape_hw)
    with torch.no_grad():
        out = net(x)
    assert set(out) == {"np", "hv"}
    assert out["np"].shape == (2, 2, *shape_hw) and out["hv"].shape == (2, 2, *shape_hw)
    assert out["np"].dtype == torch.float32 and torch.isfinite(out["np"]).all()
    assert out["hv"].abs().max() <= 1.0


@pytest.mark.parametrize("shape_hw", [(100, 72), (48, 64), (5, 7)])
def test_predict_maps_tensor_pads_and_crops(shape_hw):
    net = build_model("lite-s").eval()
    x = torch.rand(1, 3, *shape_hw)
    with torch.no_grad():
        prob, hv = predict_maps_tensor(net, x)
    assert prob.shape == (1, *shape_hw) and hv.shape == (1, 2, *shape_hw)
    assert prob.dtype == hv.dtype == torch.float32
    assert ((prob >= 0) & (prob <= 1)).all() and hv.abs().max() <= 1.0


def test_padding_does_not_change_the_top_left_when_the_size_is_aligned():
    net = build_model("lite-s").eval()
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        prob, hv = predict_maps_tensor(net, x)
        out = net(x)
    assert torch.allclose(prob, torch.softmax(out["np"], 1)[:, 1])
    assert torch.allclose(hv, out["hv"])


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError) as e:
        build_model("resnet-9000")
    assert "'resnet-9000'" in str(e.value) and "lite-s" in str(e.value)


# --- postprocess ------------------------------------------------------------------------

TOUCHING = [(30, 20), (30, 37), (30, 54), (58, 28), (52, 46)]  # radius 10: pairs overlap


def test_ideal_maps_of_touching_disks_give_one_instance_each():
    labels = disk_labels((80, 80), TOUCHING, 10)
    assert len(np.unique(labels)) - 1 == len(TOUCHING)
    pred = instances_from_maps((labels > 0).astype(np.float32), hv_targets(labels), mpp=0.25)
    assert pred.dtype == np.int32 and pred.shape == labels.shape
    assert sorted(np.unique(pred)) == list(range(len(TOUCHING) + 1))  # ids 1..N, sequential
    ious = [best_iou(labels == i, pred) for i in range(1, len(TOUCHING) + 1)]
    assert min(ious) > 0.8, ious
    # each true disk is covered by a different instance: touching nuclei were separated
    winners = {int(np.bincount(pred[labels == i]).argmax()) for i in range(1, len(TOUCHING) + 1)}
    assert len(winners) == len(TOUCHING) and 0 not in winners


def test_without_hv_touching_disks_merge():
    """Control: the separation above comes from the HV maps, not from the foreground shape."""
    labels = disk_labels((80, 80), TOUCHING[:3], 10)
    pred = instances_from_maps((labels > 0).astype(np.float32), np.zeros((2, 80, 80), np.float32), mpp=0.25)
    assert pred.max() == 1


def test_small_and_faint_objects_are_dropped():
    labels = disk_labels((64, 64), [(20, 20), (45, 45)], 10)
    labels[2:5, 55:58] = 3  # 9 px speck
    prob = (labels > 0).astype(np.float32)
    prob[labels == 2] = 0.3  # below np_threshold
    pred = instances_from_maps(prob, hv_targets(labels), PostProcessConfig(min_area_um2=1.875), mpp=0.25)
    assert pred.max() == 1 and best_iou(labels == 1, pred) > 0.8


def test_thresholds_mean_the_same_nuclei_at_any_mpp():
    """Physical units: a 4 um^2 nucleus survives min_area 1.875 um^2 at 0.25 and at 0.5 um/px,
    a 1.2 um^2 speck is dropped at both; in pixels (30 px) the nucleus would vanish at 0.5."""
    fine = disk_labels((96, 96), [(30, 30), (60, 60)], 4.6)  # about 66 px = 4.1 um^2 each at 0.25
    fine[80:84, 10:15] = 3  # 20 px = 1.25 um^2 at 0.25
    coarse = fine[::2, ::2]
    post = PostProcessConfig()
    for labels, mpp in ((fine, 0.25), (coarse, 0.5)):
        pred = instances_from_maps((labels > 0).astype(np.float32), hv_targets(labels), post, mpp=mpp)
        assert pred.max() == 2, mpp
        assert pred[labels == 3].max() == 0, mpp
    assert post.in_pixels(0.5)["min_area_px"] <= (coarse == 1).sum() < 30  # a 30 px rule would drop it at 0.5
    assert post.in_pixels(0.25) == {"edge_threshold": 0.25, "min_marker_px": 8, "min_area_px": 30, "smooth_sigma_px": 1.0}


def test_pixel_unit_checkpoints_load_in_physical_units(tmp_path):
    """A checkpoint saved before physical units (thresholds in px at its mpp) keeps its meaning."""
    ckpt = small_checkpoint()
    save_checkpoint(tmp_path / "old.pt", ckpt)
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    payload["postprocess"] = {"np_threshold": 0.45, "edge_threshold": 0.35, "marker_radius": 0.3,
                              "min_marker_px": 8, "min_area_px": 30, "smooth_sigma_px": 1.0}
    torch.save(payload, tmp_path / "old.pt")
    post = load_checkpoint(tmp_path / "old.pt").postprocess  # small_checkpoint is at 0.5 um/px
    assert post.np_threshold == 0.45 and post.edge_threshold_per_um == pytest.approx(0.7)
    assert post.min_marker_um2 == pytest.approx(2.0) and post.min_area_um2 == pytest.approx(7.5)
    assert post.in_pixels(0.5) == pytest.approx({"edge_threshold": 0.35, "min_marker_px": 8, "min_area_px": 30, "smooth_sigma_px": 1.0})


@pytest.mark.parametrize("value", [0.0, 0.2])
def test_empty_probability_gives_zeros(value):
    pred = instances_from_maps(np.full((40, 50), value, np.float32), np.zeros((2, 40, 50), np.float32), mpp=0.25)
    assert pred.dtype == np.int32 and pred.shape == (40, 50) and not pred.any()


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"np_threshold": 0.0}, "np_threshold"),
        ({"np_threshold": 1.0}, "np_threshold"),
        ({"edge_threshold_per_um": 0.0}, "edge_threshold_per_um"),
        ({"marker_radius": -1.0}, "marker_radius"),
        ({"min_marker_um2": 0}, "min_marker_um2"),
        ({"min_area_um2": 0}, "min_area_um2"),
        ({"smooth_sigma_um": -0.5}, "smooth_sigma_um"),
    ],
)
def test_postprocess_config_validation(changes, word):
    with pytest.raises(ValueError, match=word):
        PostProcessConfig(**changes)
    with pytest.raises(UserError, match=word):
        from_dict(PostProcessConfig, changes, "postprocess")


# --- checkpoint -------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    from wsi_ircr.train.piac import MorphologyPriors

    labels = disk_labels((64, 64), [(16, 16), (40, 40), (16, 44)], 8)
    image = np.full((64, 64, 3), 220, np.uint8)
    image[labels > 0] = (80, 30, 120)
    priors = MorphologyPriors.fit([labels], [image]).to_dict()
    post = PostProcessConfig(np_threshold=0.4, edge_threshold_per_um=1.4, marker_radius=0.45)
    meta = {"config": {"steps": 3, "data": {"val": ["a"]}}, "metrics": {"val": {"aji": 0.5}}}
    ckpt = small_checkpoint(postprocess=post, priors=priors, meta=meta, train_state={"step": 3})
    digest = save_checkpoint(tmp_path / "m.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.arch == "lite-s" and loaded.mpp == 0.5 and loaded.postprocess == post
    assert loaded.priors == priors and MorphologyPriors.from_dict(loaded.priors).features == MorphologyPriors.from_dict(priors).features
    assert loaded.meta == meta and loaded.train_state == {"step": 3}
    assert loaded.model_hash == digest and len(digest) == 16
    assert loaded.path == tmp_path / "m.pt"
    assert loaded.model_state.keys() == ckpt.model_state.keys()
    for key, value in ckpt.model_state.items():
        assert torch.equal(loaded.model_state[key], value), key
    net = loaded.build()
    assert not net.training
    x = torch.rand(1, 3, 32, 32)
    ref = build_model("lite-s")
    ref.load_state_dict(ckpt.model_state)
    with torch.no_grad():
        assert torch.equal(net(x)["np"], ref.eval()(x)["np"])
    assert loaded.describe()["postprocess"] == dataclasses.asdict(post)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_checkpoint(seed=0))
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(10)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small_checkpoint(seed=1))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pt", small_checkpoint(seed=1))
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no partial files left


def test_wrong_architecture_weights_are_a_user_error(tmp_path):
    ckpt = small_checkpoint()
    save_checkpoint(tmp_path / "m.pt", dataclasses.replace(ckpt, arch="lite-m"))
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "m.pt").build()
    assert "m.pt" in str(e.value) and "lite-m" in str(e.value) and "\n" not in str(e.value)


def _not_ours(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "yaml":
        path.write_text("steps: 10\narch: lite-s\n")
    elif kind == "png":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    elif kind == "plain_dict":
        torch.save({"model": build_model("lite-s").state_dict()}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"format": FORMAT}))
    elif kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "truncated":
        save_checkpoint(tmp_path / "full.pt", small_checkpoint())
        data = (tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "future_version":
        torch.save({"format": FORMAT, "version": 99}, path)
    elif kind == "missing_fields":
        torch.save({"format": FORMAT, "version": 1, "arch": "lite-s"}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "kind",
    ["random", "empty", "yaml", "png", "plain_dict", "list", "pickle", "module", "truncated",
     "future_version", "missing_fields", "directory", "missing"],
)
def test_files_that_are_not_checkpoints_are_user_errors(tmp_path, kind):
    path = _not_ours(tmp_path, kind)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    text = str(e.value)
    assert str(path) in text and "\n" not in text and "\x1b" not in text and len(text) < 300


# --- inference --------------------------------------------------------------------------


class PixelNet(torch.nn.Module):
    """A stand-in network that is a function of each pixel's colour only (no context)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        return {"np": torch.cat([r - b, b - r], 1) * 8, "hv": torch.tanh(torch.cat([r - g, g - b], 1) * 4)}


def test_sliding_window_maps_equal_single_pass_for_a_context_free_net():
    """Every pixel is taken from exactly one window, at the right place."""
    predictor = Predictor(small_checkpoint(), device="cpu")
    predictor.net = PixelNet()
    image = np.random.default_rng(1).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    ref_prob, ref_hv = predictor.predict_maps(image[None])
    for window, overlap in [(64, 16), (48, 8), (40, 0)]:
        prob, hv = predictor.predict_image_maps(image, window_px=window, overlap_px=overlap)
        assert prob.shape == (150, 130) and hv.shape == (2, 150, 130)
        np.testing.assert_allclose(prob, ref_prob[0], atol=1e-6)
        np.testing.assert_allclose(hv, ref_hv[0], atol=1e-6)


def calibrated_checkpoint(image: np.ndarray, seed: int = 0) -> Checkpoint:
    """Random weights with BatchNorm statistics taken from ``image``, so outputs vary."""
    torch.manual_seed(seed)
    net = build_model("lite-s")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = those of the one batch below
    with torch.no_grad():
        net.train()(torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 255.0)
    return Checkpoint(arch="lite-s", model_state=net.state_dict(), mpp=0.5, postprocess=PostProcessConfig())


def disks_image(shape_rc: tuple[int, int], seed: int = 0) -> np.ndarray:
    """uint8 RGB: dark purple disks on a pink background, with noise."""
    rng = np.random.default_rng(seed)
    centres = [(rng.uniform(10, shape_rc[0] - 10), rng.uniform(10, shape_rc[1] - 10)) for _ in range(8)]
    labels = disk_labels(shape_rc, centres, 8)
    image = np.full((*shape_rc, 3), (230, 190, 220), np.float64)
    image[labels > 0] = (90, 40, 130)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def test_segment_image_with_windows_approaches_single_pass_with_more_context():
    """A real network sees less context near window seams; more overlap, smaller differences."""
    image = disks_image((150, 130))
    predictor = Predictor(calibrated_checkpoint(image), device="cpu")
    prob, hv = predictor.predict_image_maps(image, window_px=256)
    single_prob, single_hv = predictor.predict_maps(image[None])
    np.testing.assert_array_equal(prob, single_prob[0])
    np.testing.assert_array_equal(hv, single_hv[0])
    assert prob.std() > 0.02 and hv.std() > 0.05  # the maps carry signal to compare
    errors = []
    for overlap in (0, 16, 48):  # same 32 px step, growing context
        windowed_prob, windowed_hv = predictor.predict_image_maps(image, window_px=32 + 2 * overlap, overlap_px=overlap)
        assert windowed_prob.shape == (150, 130) and windowed_hv.shape == (2, 150, 130)
        errors.append(np.abs(windowed_prob - prob).mean() + np.abs(windowed_hv - hv).mean())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.5 * errors[0], errors
    pred = predictor.segment_image(image, window_px=64, overlap_px=16)
    assert pred.dtype == np.int32 and pred.shape == (150, 130)
    np.testing.assert_array_equal(pred, predictor.instances(*predictor.predict_image_maps(image, 64, 16)))
    np.testing.assert_array_equal(predictor.segment_image(image, window_px=256), predictor.instances(prob, hv))


def test_segment_tiles_shapes_and_batches():
    predictor = Predictor(small_checkpoint(), device="cpu", batch_size=2)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    prob, hv = predictor.predict_maps(tiles)
    assert prob.shape == (3, 32, 48) and hv.shape == (3, 2, 32, 48)
    one_prob, _ = predictor.predict_maps(tiles[2:])
    np.testing.assert_allclose(prob[2], one_prob[0], atol=1e-5)
    out = predictor.segment_tiles(tiles)
    assert len(out) == 3 and all(o.shape == (32, 48) and o.dtype == np.int32 for o in out)


def test_window_smaller_than_twice_the_overlap_is_rejected():
    predictor = Predictor(small_checkpoint(), device="cpu")
    with pytest.raises(ValueError, match="window_px"):
        predictor.predict_image_maps(np.zeros((100, 100, 3), np.uint8), window_px=32, overlap_px=16)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="--device tpu"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the no-GPU error cannot be checked here")
    with pytest.raises(UserError) as e:
        resolve_device("cuda")
    assert "--device cpu" in str(e.value)
    with pytest.raises(UserError):
        Predictor(small_checkpoint(), device="cuda")


# --- resolution and test-time augmentation ------------------------------------------------------


class BlobNet(torch.nn.Module):
    """An oracle that segments dark pixels and returns their exact NP / HV maps: it commutes with
    flips and transposes, so test-time augmentation must give back its plain output."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from scipy import ndimage as ndi

        fg = (x[:, 0] < 0.5).numpy()
        labels = [ndi.label(f)[0] for f in fg]
        hv = torch.from_numpy(np.stack([hv_targets(lab) for lab in labels]))
        fg_t = torch.from_numpy(fg).float()
        return {"np": torch.stack([4 - 8 * fg_t, 8 * fg_t - 4], 1), "hv": hv}


def test_tta_undoes_every_view():
    from wsi_ircr.model.inference import _unview, _view

    x = torch.rand(2, 3, 20, 30)
    for k in range(8):
        viewed = _view(x, k)
        assert viewed.shape[-2:] == ((30, 20) if k & 4 else (20, 30))
        prob, _ = _unview(viewed[:, 0], viewed[:, 1:], k)
        assert torch.equal(prob, x[:, 0]), k
    predictor = Predictor(small_checkpoint(), device="cpu")
    predictor.net = BlobNet()
    image = disks_image((96, 80), seed=3)
    plain_prob, plain_hv = predictor.predict_maps(image[None])
    for tta in (2, 4, 8):
        predictor.tta = tta
        prob, hv = predictor.predict_maps(image[None])
        np.testing.assert_allclose(prob, plain_prob, atol=1e-6)
        np.testing.assert_allclose(hv, plain_hv, atol=1e-5)  # h and v turned back with the pixels
    predictor.net = PixelNet()  # not equivariant: the views really differ and are averaged
    assert not np.allclose(predictor.predict_maps(image[None])[1], Predictor(small_checkpoint(), device="cpu").predict_maps(image[None])[1])
    with pytest.raises(UserError, match="--tta 3"):
        Predictor(small_checkpoint(), device="cpu", tta=3)


def test_segment_image_at_another_mpp_scores_on_the_images_grid():
    """A 0.5 um/px model on a 0.25 um/px image: resampled in, maps resampled back, instances on the image's grid."""
    from wsi_ircr.metrics import aji

    rng = np.random.default_rng(0)
    centres = [(r, c) for r in range(24, 200, 44) for c in range(24, 180, 44)]
    truth = disk_labels((200, 180), [(r + rng.uniform(-4, 4), c + rng.uniform(-4, 4)) for r, c in centres], 12)
    image = np.full((200, 180, 3), (230, 190, 220), np.uint8)
    image[truth > 0] = (90, 40, 130)
    predictor = Predictor(small_checkpoint(), device="cpu")  # a 0.5 um/px checkpoint
    predictor.net = BlobNet()
    pred = predictor.segment_image(image, mpp=0.25)
    assert pred.shape == truth.shape and pred.max() == truth.max()
    assert aji(truth, pred) > 0.9
    assert predictor.segment_image(image[::2, ::2], mpp=0.5).shape == (100, 90)  # the model's own mpp: no resampling
    with pytest.raises(UserError, match="too small"):
        predictor.segment_image(image[:40, :40], mpp=0.1)


def test_resize_labels_keeps_ids_and_area():
    from wsi_ircr.model.resample import resize_labels, scaled_shape

    labels = disk_labels((100, 90), [(30, 30), (60, 60)], 12)
    small = resize_labels(labels, scaled_shape(labels.shape, 0.25, 0.5))
    assert small.shape == (50, 45) and small.dtype == np.int32 and set(np.unique(small)) == {0, 1, 2}
    assert abs((small == 1).sum() * 4 - (labels == 1).sum()) < 0.1 * (labels == 1).sum()
    np.testing.assert_array_equal(resize_labels(small, labels.shape)[::2, ::2], small)


@pytest.mark.parametrize("mpp", [None, 0, -0.25, "0.25", 84.7])
def test_checkpoint_without_a_valid_mpp_is_one_line(tmp_path, mpp):
    save_checkpoint(tmp_path / "m.pt", small_checkpoint())
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    if mpp is None:
        del payload["mpp"]
    else:
        payload["mpp"] = mpp
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(UserError, match="no valid mpp") as e:
        load_checkpoint(tmp_path / "m.pt")
    assert str(tmp_path / "m.pt") in str(e.value) and "\n" not in str(e.value)
