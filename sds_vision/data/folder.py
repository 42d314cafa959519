"""Image-folder datasets: scan, verify and split ``root/<class>/*`` style trees.

Two layouts are recognised:

* ``root/train/<class>/*``, ``root/val/<class>/*`` and optionally ``root/test/<class>/*``
  (if ``val/`` is absent, val is carved out of ``train/`` as in the single layout);
* ``root/<class>/*``, split into train/val per class by a seeded ratio.

Every image is decoded once at construction, so a corrupt file fails here, naming the
file, instead of hours into training inside a DataLoader worker.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError

__all__ = ["DataError", "IMG_EXTENSIONS", "ImageFolderSplits", "check_output_outside",
           "load_image_rgb"]

IMG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
SPLIT_DIRS = ("train", "val", "test")

Sample = tuple[Path, int]


class DataError(UserError):
    """A data root, image or argument is unusable; the message is one line naming it."""


def check_output_outside(data: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse an output folder inside the data folder (its files would turn into a class
    folder of the next scan) and a data folder inside the output folder (``--overwrite``
    or a cleanup would reach the data). Reads nothing, creates nothing."""
    d, o = Path(data).resolve(), Path(out).resolve()
    if o == d or d in o.parents:
        raise DataError(f"--out {out} is inside --data {data}: the run's files would become "
                        "part of the data; put the run folder elsewhere")
    if o in d.parents:
        raise DataError(f"--data {data} is inside --out {out}: pick a run folder that does "
                        "not contain the data")


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``HxWx3`` uint8 RGB array.

    Handles L/LA/P/RGBA/CMYK and 16/32-bit integer or float greyscale. Alpha is dropped
    (not composited), matching timm's and torchvision's ``convert("RGB")`` loaders so
    numbers agree with their pipelines.

    Args:
        path: Image file.

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype uint8.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return _wide_grey_to_rgb(np.asarray(img), img.mode)
        if img.mode == "P":
            # Palette transparency must go through RGBA, else PIL warns on every image.
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _wide_grey_to_rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit / int32 / float greyscale to uint8 RGB; PIL's own convert clips at 255."""
    arr = arr.astype(np.float64)
    if mode == "F":
        top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
    else:
        # 16-bit PNG/TIFF open as "I" or "I;16*"; a mode "I" image within 0..255 is 8-bit data.
        top = 255.0 if mode == "I" and arr.size and float(arr.max()) <= 255 else 65535.0
    grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMG_EXTENSIONS:
                found.append(Path(dirpath) / name)
    # Sort on the relative POSIX path so the order (and hence the seeded split) is the
    # same on every machine and file system.
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not _is_hidden(p.name)}


def _scan_split(folder: Path) -> dict[str, list[Path]]:
    """``{class_name: sorted image paths}`` for one split folder; errors on empty input."""
    dirs = _class_dirs(folder)
    if not dirs:
        loose = [p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
        hint = " (images found directly in it; expected <class>/ sub-folders)" if loose else ""
        raise DataError(f"{folder}: no class folders found{hint}")
    loose = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if loose:  # reported, never silently dropped
        warnings.warn(f"{folder}: ignoring {len(loose)} image(s) outside class folders, e.g. "
                      f"{loose[0]}", stacklevel=4)
    files = {}
    for name, path in dirs.items():
        files[name] = _list_images(path)
        if not files[name]:
            exts = "/".join(sorted(IMG_EXTENSIONS))
            raise DataError(f"{path}: class folder has no images ({exts})")
    return files


def _decode_error(path: Path) -> str | None:
    """None if ``path`` decodes fully, else a one-line reason."""
    try:
        # verify() only checks headers/CRCs; a truncated JPEG passes it. Decode for real.
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    return None


def _find_corrupt(paths: Sequence[Path]) -> dict[Path, str]:
    """Decode ``paths`` in a thread pool (PIL releases the GIL); progress only after 2 s."""
    bad: dict[Path, str] = {}
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), desc="verifying images",
                                            unit="img", delay=2.0, leave=False) as bar:
        for path, err in zip(paths, pool.map(_decode_error, paths)):
            bar.update()
            if err is not None:
                bad[path] = err
    return bad


