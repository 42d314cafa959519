"""Decode-once uint8 cache for benchmark splits, and its batches on the training device.

VTAB's protocol has no augmentation (resize to 224 bicubic, normalise), so every epoch
sees the same pixels: decode and resize each split ONCE (``decode.py``) into a uint8
tensor ``N x 3 x H x W`` and normalise on the fly, on whatever device holds the tensor.
Resizing on the device instead (``DeviceNormalizer(size=...)``, torch bicubic with
antialias) is faster for small native images but is NOT bit-identical to PIL; an opt-in.

Placement: ``place_split`` moves a split to the training device when it fits
(``fits_on_device``); ``CachedDataset.gather`` then indexes and normalises whole batches
there, with no DataLoader and no per-batch host-to-device copy. A split that stays on the
host is gathered there and copied as uint8 (a quarter of the float bytes) from pinned
memory without blocking.

Memory: 224x224 RGB is 150 KB per image, so a 1,000-image train split is 150 MB and the
largest VTAB test split (dSprites, 73,728 images) is 11 GB.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from sds_vision.data.decode import (
    DECODERS,
    VTAB_PREP,
    CachedSplit,
    Prep,
    cpu_count,
    decode_split,
)
from sds_vision.fileio import atomic_write

__all__ = ["CachedSplit", "Prep", "decode_split", "cached_split", "DeviceNormalizer",
           "CachedDataset", "fits_on_device", "place_split", "cpu_count", "DECODERS"]


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


def cached_split(samples: Sequence[tuple[Path, int]], prep: Prep = VTAB_PREP,
                 cache_dir: str | Path | None = None, name: str = "split",
                 num_workers: int | None = None,
                 max_disk_bytes: int = MAX_DISK_CACHE_BYTES, decoder: str = "pil",
                 device: torch.device | str | None = None) -> CachedSplit:
    """``decode_split`` with an optional on-disk cache (keyed by the sample list, ``prep``
    and the decoder; written atomically), so seeds, methods and worker processes share one
    decode. Splits larger than ``max_disk_bytes`` are not written to disk. ``device`` is
    where the torchvision decoder works; a split loaded from disk is on the CPU."""
    if cache_dir is None:
        return decode_split(samples, prep, num_workers, decoder, device)
    cache_dir = Path(cache_dir)
    tag = prep.tag() + ("" if decoder == "pil" else f"-{decoder}")
    path = cache_dir / f"{name}-{tag}-{_key(samples, prep)}.pt"
    if path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        return CachedSplit(d["images"], d["labels"])
    split = decode_split(samples, prep, num_workers, decoder, device)
    if split.images.nbytes > max_disk_bytes:
        return split
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"images": split.images.cpu(),
                                               "labels": split.labels.cpu()}, tmp))
    return split


def fits_on_device(split: CachedSplit, device: torch.device | str,
                   fraction: float = 0.5) -> bool:
    """Whether ``split`` fits in ``fraction`` of the device's free memory (CUDA only).

    Free memory counts what torch's caching allocator holds but does not use (e.g. the
    previous task's splits), since a new split reuses it. The other half is left for
    training (ViT-B at batch 64 needs well under 20 GB)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return split.nbytes <= fraction * free


def place_split(split: CachedSplit, device: torch.device | str | None,
                fraction: float = 0.5) -> CachedSplit:
    """``split`` moved to ``device`` when it fits there (``fits_on_device``), else as is."""
    if device is None or split.images.device.type == torch.device(device).type:
        return split  # already there (a worker process sees one GPU)
    return split.to(device) if fits_on_device(split, device, fraction) else split


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
    per-sample contract) and ``ds.gather(indices)`` a whole normalised batch on ``device``
    (default: the split's device), which the engine uses instead of a DataLoader.

    With the split on ``device`` (the GPU), a batch is one index, one normalisation and no
    host-to-device copy. With the split on the host and ``device`` CUDA, the uint8 batch is
    gathered on the host and copied from pinned memory without blocking, then normalised
    on the device. Indices move to the split's device without blocking either, so a
    training step never waits for the GPU to drain.
    """

    def __init__(self, split: CachedSplit, normalizer: DeviceNormalizer,
                 device: torch.device | str | None = None):
        self.split, self.normalizer = split, normalizer
        # tiny: labels always live on `device`; their device names the index ("cuda:0")
        self._labels = split.labels.to(device if device is not None else split.images.device)
        self.device = self._labels.device

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.normalizer(self.split.images[i]), int(self.split.labels[i])

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.split.images.device, non_blocking=True)
        images = self.split.images[idx]
        if images.device != self.device:  # a split kept on the host
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
            idx = indices.to(self.device, non_blocking=True)
        return self.normalizer(images), self._labels[idx]
