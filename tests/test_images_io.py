"""Reading tiles and label maps, writing label PNGs, pairing folders by stem."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_ircr.errors import UserError
from wsi_ircr.io.images import check_pair, list_images, pair_folders, read_image, read_label, write_label_png

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 40, (6, 7)).astype(np.int32)


# --- images -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.tiff"])
def test_read_image_rgb_lossless(tmp_path, name):
    path = tmp_path / name
    if name.endswith((".tif", ".tiff")):
        tifffile.imwrite(path, RGB)
    else:
        Image.fromarray(RGB).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    np.testing.assert_array_equal(out, RGB)


def test_read_image_jpeg(tmp_path):
    flat = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(flat).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - flat).max() <= 3


def test_read_image_drops_alpha_and_expands_grey(tmp_path):
    rgba = np.concatenate([RGB, np.full((6, 7, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba)
    grey = RGB[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), RGB)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), RGB)
    for name in ("grey.png", "grey.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (6, 7, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey)


def test_read_image_scales_uint16_and_unit_float(tmp_path):
    rgb16 = RGB.astype(np.uint16) * 257  # 255 -> 65535
    tifffile.imwrite(tmp_path / "a.tif", rgb16)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), RGB)
    grey16 = RGB[..., 1].astype(np.uint16) * 257
    Image.fromarray(grey16).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[..., 2], RGB[..., 1])
    tifffile.imwrite(tmp_path / "f.tif", RGB.astype(np.float32) / 255, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), RGB)


def test_read_image_planar_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), RGB)


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"broken\.png: cannot read image"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(UserError, match=r"broken\.tif: cannot read image"):
        read_image(tmp_path / "broken.tif")
    with pytest.raises(UserError, match=r"missing\.png: file not found"):
        read_image(tmp_path / "missing.png")
    tifffile.imwrite(tmp_path / "f.tif", np.full((4, 4, 3), 3.5, np.float32), photometric="rgb")
    with pytest.raises(UserError, match=r"f\.tif: unsupported pixel type RGB float32 \(4x4x3\)"):
        read_image(tmp_path / "f.tif")


# --- labels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [("l.png", np.uint16), ("l.png", np.uint8), ("l.tif", np.uint16), ("l.tif", np.int32), ("l.npy", np.int64), ("l.npy", np.uint8)],
)
def test_read_label_integer_maps(tmp_path, name, dtype):
    path = tmp_path / name
    data = LABELS.astype(dtype)
    if name.endswith(".npy"):
        np.save(path, data)
    elif name.endswith(".tif"):
        tifffile.imwrite(path, data)
    else:
        Image.fromarray(data).save(path)
    out = read_label(path)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, LABELS)


def test_read_label_rejects_rgb_with_a_useful_message(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(labels / "x.png")
    with pytest.raises(UserError) as e:
        read_label(labels / "x.png")
    msg = str(e.value)
    assert "labels/x.png: expected a 2-D integer instance map, found RGB uint8 (20x30x3)" in msg
    assert "save label maps as uint16 PNG/TIFF or .npy" in msg


@pytest.mark.parametrize(
    "data, found",
    [
        (np.zeros((5, 5), np.float32), "found float32 (5x5)"),
        (np.zeros((5, 5), bool), "found bool (5x5)"),
        (np.zeros((2, 5, 5), np.int32), "found int32 (2x5x5)"),
        (np.zeros(5, np.int32), "found int32 (5)"),
    ],
)
def test_read_label_rejects_non_instance_maps(tmp_path, data, found):
    np.save(tmp_path / "x.npy", data)
    with pytest.raises(UserError, match=r"x\.npy: expected a 2-D integer instance map, " + re.escape(found)):
        read_label(tmp_path / "x.npy")


def test_read_label_rejects_negative_ids_and_unreadable_files(tmp_path):
    np.save(tmp_path / "neg.npy", np.full((3, 3), -1, np.int16))
    with pytest.raises(UserError, match=r"neg\.npy: instance ids must be in 0\.\."):
        read_label(tmp_path / "neg.npy")
    (tmp_path / "bad.npy").write_bytes(b"nonsense")
    with pytest.raises(UserError, match=r"bad\.npy: cannot read label map"):
        read_label(tmp_path / "bad.npy")


def test_write_label_png_round_trip(tmp_path):
    labels = np.zeros((9, 11), np.int32)
    labels[1:4, 1:4] = 65535
    labels[5:8, 5:9] = 3
    write_label_png(tmp_path / "out" / "p.png", labels)
    with Image.open(tmp_path / "out" / "p.png") as img:
        assert np.array(img).dtype == np.uint16
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "p.png"), labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["p.png"]  # no temporary left


def test_write_label_png_renumbers_large_ids(tmp_path):
    labels = np.zeros((6, 6), np.int64)
    labels[0:2, 0:2] = 10**9
    labels[3:5, 3:5] = 70000
    write_label_png(tmp_path / "p.png", labels)
    out = read_label(tmp_path / "p.png")
    assert sorted(np.unique(out)) == [0, 1, 2]
    for old in (10**9, 70000):  # same partition of the pixels
        assert len(np.unique(out[labels == old])) == 1


def test_write_label_png_refuses_too_many_instances(tmp_path):
    labels = np.arange(1, 70001, dtype=np.int32).reshape(100, 700)
    with pytest.raises(UserError, match="70000 instances do not fit a uint16 PNG"):
        write_label_png(tmp_path / "p.png", labels)
    assert not any(tmp_path.iterdir())


# --- folders ------------------------------------------------------------------------


def make_folders(tmp_path: Path, image_stems, label_stems, image_ext=".png", label_ext=".png"):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for s in image_stems:
        Image.fromarray(RGB).save(images / f"{s}{image_ext}")
    for s in label_stems:
        write_label_png(labels / f"{s}{label_ext}", LABELS)
    return images, labels


def test_pair_folders_matches_stems(tmp_path):
    images, labels = make_folders(tmp_path, ["b", "a", "c"], ["a", "b", "c"])
    (images / "notes.txt").write_text("ignored")
    (images / ".hidden.png").write_bytes(b"ignored")
    (labels / "c.png").rename(labels / "c.npy")  # any supported extension
    pairs = pair_folders(images, labels)
    assert [p[0] for p in pairs] == ["a", "b", "c"]
    assert pairs[0] == ("a", images / "a.png", labels / "a.png")
    assert pairs[2][2] == labels / "c.npy"


def test_pair_folders_missing_labels_names_stems_and_count(tmp_path):
    images, labels = make_folders(tmp_path, ["a", "b", "c", "d", "e"], ["a"])
    with pytest.raises(UserError, match=r"4 image\(s\) in .*images have no label map in .*labels \(b, c, d, \.\.\. \(4 in all\)\)"):
        pair_folders(images, labels)


def test_pair_folders_labels_without_images(tmp_path):
    images, labels = make_folders(tmp_path, ["a"], ["a", "zz"])
    with pytest.raises(UserError, match=r"1 label map\(s\) in .*labels have no image in .*images \(zz\)"):
        pair_folders(images, labels)


def test_pair_folders_bad_folders(tmp_path):
    images, labels = make_folders(tmp_path, ["a"], ["a"])
    with pytest.raises(UserError, match="nowhere: images folder not found"):
        pair_folders(tmp_path / "nowhere", labels)
    with pytest.raises(UserError, match=r"a\.png: is a file, not a folder"):
        pair_folders(images, labels / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty: no images found \(expected \.png \.tif \.tiff \.jpg \.jpeg files\)"):
        pair_folders(empty, labels)


def test_pair_folders_duplicate_stems(tmp_path):
    images, labels = make_folders(tmp_path, ["a"], ["a"])
    tifffile.imwrite(images / "a.tif", RGB)
    with pytest.raises(UserError, match=r"a\.png and a\.tif share the stem 'a'"):
        pair_folders(images, labels)


def test_list_images(tmp_path):
    images, _ = make_folders(tmp_path, ["b", "a"], [])
    Image.fromarray(RGB).save(images / "c.JPG")
    assert [p.name for p in list_images(images)] == ["a.png", "b.png", "c.JPG"]
    with pytest.raises(UserError, match="no images found"):
        list_images(tmp_path / "labels")


def test_check_pair_names_both_files_and_shapes():
    paths = (Path("images/a.png"), Path("labels/a.png"))
    check_pair(RGB, LABELS, paths)
    with pytest.raises(UserError, match=r"labels/a\.png: label map is 6x6 px but images/a\.png is 6x7 px"):
        check_pair(RGB, LABELS[:, :6], paths)
