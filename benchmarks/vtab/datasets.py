"""Build the (train, eval) datasets of one benchmark task for a split mode.

VTAB-1k: both splits are decoded once into a uint8 cache (resize to ``img_size``
bicubic; no augmentation, so every epoch sees the same pixels) and normalised per item.
FGVC: eval is cached likewise (resize shorter side, centre crop); train keeps VPT's
random crop + flip, decoded per item (mixed aspect ratios cannot be pre-cropped).

The cache stays on the CPU: the engine's DataLoader pins host memory, and per-item
normalisation of a uint8 image is far cheaper than a ViT-B step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from benchmarks.vtab.protocol import SPLIT_MODES, Preprocess
from sds_vision.data.cache import CachedDataset, DeviceNormalizer, Prep, cached_split
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
                    pre: Preprocess, cache_dir: str | Path | None = None) -> TaskData:
    """Datasets for ``task`` in split mode ``mode`` ("tune" or "final")."""
    if mode not in SPLIT_MODES[benchmark]:
        raise ValueError(f"unknown split mode {mode!r}; expected one of "
                         f"{tuple(SPLIT_MODES[benchmark])}")
    tr_split, ev_split = SPLIT_MODES[benchmark][mode]
    norm = DeviceNormalizer(pre.mean, pre.std)
    if benchmark == "vtab":
        t = resolve_task(task)
        prep = Prep(pre.resize, None, pre.interpolation)
        splits = [cached_split(load_vtab_split(root, t, s), prep, cache_dir, f"{t.name}-{s}")
                  for s in (tr_split, ev_split)]
        return TaskData(CachedDataset(splits[0], norm), CachedDataset(splits[1], norm),
                        t.num_classes, tr_split, ev_split)
    ds = resolve_fgvc(task)
    loaded = load_fgvc(root, ds)
    train = [s for name in tr_split.split("+") for s in loaded.splits[name]]
    ev = cached_split(loaded.splits[ev_split], Prep(pre.resize, pre.img_size, pre.interpolation),
                      cache_dir, f"{ds.name}-{ev_split}")
    return TaskData(FGVCTrainDataset(train, pre), CachedDataset(ev, norm), loaded.num_classes,
                    tr_split, ev_split)
