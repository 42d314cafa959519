"""Build the (train, eval) datasets of one benchmark task for a split mode.

VTAB-1k: both splits are decoded once into a uint8 cache (resize to ``img_size``
bicubic; no augmentation, so every epoch sees the same pixels) and normalised per item.
FGVC: eval is cached likewise (resize shorter side, centre crop); train keeps VPT's
random crop + flip, decoded per item (mixed aspect ratios cannot be pre-cropped).

Device: with ``device`` set (the training device), a cached split moves there when it
fits (half the free GPU memory; the largest VTAB test split is 11 GB at 224 px) and
``CachedDataset.gather`` serves whole normalised batches on it: the engine then batches
by index, with no DataLoader workers and no host-to-device copy per batch. A split that
does not fit stays on the host and its batches are copied as uint8. FGVC's augmented
train split keeps the engine's DataLoader (workers, pinned memory, non-blocking copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from benchmarks.vtab.protocol import SPLIT_MODES, Preprocess
from sds_vision.data.cache import (
    CachedDataset,
    DeviceNormalizer,
    Prep,
    cached_split,
    place_split,
)
from sds_vision.data.fgvc import load_fgvc, resolve_fgvc
from sds_vision.data.vtab import BenchmarkDataError, load_vtab_split, resolve_task

__all__ = ["TaskData", "build_task_data", "FGVCTrainDataset"]


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    train_split: str
    eval_split: str


class FGVCTrainDataset(torch.utils.data.Dataset):
    """VPT's FGVC train pipeline: Resize(shorter side) -> RandomCrop -> HFlip -> Normalize.
    Randomness comes from torch's global RNG, which the engine seeds per sample."""

    def __init__(self, samples, pre: Preprocess):
        from torchvision import transforms as T
        interp = {"bilinear": T.InterpolationMode.BILINEAR,
                  "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
        self.samples = samples
        self.tf = T.Compose([T.Resize(pre.resize, interpolation=interp),
                             T.RandomCrop(pre.img_size), T.RandomHorizontalFlip(),
                             T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise BenchmarkDataError(f"{path}: cannot decode image ({e})") from None
        return self.tf(img), label


def build_task_data(benchmark: str, root: str | Path, task: str, mode: str,
                    pre: Preprocess, cache_dir: str | Path | None = None,
                    device: torch.device | str | None = None,
                    decoder: str = "pil") -> TaskData:
    """Datasets for ``task`` in split mode ``mode`` ("tune" or "final").

    ``device``: the training device; cached splits move there when they fit and their
    batches are delivered there (None: the CPU). ``decoder``: ``"pil"`` (exact, default)
    or ``"torchvision"`` (decodes on ``device``; see ``sds_vision.data.decode``).
    """
    if mode not in SPLIT_MODES[benchmark]:
        raise ValueError(f"unknown split mode {mode!r}; expected one of "
                         f"{tuple(SPLIT_MODES[benchmark])}")
    tr_split, ev_split = SPLIT_MODES[benchmark][mode]
    norm = DeviceNormalizer(pre.mean, pre.std)

    def cached(samples, prep: Prep, name: str) -> CachedDataset:
        split = cached_split(samples, prep, cache_dir, name, decoder=decoder, device=device)
        return CachedDataset(place_split(split, device), norm, device)

    if benchmark == "vtab":
        t = resolve_task(task)
        prep = Prep(pre.resize, None, pre.interpolation)
        train, ev = (cached(load_vtab_split(root, t, s), prep, f"{t.name}-{s}")
                     for s in (tr_split, ev_split))
        return TaskData(train, ev, t.num_classes, tr_split, ev_split)
    ds = resolve_fgvc(task)
    loaded = load_fgvc(root, ds)
    train = [s for name in tr_split.split("+") for s in loaded.splits[name]]
    ev = cached(loaded.splits[ev_split], Prep(pre.resize, pre.img_size, pre.interpolation),
                f"{ds.name}-{ev_split}")
    return TaskData(FGVCTrainDataset(train, pre), ev, loaded.num_classes, tr_split, ev_split)
