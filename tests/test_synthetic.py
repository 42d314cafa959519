"""Synthetic shape tasks: byte-identical, balanced, cached, readable by ImageFolderSplits."""

from __future__ import annotations

import numpy as np
import pytest

from sds_vision.data import (
    TASKS,
    DataError,
    ImageFolderSplits,
    generate_task,
    load_image_rgb,
    make_demo_data,
)
from sds_vision.data.synthetic import SOURCE_TASK, TARGET_TASKS


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tasks_table():
    assert SOURCE_TASK in TASKS and len(TARGET_TASKS) >= 2
    assert set(TARGET_TASKS) | {SOURCE_TASK} == set(TASKS)
    for classes in TASKS.values():
        assert list(classes) == sorted(classes) and len(classes) >= 3


def test_make_demo_data_identical_bytes_and_balanced(tmp_path):
    a = make_demo_data(tmp_path / "a", n_train_per_class=3, n_val_per_class=2, img_size=16, seed=0)
    make_demo_data(tmp_path / "b", n_train_per_class=3, n_val_per_class=2, img_size=16, seed=0)
    assert set(a) == set(TASKS)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == len(TASKS) * 4 * (3 + 2) + 2 * len(TASKS)  # + .complete markers
    assert files_a == files_b
    assert not any(p.name.startswith(".") and p.is_dir() for p in (tmp_path / "a").rglob("*"))

    c = make_demo_data(tmp_path / "c", 3, 2, 16, seed=1)
    assert _files(c["count"] / "train") != _files(a["count"] / "train")

    for task, root in a.items():
        splits = ImageFolderSplits(root)
        assert splits.classes == list(TASKS[task])
        for samples, n in ((splits.train, 3), (splits.val, 2)):
            labels = np.bincount([y for _, y in samples], minlength=len(TASKS[task]))
            assert labels.tolist() == [n] * len(TASKS[task])
        img = load_image_rgb(splits.train[0][0])
        assert img.shape == (16, 16, 3) and img.std() > 5
        # train and val are different draws, not copies
        assert splits.train[0][0].read_bytes() != splits.val[0][0].read_bytes()


def test_images_differ_within_and_across_classes(tmp_path):
    root = generate_task(tmp_path, "orientation", n_per_class=4, img_size=32)
    imgs = [load_image_rgb(root / cls / f"{i}.png") for cls in TASKS["orientation"]
            for i in range(4)]
    assert len({im.tobytes() for im in imgs}) == len(imgs)


def test_cache_and_regeneration(tmp_path):
    out = generate_task(tmp_path, "texture", n_per_class=2, img_size=16, seed=0)
    assert out == tmp_path / "texture" / "train" and (out / ".complete").is_file()
    first = out / "dots" / "0.png"
    stamp = first.stat().st_mtime_ns
    generate_task(tmp_path, "texture", n_per_class=2, img_size=16, seed=0)
    assert first.stat().st_mtime_ns == stamp  # cached: not rewritten

    # Per-image seeding: growing the set keeps existing files byte-identical.
    old = first.read_bytes()
    generate_task(tmp_path, "texture", n_per_class=3, img_size=16, seed=0)
    assert sorted(p.name for p in (out / "dots").iterdir()) == ["0.png", "1.png", "2.png"]
    assert first.read_bytes() == old

    # A half-written split (marker missing) is regenerated, not trusted.
    (out / ".complete").unlink()
    (out / "dots" / "0.png").write_bytes(b"partial")
    generate_task(tmp_path, "texture", n_per_class=3, img_size=16, seed=0)
    assert first.read_bytes() == old


def test_argument_errors(tmp_path):
    with pytest.raises(DataError, match=r"^task='nope': unknown"):
        generate_task(tmp_path, "nope", 2)
    with pytest.raises(DataError, match=r"^split='test'"):
        generate_task(tmp_path, "shapes", 2, split="test")
    with pytest.raises(DataError, match=r"^n_per_class=0"):
        generate_task(tmp_path, "shapes", 0)
