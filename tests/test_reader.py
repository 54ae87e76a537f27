"""SlideReader implementations, error messages, and resampling to a target mpp."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from synthetic_slides import pyramid_levels, synthetic_he, write_aperio_svs, write_pyramidal_tiff
from wsi_ircr.cli import main
from wsi_ircr.errors import UserError
from wsi_ircr.slide import reader as reader_mod
from wsi_ircr.slide.reader import (
    ArrayReader,
    SlideReader,
    best_level_for_scale,
    open_slide,
    read_at_mpp,
    require_mpp,
)


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    return synthetic_he((300, 420), 40, seed=1)[0]


@pytest.fixture(scope="module")
def deflate_tiff(tmp_path_factory, he_image):
    path = tmp_path_factory.mktemp("slides") / "synthetic.tiff"
    return write_pyramidal_tiff(path, he_image, mpp=0.25, n_levels=3, tile=128, compression="deflate")


def _dot_image(shape_rc, dots_rc) -> np.ndarray:
    image = np.full((*shape_rc, 3), 255, np.uint8)
    for r, c in dots_rc:
        image[r, c] = 0
    return image


def _darkness_centroid_rc(image: np.ndarray) -> np.ndarray:
    """Centroid of (255 - mean channel) in pixel-corner coordinates (centre of (r, c) = r+.5, c+.5)."""
    ink = 255.0 - image.astype(np.float64).mean(axis=2)
    rr, cc = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(ink * (rr + 0.5)).sum(), (ink * (cc + 0.5)).sum()]) / ink.sum()


class LevelSpy:
    """Wraps a reader and records the levels read."""

    def __init__(self, inner):
        self.inner = inner
        self.levels = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_region(self, location_xy, level, size_xy):
        self.levels.append(level)
        return self.inner.read_region(location_xy, level, size_xy)


# --- ArrayReader -----------------------------------------------------------------------


def test_array_reader_levels_and_white_outside(he_image):
    r = ArrayReader(he_image, mpp=0.25, n_levels=3)
    assert isinstance(r, SlideReader)
    assert r.dimensions_xy == (420, 300)
    assert r.level_dimensions_xy == ((420, 300), (210, 150), (105, 75))
    assert r.level_downsamples == (1.0, 2.0, 4.0)
    np.testing.assert_array_equal(r.read_region((10, 20), 0, (5, 4)), he_image[20:24, 10:15])
    out = r.read_region((-3, 298), 0, (6, 4))
    assert out.shape == (4, 6, 3)
    assert (out[:, :3] == 255).all() and (out[2:] == 255).all()
    np.testing.assert_array_equal(out[:2, 3:], he_image[298:300, 0:3])


def test_array_reader_requires_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        ArrayReader(np.zeros((4, 4), np.float32), mpp=0.5)


def test_thumbnail_shape_and_content(he_image):
    r = ArrayReader(he_image, mpp=0.25, n_levels=2)
    thumb = r.thumbnail(105)
    assert thumb.shape == (75, 105, 3)
    expected = pyramid_levels(he_image, 3)[2].astype(int)
    assert np.abs(thumb.astype(int) - expected).max() <= 1
    assert r.thumbnail(10_000).shape == he_image.shape  # never upscaled


# --- read_at_mpp -------------------------------------------------------------------------


def test_same_mpp_is_a_plain_read(he_image):
    r = ArrayReader(he_image, mpp=0.25)
    out = read_at_mpp(r, (17.0, 9.0), (64, 80), 0.25)
    np.testing.assert_array_equal(out, he_image[9:73, 17:97])


@pytest.mark.parametrize(
    ("target_mpp", "level", "resampled"),
    [(0.25, 0, False), (0.5, 1, False), (1.0, 2, False), (0.7, 1, True), (0.2, 0, True), (0.504, 1, True)],
)
def test_level_choice_never_upsamples_a_coarse_level(he_image, target_mpp, level, resampled):
    spy = LevelSpy(ArrayReader(he_image, mpp=0.25, n_levels=3))
    out = read_at_mpp(spy, (0.0, 0.0), (20, 24), target_mpp)
    assert out.shape == (20, 24, 3)
    assert spy.levels == [level]
    if not resampled:
        np.testing.assert_array_equal(out, pyramid_levels(he_image, 3)[level][:20, :24])


@pytest.mark.parametrize("factor", [2.0, 0.5, 3.0, 1 / 3, 1.37])
@pytest.mark.parametrize("origin_xy", [(0.0, 0.0), (7.0, 5.0), (6.5, 3.25)])
def test_feature_lands_at_expected_output_pixel(factor, origin_xy):
    """A dark level-0 pixel (x, y) appears centred at ((y + .5 - y0) / s, (x + .5 - x0) / s):
    exactly when upsampling (bilinear), within half an output pixel when area-averaging."""
    x, y = 23, 17
    r = ArrayReader(_dot_image((48, 64), [(y, x)]), mpp=0.5)
    target_mpp = 0.5 * factor
    size_rc = (int(40 / factor), int(56 / factor))
    out = read_at_mpp(r, origin_xy, size_rc, target_mpp)
    expected_rc = np.array([y + 0.5 - origin_xy[1], x + 0.5 - origin_xy[0]]) / factor
    centroid = _darkness_centroid_rc(out)
    np.testing.assert_allclose(centroid, expected_rc, atol=0.02 if factor < 1 else 0.5 + 1e-9)
    peak = np.unravel_index(np.argmin(out[..., 0]), out.shape[:2])
    assert np.all(np.abs(np.array(peak) + 0.5 - expected_rc) <= 0.5 + 1e-9)


def test_two_times_down_and_up_exact_values():
    """2x down: output (r, c) averages level-0 rows 2r..2r+1, cols 2c..2c+1; 2x up: pixel
    (y, x) becomes the 2x2 output block (2y..2y+1, 2x..2x+1), each 3/4 of the way to black
    (bilinear at the block's pixel centres, a quarter pixel from the source centre)."""
    x, y = 9, 6
    r = ArrayReader(_dot_image((16, 20), [(y, x)]), mpp=0.5)
    down = read_at_mpp(r, (0.0, 0.0), (8, 10), 1.0)[..., 0].astype(int)
    assert down[y // 2, x // 2] == round(255 * 3 / 4)
    assert (np.delete(down.ravel(), (y // 2) * 10 + x // 2) == 255).all()
    up = read_at_mpp(r, (0.0, 0.0), (32, 40), 0.25)[..., 0].astype(int)
    block = up[2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
    assert (block == block[0, 0]).all() and up.min() == block[0, 0]
    assert block[0, 0] == round(255 - 255 * 0.75 * 0.75)


def test_outside_slide_is_white(he_image):
    r = ArrayReader(he_image, mpp=0.25)
    out = read_at_mpp(r, (-40.0, -40.0), (40, 40), 0.5)
    assert out.shape == (40, 40, 3)
    assert (out[:19, :] == 255).all() and (out[:, :19] == 255).all()
    assert (out[21:, 21:] != 255).any()


def test_blocked_reads_equal_single_read(he_image, monkeypatch):
    r = ArrayReader(he_image, mpp=0.25, n_levels=2)
    whole = read_at_mpp(r, (3.5, 1.25), (100, 130), 0.61)
    monkeypatch.setattr(reader_mod, "MAX_READ_PX", 37)
    np.testing.assert_array_equal(read_at_mpp(r, (3.5, 1.25), (100, 130), 0.61), whole)


def test_best_level_for_scale_tolerance():
    r = ArrayReader(np.zeros((64, 64, 3), np.uint8), mpp=0.25, n_levels=3)
    assert best_level_for_scale(r, 0.5) == 0
    assert best_level_for_scale(r, 1.985) == 1  # within 1% of level 1
    assert best_level_for_scale(r, 1.97) == 0
    assert best_level_for_scale(r, 100.0) == 2


def test_require_mpp():
    r = ArrayReader(np.zeros((8, 8, 3), np.uint8), mpp=None, path="/data/slide.svs")
    with pytest.raises(UserError, match=r"slide.svs has no mpp metadata; pass --mpp 0.25"):
        require_mpp(r)
    with pytest.raises(UserError, match="no mpp metadata"):
        read_at_mpp(r, (0.0, 0.0), (4, 4), 0.5)
    assert require_mpp(ArrayReader(np.zeros((8, 8, 3), np.uint8), mpp=0.3)) == 0.3


def test_array_fingerprint_depends_on_pixels_not_path(he_image):
    a = ArrayReader(he_image, mpp=0.25, path="a.npy").fingerprint()
    assert a == ArrayReader(he_image.copy(), mpp=0.25, path="elsewhere/b.npy").fingerprint()
    changed = he_image.copy()
    changed[0, 0, 0] ^= 1
    assert a != ArrayReader(changed, mpp=0.25).fingerprint()


# --- metadata parsing --------------------------------------------------------------------


def test_mpp_from_properties_sources(caplog):
    parse = reader_mod._mpp_from_properties
    assert parse({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}, "s") == (0.5, "metadata: openslide.mpp-x")
    mpp, _ = parse({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}, "s")
    assert mpp == pytest.approx(0.26) and "differs" in caplog.text
    tiff_cm = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}
    assert parse(tiff_cm, "s") == (pytest.approx(0.25), "tiff resolution")
    tiff_inch = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800", "tiff.YResolution": "50800"}
    assert parse(tiff_inch, "s")[0] == pytest.approx(0.5)
    mpp, source = parse({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72", "tiff.YResolution": "72"}, "s")
    assert mpp is None and source.startswith("none: ignored implausible")
    assert parse({}, "s") == (None, "none")


def test_composite_on_white():
    rgba = np.array([[[0, 0, 0, 255], [0, 0, 0, 0], [100, 50, 0, 128]]], np.uint8)
    out = reader_mod._composite_on_white(rgba)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 2], [177, 152, 127])


# --- OpenSlide ---------------------------------------------------------------------------


@pytest.mark.openslide
def test_openslide_generic_tiff_matches_array_reader(deflate_tiff, he_image):
    with open_slide(deflate_tiff) as r:
        assert r.vendor == "generic-tiff"
        assert r.mpp == pytest.approx(0.25) and r.mpp_source == "metadata: openslide.mpp-x"
        assert r.level_dimensions_xy == ((420, 300), (210, 150), (105, 75))
        ref = ArrayReader(he_image, mpp=r.mpp, n_levels=3)
        for target_mpp, origin in [(0.25, (5.0, 7.0)), (0.5, (-6.0, 4.0)), (0.8, (10.3, 2.7)), (0.125, (100.0, 50.0))]:
            np.testing.assert_array_equal(
                read_at_mpp(r, origin, (30, 40), target_mpp), read_at_mpp(ref, origin, (30, 40), target_mpp)
            )
        outside = r.read_region((400, 290), 0, (40, 20))
        assert (outside[10:, :] == 255).all() and (outside[:, 20:] == 255).all()


@pytest.mark.openslide
def test_openslide_synthetic_aperio_and_jpeg_tiff(tmp_path, he_image):
    svs = write_aperio_svs(tmp_path / "a.svs", he_image, mpp=0.499, n_levels=2, tile=128)
    with open_slide(svs) as r:
        assert r.vendor == "aperio" and r.objective_power == 20
        assert r.mpp == pytest.approx(0.499)
        assert "thumbnail" in r.associated_images
        diff = np.abs(r.read_region((0, 0), 0, (420, 300)).astype(int) - he_image)
        assert diff.mean() < 4
    tif = write_pyramidal_tiff(tmp_path / "j.tiff", he_image, mpp=0.5, tile=128)
    with open_slide(tif) as r:
        assert r.mpp == pytest.approx(0.5)
        diff = np.abs(r.read_region((0, 0), 1, (210, 150)).astype(int) - pyramid_levels(he_image, 2)[1])
        assert diff.mean() < 4


@pytest.mark.openslide
@pytest.mark.shared
def test_openslide_real_svs_metadata(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as r:
        assert r.vendor == "aperio"
        assert r.dimensions_xy == (2220, 2967)
        assert r.mpp == pytest.approx(0.499) and r.mpp_source == "metadata: openslide.mpp-x"
        assert r.objective_power == 20
        assert set(r.associated_images) == {"label", "macro", "thumbnail"}
        tile = read_at_mpp(r, (1000.0, 1000.0), (64, 64), 0.25)
        assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    with open_slide(shared_slides / "cmu-1-small-region.svs", mpp=0.5) as r:
        assert r.mpp == 0.5 and r.mpp_source == "override"


@pytest.mark.openslide
@pytest.mark.shared
def test_placeholder_tiff_resolution_is_no_mpp(shared_slides):
    with open_slide(shared_slides / "boxes.tiff") as r:
        assert r.mpp is None and "implausible" in r.mpp_source
        with pytest.raises(UserError, match=r"boxes.tiff has no mpp metadata .*pass --mpp 0.25"):
            require_mpp(r)


@pytest.mark.openslide
@pytest.mark.shared
def test_fingerprint_ignores_name_and_is_pickled(shared_slides, tmp_path):
    src = shared_slides / "cmu-1-small-region.svs"
    copy = shutil.copy(src, tmp_path / "renamed.svs")
    with open_slide(src) as a, open_slide(copy) as b, open_slide(shared_slides / "small.svs") as c:
        assert a.fingerprint() == b.fingerprint() != c.fingerprint()
        clone = pickle.loads(pickle.dumps(b))
        assert clone.fingerprint() == b.fingerprint()
        np.testing.assert_array_equal(clone.read_region((5, 5), 0, (8, 8)), b.read_region((5, 5), 0, (8, 8)))
        clone.close()


@pytest.mark.openslide
@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("small_dicom.dcm", "OpenSlide recognises a dicom slide but cannot open it"),
        ("missing.svs", "no such file"),
        (".", "is a directory"),
    ],
)
def test_unreadable_inputs_are_user_errors(shared_slides, name, message):
    with pytest.raises(UserError, match=message) as info:
        open_slide(shared_slides / name)
    assert "\n" not in str(info.value)


@pytest.mark.openslide
def test_not_a_slide_and_bad_mpp(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(UserError, match="notes.txt: not a whole-slide image format"):
        open_slide(txt)
    with pytest.raises(UserError, match="--mpp -1 is not a positive number"):
        open_slide(txt, mpp=-1)


@pytest.mark.openslide
@pytest.mark.shared
def test_truncated_and_corrupt_copies(shared_slides, tmp_path):
    data = (shared_slides / "cmu-1-small-region.svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.svs: a TIFF file that OpenSlide cannot read"):
        open_slide(truncated)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(data[:400_000] + bytes(500_000) + data[900_000:])
    with open_slide(corrupt) as r:  # the tiles that cannot be decoded are left white and recorded
        region = r.read_region((0, 2000), 0, (2220, 500))
        assert r.unreadable_xywh and all(w <= 240 and h <= 240 for _, _, w, h in r.unreadable_xywh)
        x, y, w, h = min(r.unreadable_xywh)
        assert (region[max(y - 2000, 0):y + h - 2000, x:x + w] == 255).all()


# --- wsi-ircr info -----------------------------------------------------------------------


def _run_cli(args, capsys) -> tuple[int, str, str]:
    """Run ``wsi_ircr.cli.main`` in-process: (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.openslide
@pytest.mark.shared
def test_info_text(shared_slides, capsys):
    code, out, err = _run_cli(["info", str(shared_slides / "cmu-1-small-region.svs")], capsys)
    assert code == 0 and err == ""
    assert "vendor:      aperio" in out
    assert "mpp:         0.499 um/px (metadata: openslide.mpp-x)" in out
    assert "objective:   20x" in out
    assert "0: 2220 x 2967  downsample 1  mpp 0.499" in out
    assert "associated:  label, macro, thumbnail" in out


@pytest.mark.openslide
@pytest.mark.shared
def test_info_json_with_override(shared_slides, capsys):
    code, out, _ = _run_cli(["info", str(shared_slides / "boxes.tiff"), "--json", "--mpp", "0.5"], capsys)
    d = json.loads(out)
    assert code == 0 and d["vendor"] == "generic-tiff"
    assert d["mpp"] == 0.5 and d["mpp_source"] == "override"
    assert [lv["dimensions_xy"] for lv in d["levels"]] == [[300, 250], [150, 125], [75, 62], [37, 31]]
    assert d["levels"][1]["mpp"] == pytest.approx(1.0)
    assert len(d["fingerprint"]) == 32


@pytest.mark.openslide
@pytest.mark.shared
def test_info_placeholder_resolution_is_unknown_mpp(shared_slides, capsys):
    code, out, _ = _run_cli(["info", str(shared_slides / "boxes.tiff")], capsys)
    assert code == 0 and "mpp:         unknown (ignored implausible openslide.mpp-x" in out
    assert "; pass --mpp" in out


@pytest.mark.openslide
@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "message"),
    [("small_dicom.dcm", "cannot open it"), (".", "is a directory"), ("missing.svs", "no such file")],
)
def test_info_bad_inputs_are_one_line_errors(shared_slides, capsys, name, message):
    code, out, err = _run_cli(["info", str(shared_slides / name)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.openslide
@pytest.mark.shared
def test_info_entry_point_has_no_traceback(shared_slides):
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_ircr", "info", str(shared_slides / "small_dicom.dcm")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert "small_dicom.dcm" in proc.stderr
