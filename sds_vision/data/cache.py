"""Decode-once uint8 cache for benchmark splits.

VTAB's protocol has no augmentation (resize to 224 bicubic, normalise), so every epoch
sees the same pixels: decode and resize each split ONCE into a uint8 tensor
``N x 3 x H x W`` and normalise on the fly, on whatever device holds the tensor.

Exactness: PIL's resize returns uint8, so caching the resized image is bit-identical
to the usual PIL -> Resize -> ToTensor -> Normalize pipeline. Resizing on the device
instead (``DeviceNormalizer(size=...)``, torch bicubic with antialias) is faster for
small native images but is NOT bit-identical to PIL; it is an opt-in.

Memory: 224x224 RGB is 150 KB per image, so a 1,000-image train split is 150 MB and the
largest VTAB test split (dSprites, 73,728 images) is 11 GB.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sds_vision.data.vtab import BenchmarkDataError
from sds_vision.fileio import atomic_write

__all__ = ["CachedSplit", "Prep", "decode_split", "cached_split", "DeviceNormalizer",
           "CachedDataset", "fits_on_device"]

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Prep:
    """Deterministic preprocessing applied once at decode time.

    ``resize``: int -> square ``resize x resize`` (VTAB); with ``crop`` set, the shorter
    side is resized to ``resize`` and the centre ``crop x crop`` kept (FGVC test).
    ``resize=None`` keeps native size (all images must then share one size).
    """
    resize: int | None = 224
    crop: int | None = None
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.resize is None:
            return img
        rs = _RESAMPLE[self.interpolation]
        if self.crop is None:
            return img.resize((self.resize, self.resize), rs)
        # same arithmetic as torchvision's Resize(int) + CenterCrop (VPT's FGVC eval)
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize * long / short)
        img = img.resize((self.resize, new_long) if w <= h else (new_long, self.resize), rs)
        w, h = img.size
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        return img.crop((left, top, left + self.crop, top + self.crop))

    def tag(self) -> str:
        return f"r{self.resize}-c{self.crop}-{self.interpolation}"


@dataclass
class CachedSplit:
    images: torch.Tensor   # uint8, N x 3 x H x W
    labels: torch.Tensor   # int64, N

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "CachedSplit":
        return CachedSplit(self.images.to(device), self.labels.to(device))

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


def _decode(path: Path, prep: Prep) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.array(prep(im.convert("RGB")), dtype=np.uint8)
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path}: image listed but missing") from None
    except (OSError, ValueError) as e:
        raise BenchmarkDataError(f"{path}: cannot decode image ({e})") from None
    return arr


def decode_split(samples: Sequence[tuple[Path, int]], prep: Prep = Prep(),
                 num_workers: int | None = None) -> CachedSplit:
    """Decode ``(path, label)`` samples once into a uint8 ``CachedSplit`` (threads; PIL
    releases the GIL while decoding and resizing)."""
    if not samples:
        raise BenchmarkDataError("decode_split: empty split")
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    first = _decode(samples[0][0], prep)
    h, w = first.shape[:2]
    images = torch.empty((len(samples), 3, h, w), dtype=torch.uint8)
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)

    def fill(i: int) -> None:
        arr = first if i == 0 else _decode(samples[i][0], prep)
        if arr.shape[:2] != (h, w):
            raise BenchmarkDataError(
                f"{samples[i][0]}: size {arr.shape[1]}x{arr.shape[0]} differs from "
                f"{w}x{h}; set a resize to cache images of mixed sizes")
        images[i] = torch.from_numpy(arr).permute(2, 0, 1)

    with ThreadPoolExecutor(num_workers) as ex:
        list(ex.map(fill, range(len(samples))))
    return CachedSplit(images, labels)


def _key(samples: Sequence[tuple[Path, int]], prep: Prep) -> str:
    """Hash of preprocessing, paths, labels and each file's size + mtime, so a dump that
    is regenerated in place (e.g. dSprites rescaled) is decoded again."""
    h = hashlib.sha1(prep.tag().encode())
    for p, lab in samples:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{p}\t{lab}\t{stamp}\n".encode())
    return h.hexdigest()[:16]


# Splits above this size stay in memory only: the 19 VTAB test splits at 224 px are ~54 GiB
# (dSprites alone 10 GiB each) and re-decode in about a minute, far less than a run takes.
MAX_DISK_CACHE_BYTES = 2 * 2**30


def cached_split(samples: Sequence[tuple[Path, int]], prep: Prep = Prep(),
                 cache_dir: str | Path | None = None, name: str = "split",
                 num_workers: int | None = None,
                 max_disk_bytes: int = MAX_DISK_CACHE_BYTES) -> CachedSplit:
    """``decode_split`` with an optional on-disk cache (keyed by the sample list and
    ``prep``; written atomically), so seeds, methods and worker processes share one
    decode. Splits larger than ``max_disk_bytes`` are not written to disk."""
    if cache_dir is None:
        return decode_split(samples, prep, num_workers)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{prep.tag()}-{_key(samples, prep)}.pt"
    if path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        return CachedSplit(d["images"], d["labels"])
    split = decode_split(samples, prep, num_workers)
    if split.images.nbytes > max_disk_bytes:
        return split
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"images": split.images, "labels": split.labels},
                                              tmp))
    return split


def fits_on_device(split: CachedSplit, device: torch.device | str,
                   fraction: float = 0.5) -> bool:
    """Whether ``split`` fits in ``fraction`` of the device's free memory (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    return split.nbytes <= fraction * free


class DeviceNormalizer:
    """uint8 ``B x 3 x H x W`` batch -> normalised float batch, on the batch's device.

    ``size`` (optional) resizes on the device with antialiased bicubic (not
    bit-identical to PIL; see module docstring).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 size: int | None = None, dtype: torch.dtype = torch.float32):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.size, self.dtype = size, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        x = x.to(torch.float32, copy=True)  # a new tensor: the cache is never modified
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0, 255)
        # (x/255 - mean)/std == (x - 255*mean) * 1/(255*std); in place on the fresh float copy
        if self.mean.device != x.device:
            self.mean, self.inv_std = self.mean.to(x.device), self.inv_std.to(x.device)
        x = x.sub_(self.mean).mul_(self.inv_std).to(self.dtype)
        return x.squeeze(0) if squeeze else x


class CachedDataset(torch.utils.data.Dataset):
    """A ``CachedSplit`` as a dataset: ``ds[i]`` is ``(float 3xHxW, int)`` (the engine's
    per-sample contract) and ``ds.gather(indices)`` a whole normalised batch on the split's
    device, which the engine uses instead of a DataLoader (no workers, no per-batch
    host-to-device copies when the split lives on the GPU)."""

    def __init__(self, split: CachedSplit, normalizer: DeviceNormalizer):
        self.split, self.normalizer = split, normalizer

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.normalizer(self.split.images[i]), int(self.split.labels[i])

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.split.images.device)
        return self.normalizer(self.split.images[idx]), self.split.labels[idx]