def _stratified_split(files: dict[str, list[Path]], val_ratio: float, seed: int, base: Path
                      ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    train, val = {}, {}
    for name, paths in files.items():
        if len(paths) < 2:
            raise DataError(f"{base / name}: class {name!r} has {len(paths)} image(s), "
                            "needs >= 2 to split into train/val")
        # One RNG per class, seeded by (seed, class name): adding or removing a class does
        # not reshuffle the others. str seeds hash via SHA-512, so no PYTHONHASHSEED effect.
        rng = random.Random(f"{seed}:{name}")
        order = list(paths)
        rng.shuffle(order)
        n_val = min(max(math.floor(len(paths) * val_ratio + 0.5), 1), len(paths) - 1)
        val[name] = sorted(order[:n_val])
        train[name] = sorted(order[n_val:])
    return train, val


class ImageFolderSplits:
    """Train/val(/test) sample lists for an image-folder data root.

    Args:
        root: Data root, in either layout described in the module docstring.
        val_ratio: Fraction of each class held out for val when val is carved from train;
            must lie in (0, 1). Each class keeps >= 1 image on either side.
        seed: Seed of the stratified split; same seed -> same split on any machine.
        skip_corrupt: Drop undecodable images (listed in ``.skipped``, one warning)
            instead of raising.
        classes: Fixed class list (e.g. from a saved run). Labels are indices into it and
            a folder naming any other class is an error. Default: sorted train folders.

    Attributes:
        classes: Class names; label ``i`` is ``classes[i]``.
        train, val: Lists of ``(path, label)``, sorted by label then path.
        test: Same for ``root/test`` or None.
        skipped: Corrupt files dropped (``skip_corrupt=True`` only).
        layout: ``"split"`` (train/ val/ folders) or ``"single"`` (one class tree).

    Raises:
        DataError: One line naming the offending path or argument.
    """

    def __init__(self, root: str | os.PathLike, val_ratio: float = 0.2, seed: int = 0,
                 skip_corrupt: bool = False, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not isinstance(val_ratio, (int, float)) or isinstance(val_ratio, bool) \
                or not 0.0 < val_ratio < 1.0:
            raise DataError(f"val_ratio={val_ratio!r}: must lie strictly between 0 and 1")
        if classes is not None:
            classes = list(classes)
            if not classes or len(set(classes)) != len(classes):
                raise DataError(f"classes={classes!r}: must be a non-empty list of unique names")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root does not exist or is not a directory")

        raw = self._scan()
        # Cheap structural checks first; decoding every image comes last.
        self.classes: list[str] = classes if classes is not None else sorted(raw["train"])
        for split, files in raw.items():
            for name in files.keys() - set(self.classes):
                known = "the given classes" if classes is not None else "train/"
                raise DataError(f"{self._dirs[split] / name}: class {name!r} is not in {known}")
        self.skipped: list[Path] = self._drop_corrupt(raw, skip_corrupt)
        if "val" not in raw:
            raw["train"], raw["val"] = _stratified_split(raw["train"], val_ratio, seed,
                                                         self._dirs["train"])
        self.train = self._label(raw["train"])
        self.val = self._label(raw["val"])
        self.test = self._label(raw["test"]) if "test" in raw else None

    def _scan(self) -> dict[str, dict[str, list[Path]]]:
        """``{split: {class: paths}}``; sets ``self.layout`` and ``self._dirs``."""
        if not any(not _is_hidden(p.name) for p in self.root.iterdir()):
            raise DataError(f"{self.root}: data root is empty")
        present = [s for s in SPLIT_DIRS if (self.root / s).is_dir()]
        if not present:
            self.layout = "single"
            self._dirs = {"train": self.root}
        elif "train" not in present:
            raise DataError(f"{self.root}: has {'/ '.join(present)}/ but no train/ folder")
        else:
            self.layout = "split"
            self._dirs = {s: self.root / s for s in present}
            extra = sorted(p.name for p in self.root.iterdir()
                           if p.is_dir() and not _is_hidden(p.name) and p.name not in SPLIT_DIRS)
            if extra:
                warnings.warn(f"{self.root}: ignoring folder(s) {extra} beside "
                              f"{'/'.join(present)}/ (the split layout reads only those)",
                              stacklevel=3)
        return {split: _scan_split(folder) for split, folder in self._dirs.items()}

    def _drop_corrupt(self, raw: dict[str, dict[str, list[Path]]], skip: bool) -> list[Path]:
        """Decode every image; raise on the first corrupt one, or drop them all if ``skip``."""
        bad = _find_corrupt([p for files in raw.values() for ps in files.values() for p in ps])
        if not bad:
            return []
        if not skip:
            path, err = min(bad.items())
            more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{path}: corrupt or undecodable image ({err}){more}; "
                            "pass skip_corrupt=True (--skip-corrupt) to drop such files")
        warnings.warn(f"{self.root}: skipped {len(bad)} corrupt image(s), e.g. {min(bad)}",
                      stacklevel=3)
        for split, files in raw.items():
            for name, paths in files.items():
                files[name] = [p for p in paths if p not in bad]
                if not files[name]:
                    raise DataError(f"{self._dirs[split] / name}: class folder has no readable "
                                    "images left after skipping corrupt ones")
        return sorted(bad)

    def _label(self, files: dict[str, list[Path]]) -> list[Sample]:
        index = self.class_to_idx
        samples = [(p, index[name]) for name, paths in files.items() for p in paths]
        return sorted(samples, key=lambda s: (s[1], s[0].as_posix()))

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __repr__(self) -> str:
        test = "None" if self.test is None else len(self.test)
        return (f"ImageFolderSplits(root={str(self.root)!r}, layout={self.layout!r}, "
                f"classes={len(self.classes)}, train={len(self.train)}, val={len(self.val)}, "
                f"test={test}, skipped={len(self.skipped)})")
