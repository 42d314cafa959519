"""Tiny generated copies of the SDS-LoRA paper suite's seven datasets, each in the on-disk
format its standard archive unpacks to (what torchvision's readers and the small readers in
``sds_vision/data/sds_paper.py`` expect): CIFAR-100's python pickles, Food-101's JSON
lists, DTD's partition files, Stanford Cars' ``.mat`` annotations (needs scipy), SUN397's
class list and partition 01, CUB-200-2011's id tables and RESISC45's class folders with
torchgeo's split lists.

    python -m benchmarks.vtab.tiny_sds_paper /tmp/tiny_paper [--datasets dtd cub200]
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from benchmarks.vtab.tiny import _save, class_image

__all__ = ["make_tiny_sds_paper", "TINY_WRITERS"]


def _split_images(n_cls: int, per_class: tuple[int, int]):
    """(split, index, label) for every tiny image: train first, then test."""
    i = 0
    for split, n in zip(("train", "test"), per_class):
        for k in range(n * n_cls):
            yield split, i, k % n_cls
            i += 1


def write_cifar100(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for split, i, lab in _split_images(n_cls, per_class):
        img = np.asarray(class_image(lab, i, 32).resize((32, 32)), dtype=np.uint8)
        rows[split][0].append(img.transpose(2, 0, 1).reshape(-1))  # R plane, G, B: 3072 bytes
        rows[split][1].append(lab)
    for split, (data, labels) in rows.items():
        entry = {"filenames": [f"{split}_{k}.png" for k in range(len(labels))],
                 "batch_label": f"{split} batch", "fine_labels": labels,
                 "coarse_labels": [0] * len(labels), "data": np.stack(data)}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class_{k}" for k in range(100)],
            "coarse_label_names": [f"super_{k}" for k in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_food101(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    base = root / "food-101"
    lists: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for split, i, lab in _split_images(n_cls, per_class):
        cls = f"dish_{lab}"
        _save(class_image(lab, i, size), base / "images" / cls / f"{100000 + i}.jpg")
        lists[split].setdefault(cls, []).append(f"{cls}/{100000 + i}")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split, obj in lists.items():  # one line, like the official files
        (base / "meta" / f"{split}.json").write_text(json.dumps(obj))


def write_dtd(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    data = root / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for split, i, lab in _split_images(n_cls, per_class):
        cls = f"texture{lab}"
        name = f"{cls}_{i:04d}.jpg"
        _save(class_image(lab, i, size), data / "images" / cls / name)
        part = "test1" if split == "test" else ("train1" if i % 2 == 0 else "val1")
        lines[part].append(f"{cls}/{name}")
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for part, ls in lines.items():
        (data / "labels" / f"{part}.txt").write_text("\n".join(ls) + "\n")


def write_stanford_cars(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    from scipy.io import savemat  # only this writer needs scipy (as torchvision's reader does)
    base = root / "stanford_cars"
    annos: dict[str, list] = {"train": [], "test": []}
    for split, i, lab in _split_images(n_cls, per_class):
        fname = f"{i + 1:05d}.jpg"
        _save(class_image(lab, i, size), base / f"cars_{split}" / fname)
        annos[split].append((1, 1, size, size, lab + 1, fname))  # classes are 1-based
    dtype = [(f, object) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_train_annos.mat",
            {"annotations": np.array(annos["train"], dtype=dtype).reshape(1, -1)})
    savemat(base / "cars_test_annos_withlabels.mat",
            {"annotations": np.array(annos["test"], dtype=dtype).reshape(1, -1)})
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Make Model {k}" for k in range(196)]
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})


def write_sun397(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    data = root / "SUN397"
    classes = [f"/{c[0]}/{c}" for c in ("abbey", "badlands", "canyon", "dock")[:n_cls - 1]]
    classes.append("/a/apartment_building/outdoor")  # SUN397 nests some classes one level more
    classes.sort()
    parts: dict[str, list[str]] = {"train": [], "test": []}
    for split, i, lab in _split_images(n_cls, per_class):
        rel = f"{classes[lab]}/sun_{i:016x}.jpg"
        _save(class_image(lab, i, size), data / rel.lstrip("/"))
        parts[split].append(rel)
    data.mkdir(parents=True, exist_ok=True)
    (data / "ClassName.txt").write_text("\n".join(classes) + "\n")
    (data / "Partitions").mkdir(exist_ok=True)
    (data / "Partitions" / "Training_01.txt").write_text("\n".join(parts["train"]) + "\n")
    (data / "Partitions" / "Testing_01.txt").write_text("\n".join(parts["test"]) + "\n")


def write_cub200(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    base = root / "CUB_200_2011"
    images, labels, flags = [], [], []
    for split, i, lab in _split_images(n_cls, per_class):
        rel = f"{lab + 1:03d}.Bird_{lab}/Bird_{lab}_{i:04d}.jpg"
        _save(class_image(lab, i, size), base / "images" / rel)
        images.append(f"{i + 1} {rel}")
        labels.append(f"{i + 1} {lab + 1}")
        flags.append(f"{i + 1} {int(split == 'train')}")
    for name, ls in (("images.txt", images), ("image_class_labels.txt", labels),
                     ("train_test_split.txt", flags),
                     ("classes.txt", [f"{k + 1} {k + 1:03d}.Bird_{k}" for k in range(n_cls)])):
        (base / name).write_text("\n".join(ls) + "\n")


def write_resisc45(root: Path, n_cls: int, per_class: tuple[int, int], size: int) -> None:
    base = root / "NWPU-RESISC45"
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, i, lab in _split_images(n_cls, per_class):
        cls = ("airplane", "beach", "sea_ice", "wetland")[lab % 4] + ("" if lab < 4 else str(lab))
        name = f"{cls}_{i + 1:03d}.jpg"
        _save(class_image(lab, i, size), base / cls / name)
        lists[split].append(name)
    for split, names in lists.items():
        (root / f"resisc45-{split}.txt").write_text("\n".join(names) + "\n")


TINY_WRITERS = {
    "cifar100": write_cifar100, "resisc45": write_resisc45, "food101": write_food101,
    "dtd": write_dtd, "cub200": write_cub200, "stanford_cars": write_stanford_cars,
    "sun397": write_sun397,
}


def make_tiny_sds_paper(root: str | Path, datasets: list[str] | None = None, n_cls: int = 3,
                        per_class: tuple[int, int] = (2, 1), image_size: int = 16) -> Path:
    """Write tiny copies of ``datasets`` (default all seven) under ``root``: ``n_cls``
    classes with ``per_class`` = (train, test) images each."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in datasets or list(TINY_WRITERS):
        TINY_WRITERS[name](root, n_cls, per_class, image_size)
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="output data root")
    ap.add_argument("--datasets", nargs="+", choices=list(TINY_WRITERS), default=None,
                    help="datasets to write (default: all seven)")
    a = ap.parse_args(argv)
    print(make_tiny_sds_paper(a.root, a.datasets))


if __name__ == "__main__":
    main()
