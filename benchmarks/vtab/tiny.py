"""Tiny generated datasets in the exact VTAB-1k (NOAH dump) and FGVC (VPT) layouts (the
SDS-LoRA paper suite's formats: ``benchmarks/vtab/tiny_sds_paper.py``).

For tests and for smoke-testing the harness end to end without the real data:

    python -m benchmarks.vtab.tiny vtab /tmp/tiny_vtab --tasks cifar dtd
    python benchmarks/vtab/run.py --data-root /tmp/tiny_vtab --tasks cifar dtd \
        --model test_vit --no-pretrained --epochs 1 --img-size 32 --batch-size 8 --out /tmp/runs \
        --expect-sizes 8 2 10

Images are flat colours per class plus noise (so a model can learn something), written
as JPEG and PNG alternately, with varied sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_tiny_vtab", "make_tiny_fgvc", "class_image"]


def class_image(label: int, i: int, size: int = 16) -> Image.Image:
    """A noisy flat-colour RGB image whose colour depends on ``label``."""
    rng = np.random.default_rng(1000 * label + i)
    colour = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256])
    h, w = size + (i % 3), size + (i % 2) * 4
    arr = np.clip(colour + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


def make_tiny_vtab(root: str | Path, tasks: dict[str, int] | list[str],
                   sizes: tuple[int, int, int] = (8, 2, 6), image_size: int = 16) -> Path:
    """Write ``<root>/<task>/{train800,val200,train800val200,test}.txt`` + images.

    ``tasks`` maps a task folder name to how many classes to use (<= the task's count);
    a list uses min(4, classes). ``sizes`` = (train800, val200, test); train800val200 is
    written again with its own re-indexed image copies, as in the NOAH dump.
    """
    from sds_vision.data.vtab import resolve_task
    root = Path(root)
    if not isinstance(tasks, dict):
        tasks = {t: min(4, resolve_task(t).num_classes) for t in tasks}
    n_tr, n_val, n_test = sizes
    for t, n_cls in tasks.items():
        tdir = root / t
        tdir.mkdir(parents=True, exist_ok=True)
        plan = {"train800": (n_tr, 0), "val200": (n_val, n_tr),
                "train800val200": (n_tr + n_val, 0), "test": (n_test, 10_000)}
        for split, (n, offset) in plan.items():
            lines = []
            for i in range(n):
                lab = (offset + i) % n_cls
                ext = "jpg" if i % 2 == 0 else "png"
                rel = f"images/{split}/{i:06d}.{ext}"
                _save(class_image(lab, offset + i, image_size), tdir / rel)
                lines.append(f"{rel} {lab}")
            (tdir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_tiny_fgvc(root: str | Path, datasets: dict[str, int] | list[str],
                   sizes: tuple[int, int, int] = (8, 4, 6), image_size: int = 16,
                   one_based: bool = True) -> Path:
    """Write ``<root>/<dataset>/{train,val,test}.json`` + images under the dataset's
    image dir (``images/``, ``Images/`` or the folder itself); ids 1-based by default."""
    from sds_vision.data.fgvc import resolve_fgvc
    root = Path(root)
    if not isinstance(datasets, dict):
        datasets = {d: 3 for d in datasets}
    for name, n_cls in datasets.items():
        ds = resolve_fgvc(name)
        folder = root / name
        image_dir = folder / ds.image_dir if ds.image_dir else folder
        for split, n in zip(("train", "val", "test"), sizes):
            mapping = {}
            for i in range(n):
                lab = i % n_cls
                ext = "jpg" if i % 2 == 0 else "png"
                rel = f"{lab:03d}.class_{lab}/{split}_{i:04d}.{ext}"
                _save(class_image(lab, i, image_size), image_dir / rel)
                mapping[rel] = lab + int(one_based)
            (folder / f"{split}.json").write_text(json.dumps(mapping, indent=1))
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["vtab", "fgvc"], help="which layout to write")
    ap.add_argument("root", help="output data root")
    ap.add_argument("--tasks", nargs="+", default=["cifar", "dtd"], help="task/dataset names")
    ap.add_argument("--sizes", nargs=3, type=int, default=[8, 2, 6],
                    help="train / val / test sizes")
    a = ap.parse_args(argv)
    fn = make_tiny_vtab if a.kind == "vtab" else make_tiny_fgvc
    print(fn(a.root, a.tasks, tuple(a.sizes)))


if __name__ == "__main__":
    main()
