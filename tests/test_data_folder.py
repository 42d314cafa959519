"""ImageFolderSplits layouts, stratified split, error messages, corrupt files; load_image_rgb."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sds_vision.data import DataError, ImageFolderSplits, load_image_rgb


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), value: int = 0,
          fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    img.save(path, format=fmt)
    return path


def _tree(root: Path, counts: dict[str, int], ext: str = "png") -> list[Path]:
    return [_save(root / cls / f"img{i:02d}.{ext}", value=i) for cls, n in counts.items()
            for i in range(n)]


def _truncated_jpeg(path: Path) -> Path:
    _save(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------- load_image_rgb


def test_load_image_rgb_modes(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    out = load_image_rgb(tmp_path / "l.png")
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, colour kept (torchvision rule)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "rgba.png")[0, 0], (10, 20, 30))

    Image.fromarray(np.full((4, 5, 2), (200, 255), np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "la.png")[2, 3], (200, 200, 200))

    pal = Image.new("P", (5, 4))
    pal.putpalette([0, 0, 0, 7, 77, 177] + [0] * 762)
    pal.paste(1, (0, 0, 5, 4))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the palette-transparency path must not warn
        np.testing.assert_array_equal(load_image_rgb(tmp_path / "p.png")[1, 1], (7, 77, 177))

    wide = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w16.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "w16.png")[0, :, 0], (0, 128, 255))

    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = load_image_rgb(tmp_path / "cmyk.jpg")[3, 3].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


# ---------------------------------------------------------------- layouts


def test_split_layout_mixed_formats(tmp_path):
    _save(tmp_path / "train" / "cat" / "a.jpg")
    _save(tmp_path / "train" / "cat" / "b.PNG", mode="L")
    _save(tmp_path / "train" / "cat" / "sub" / "c.webp")  # nested folders are read too
    _save(tmp_path / "train" / "ant" / "a.png", mode="RGBA")
    _save(tmp_path / "train" / "ant" / "b.TIFF", fmt="TIFF")
    _save(tmp_path / "train" / "ant" / "c.bmp")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    _save(tmp_path / "train" / "ant" / ".hidden.png")
    (tmp_path / "train" / "ant" / "._a.png").write_bytes(b"AppleDouble junk")
    _save(tmp_path / "val" / "cat" / "v.jpeg")
    _save(tmp_path / "val" / "ant" / "v.png", mode="P")
    _save(tmp_path / "test" / "ant" / "t.png")

    s = ImageFolderSplits(tmp_path)
    assert s.layout == "split" and s.classes == ["ant", "cat"] and s.skipped == []
    assert [(p.name, y) for p, y in s.train] == [("a.png", 0), ("b.TIFF", 0), ("c.bmp", 0),
                                                   ("a.jpg", 1), ("b.PNG", 1), ("c.webp", 1)]
    assert [(p.name, y) for p, y in s.val] == [("v.png", 0), ("v.jpeg", 1)]
    assert [(p.name, y) for p, y in s.test] == [("t.png", 0)]
    assert s.class_to_idx == {"ant": 0, "cat": 1}
    assert "train=6" in repr(s)


def test_split_layout_without_test_and_without_val(tmp_path):
    _tree(tmp_path / "train", {"a": 5, "b": 5})
    _tree(tmp_path / "val", {"a": 1})  # a val split may lack a class
    s = ImageFolderSplits(tmp_path)
    assert s.test is None and len(s.train) == 10 and [y for _, y in s.val] == [0]

    carve = tmp_path / "carve"
    _tree(carve / "train", {"a": 5, "b": 5})
    _tree(carve / "test", {"b": 2})
    s = ImageFolderSplits(carve, val_ratio=0.4)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 4, 2)


def test_single_layout_stratified_split(tmp_path):
    files = _tree(tmp_path, {"x": 10, "y": 5, "z": 2})
    s = ImageFolderSplits(tmp_path, val_ratio=0.2, seed=0)
    assert s.layout == "single" and s.test is None and s.classes == ["x", "y", "z"]
    train, val = {p for p, _ in s.train}, {p for p, _ in s.val}
    assert train.isdisjoint(val) and train | val == set(files)
    # round(n * ratio), with at least one image on each side
    assert [sum(y == c for _, y in s.val) for c in range(3)] == [2, 1, 1]
    assert all(p.parent.name == s.classes[y] for p, y in s.train + s.val)

    again = ImageFolderSplits(tmp_path, val_ratio=0.2, seed=0)
    assert again.train == s.train and again.val == s.val
    other = ImageFolderSplits(tmp_path, val_ratio=0.2, seed=1)
    assert other.val != s.val and len(other.val) == len(s.val)
    # Pinned: the split must not depend on the machine, file system order or hash seed.
    assert [p.name for p, _ in s.val] == EXPECTED_SEED0_VAL


# x: 2 of 10, y: 1 of 5, z: 1 of 2 (random.Random("0:<class>") shuffles the sorted names)
EXPECTED_SEED0_VAL = ["img01.png", "img04.png", "img03.png", "img00.png"]


def test_split_independent_of_other_classes(tmp_path):
    _tree(tmp_path / "a", {"x": 10, "y": 6})
    _tree(tmp_path / "b", {"x": 10, "y": 6, "w": 3})
    val_a = {p.name for p, y in ImageFolderSplits(tmp_path / "a").val if y == 0}
    split_b = ImageFolderSplits(tmp_path / "b")
    assert val_a == {p.name for p, y in split_b.val if split_b.classes[y] == "x"}


def test_given_classes_fix_labels(tmp_path):
    _tree(tmp_path / "train", {"b": 2, "c": 2})
    _tree(tmp_path / "val", {"c": 1})
    s = ImageFolderSplits(tmp_path, classes=["c", "a", "b"])
    assert s.classes == ["c", "a", "b"]
    assert {(p.parent.name, y) for p, y in s.train} == {("c", 0), ("b", 2)}
    assert [y for _, y in s.val] == [0]


# ---------------------------------------------------------------- errors


def test_argument_errors(tmp_path):
    _tree(tmp_path, {"a": 3})
    for bad in (0, 0.0, 1.0, -0.1, 1.5, True, "0.2"):
        with pytest.raises(DataError, match=r"^val_ratio=.*between 0 and 1$"):
            ImageFolderSplits(tmp_path, val_ratio=bad)
    with pytest.raises(DataError, match=r"^classes=\['a', 'a'\]"):
        ImageFolderSplits(tmp_path, classes=["a", "a"])


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"/missing: data root does not exist"),
    ("empty", r"/empty: data root is empty"),
    ("loose", r"/loose: no class folders found \(images found directly"),
    ("noimages", r"/noimages/b: class folder has no images"),
    ("valonly", r"/valonly/val/zebra: class 'zebra' is not in train/$"),
    ("testonly", r"/testonly/test/zebra: class 'zebra' is not in train/$"),
    ("notrain", r"/notrain: has val/ but no train/ folder"),
    ("toosmall", r"/toosmall/b: class 'b' has 1 image\(s\), needs >= 2"),
    ("unknown", r"/unknown/val/b: class 'b' is not in the given classes"),
], ids=lambda v: v if v.isalpha() else "")
def test_structure_errors_name_the_path(tmp_path, case, pattern):
    root = tmp_path / case
    kwargs = {}
    if case == "empty":
        root.mkdir()
        (root / ".DS_Store").write_text("hidden files do not count")
    elif case == "loose":
        _save(root / "img.png")
    elif case == "noimages":
        _tree(root, {"a": 2})
        (root / "b").mkdir()
        (root / "b" / "labels.csv").write_text("x")
    elif case in ("valonly", "testonly"):
        _tree(root / "train", {"horse": 2})
        _tree(root / "val", {"horse": 1})
        _tree(root / ("val" if case == "valonly" else "test"), {"zebra": 1})
    elif case == "notrain":
        _tree(root / "val", {"a": 2})
    elif case == "toosmall":
        _tree(root, {"a": 3, "b": 1})
    elif case == "unknown":
        _tree(root / "train", {"a": 2})
        _tree(root / "val", {"a": 1, "b": 1})
        kwargs["classes"] = ["a"]
    with pytest.raises(DataError, match=pattern) as info:
        ImageFolderSplits(root, **kwargs)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_image_strict(tmp_path, kind):
    _tree(tmp_path, {"a": 3, "b": 3})
    if kind == "truncated":
        bad = _truncated_jpeg(tmp_path / "b" / "bad.jpg")
        with Image.open(bad) as img:
            img.verify()  # header-only verify() is fooled, which is why we decode
    else:
        bad = tmp_path / "b" / "bad.png"
        bad.write_bytes(b"" if kind == "empty" else b"\x89PNG\r\n\x1a\n" + b"junk" * 40)
    with pytest.raises(DataError, match=rf"^{bad}: corrupt or undecodable image \(") as info:
        ImageFolderSplits(tmp_path)
    assert "\n" not in str(info.value)


def test_skip_corrupt_reports_and_drops(tmp_path):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 2, "b": 2})
    bad = [_truncated_jpeg(tmp_path / "train" / "a" / "zz.jpg"),
           _truncated_jpeg(tmp_path / "val" / "b" / "zz.jpg")]
    with pytest.raises(DataError, match=r"\(\+1 more\)"):
        ImageFolderSplits(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 corrupt image\(s\)"):
        s = ImageFolderSplits(tmp_path, skip_corrupt=True)
    assert s.skipped == sorted(bad)
    assert (len(s.train), len(s.val)) == (6, 4)
    assert not {p for p, _ in s.train + s.val} & set(bad)

    (tmp_path / "val" / "a" / "img00.png").write_bytes(b"x")
    (tmp_path / "val" / "a" / "img01.png").write_bytes(b"x")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"/val/a: class folder has no "
                                                                    r"readable images left"):
        ImageFolderSplits(tmp_path, skip_corrupt=True)


def test_ignored_entries_are_reported_not_silently_dropped(tmp_path):
    _tree(tmp_path / "train", {"a": 2, "b": 2})
    _tree(tmp_path / "val", {"a": 1, "b": 1})
    _tree(tmp_path / "extra", {"a": 1})
    _save(tmp_path / "train" / "stray.png")
    with pytest.warns(UserWarning) as record:
        splits = ImageFolderSplits(tmp_path)
    text = " | ".join(str(w.message) for w in record)
    assert "ignoring folder(s) ['extra']" in text
    assert "ignoring 1 image(s) outside class folders, e.g. stray.png" in text
    assert len(splits.train) == 4 and len(splits.val) == 2
