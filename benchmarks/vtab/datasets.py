"""Build the (train, eval) datasets of one benchmark task for a split mode.

Splits without augmentation (VTAB-1k, the SDS-LoRA paper's suite, every evaluation split)
are decoded once into a uint8 cache (resize, and for FGVC's evaluation a centre crop; no
augmentation, so every epoch sees the same pixels) and normalised per item. FGVC's
training split keeps VPT's random crop + flip, decoded per item (mixed aspect ratios
cannot be pre-cropped). Splits stored as pixels (CIFAR-100's pickles) are resized from
memory.

Device: with ``device`` set (the training device), a cached split moves there when it
fits (half the free GPU memory; the largest VTAB test split is 11 GB at 224 px) and
``CachedDataset.gather`` serves whole normalised batches on it: the engine then batches
by index, with no DataLoader workers and no host-to-device copy per batch. A split that
does not fit stays on the host and its batches are copied as uint8. FGVC's augmented
train split keeps the engine's DataLoader (workers, pinned memory, non-blocking copies).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.vtab.protocol import Preprocess
from sds_vision.data.benchmarks import get_benchmark
from sds_vision.data.cache import (
    CachedDataset,
    CachedSplit,
    DeviceNormalizer,
    Prep,
    cached_split,
    place_split,
)
from sds_vision.data.listing import SplitListing
from sds_vision.data.vtab import BenchmarkDataError

__all__ = ["TaskData", "build_task_data", "AugmentedTrainDataset", "prep_for"]


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    train_split: str
    eval_split: str


class AugmentedTrainDataset(torch.utils.data.Dataset):
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


def prep_for(pre: Preprocess) -> Prep:
    """The deterministic resize (and crop) of the cached splits."""
    if pre.resize_mode == "square":
        return Prep(pre.img_size, None, pre.interpolation)
    return Prep(pre.resize, pre.img_size, pre.interpolation)


def _pixels_split(listing: SplitListing, prep: Prep) -> CachedSplit:
    """Resize an in-memory N x H x W x 3 uint8 split (threads: PIL releases the GIL)."""
    def one(i: int) -> np.ndarray:
        return np.asarray(prep(Image.fromarray(listing.pixels[i])), dtype=np.uint8)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
        arrays = list(ex.map(one, range(len(listing))))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return CachedSplit(images, torch.tensor(listing.labels, dtype=torch.int64))


def _cached(benchmark: str, listing: SplitListing, prep: Prep, cache_dir: str | Path | None,
            device, decoder: str) -> CachedSplit:
    if listing.pixels is not None:
        return _pixels_split(listing, prep)
    return cached_split(listing.samples(), prep, cache_dir,
                        f"{benchmark}-{listing.task}-{listing.split}", decoder=decoder,
                        device=device)


def build_task_data(benchmark: str, root: str | Path, task: str, mode: str,
                    pre: Preprocess, cache_dir: str | Path | None = None,
                    device: torch.device | str | None = None,
                    decoder: str = "pil") -> TaskData:
    """Datasets for ``task`` in split mode ``mode`` (the benchmark's split modes).

    ``device``: the training device; cached splits move there when they fit and their
    batches are delivered there (None: the CPU). ``decoder``: ``"pil"`` (exact, default)
    or ``"torchvision"`` (decodes on ``device``; see ``sds_vision.data.decode``).
    """
    bench = get_benchmark(benchmark)
    tr_split, ev_split = bench.mode_splits(mode)
    tr, ev = bench.listing(root, task, tr_split), bench.listing(root, task, ev_split)
    norm = DeviceNormalizer(pre.mean, pre.std)
    prep = prep_for(pre)

    def cached(listing: SplitListing) -> CachedDataset:
        split = _cached(benchmark, listing, prep, cache_dir, device, decoder)
        return CachedDataset(place_split(split, device), norm, device)

    if pre.augment:
        if tr.paths is None:
            raise BenchmarkDataError(f"{tr.source}: augmentation needs image files")
        train = AugmentedTrainDataset(tr.samples(), pre)
    else:
        train = cached(tr)
    return TaskData(train, cached(ev), tr.num_classes, tr_split, ev_split)
