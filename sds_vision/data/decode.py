"""Decode benchmark images once into a uint8 ``CachedSplit`` (``N x 3 x H x W``).

``decoder="pil"`` (the default, exact) decodes and resizes with PIL on every core this
process may use (threads: PIL releases the GIL while decoding and resizing). PIL's resize
returns uint8, so the cached pixels are bit-identical to the usual PIL -> Resize ->
ToTensor pipeline.

``decoder="torchvision"`` (opt-in) decodes JPEGs with ``torchvision.io.decode_jpeg``,
batched and on the GPU (nvjpeg) when ``device`` is CUDA, and resizes with torchvision's
antialiased bicubic on that device. Measured on the CPU (tests/test_gpu_path.py):
torchvision's CPU JPEG decode is bit-identical to PIL's, its resize is not (1-2 levels on
well under 1 % of the pixels). So the torchvision path changes the inputs slightly.
torchvision 0.29 deprecates its image decoders in favour of TorchCodec; this opt-in path
uses them while they exist.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from sds_vision.data.vtab import BenchmarkDataError

__all__ = ["CachedSplit", "Prep", "VTAB_PREP", "decode_split", "cpu_count", "DECODERS"]

DECODERS = ("pil", "torchvision")

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


VTAB_PREP = Prep()  # square 224 bicubic


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


def cpu_count() -> int:
    """Cores this process may use (its CPU affinity: a Slurm or container CPU limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_split(samples: Sequence[tuple[Path, int]], prep: Prep = VTAB_PREP,
                 num_workers: int | None = None, decoder: str = "pil",
                 device: torch.device | str | None = None) -> CachedSplit:
    """Decode ``(path, label)`` samples once into a uint8 ``CachedSplit``.

    Args:
        samples: ``(image path, label)`` pairs.
        prep: the resize (and crop) applied once.
        num_workers: decoding threads (default: every core this process may use).
        decoder: ``"pil"`` (exact, the default) or ``"torchvision"`` (see module docstring).
        device: where the torchvision decoder decodes and resizes (and the split lives);
            the PIL decoder always returns a CPU split.
    """
    if not samples:
        raise BenchmarkDataError("decode_split: empty split")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    num_workers = num_workers or cpu_count()
    if decoder == "torchvision":
        return _decode_split_tv(samples, prep, num_workers, device)
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


_TV_INTERP = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR,
              "nearest": TF.InterpolationMode.NEAREST}
_TV_BATCH = 256  # JPEGs per batched decode_jpeg call


def _read_bytes(path: Path) -> torch.Tensor:
    try:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path}: image listed but missing") from None
    except OSError as e:
        raise BenchmarkDataError(f"{path}: cannot read image ({e})") from None


def _tv_prep(img: torch.Tensor, prep: Prep) -> torch.Tensor:
    """``prep`` with torchvision on a uint8 ``3 x H x W`` tensor (on any device)."""
    if prep.resize is None:
        return img
    mode = _TV_INTERP[prep.interpolation]
    if prep.crop is None:
        return TF.resize(img, [prep.resize, prep.resize], interpolation=mode, antialias=True)
    # Resize(int) + CenterCrop: the same arithmetic as Prep (torchvision's own)
    img = TF.resize(img, prep.resize, interpolation=mode, antialias=True)
    return TF.center_crop(img, [prep.crop, prep.crop])


def _tv_decode(paths: Sequence[Path], data: list[torch.Tensor],
               device: torch.device) -> list[torch.Tensor]:
    """Decode one chunk: JPEGs in one batched ``decode_jpeg`` call on ``device`` (nvjpeg on
    CUDA), other formats with ``decode_image`` on the CPU. A failing batch is decoded one
    file at a time so that the error names the file."""
    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if d.numel() > 2 and d[0] == 0xFF and d[1] == 0xD8]
    try:
        if jpeg:
            for i, img in zip(jpeg, decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB,
                                                device=device)):
                out[i] = img
        for i, d in enumerate(data):
            if out[i] is None:
                out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        for i, d in enumerate(data):
            try:
                out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device)
            except RuntimeError as e:
                raise BenchmarkDataError(f"{paths[i]}: cannot decode image ({e})") from None
    return out  # type: ignore[return-value]


def _decode_split_tv(samples: Sequence[tuple[Path, int]], prep: Prep, num_workers: int,
                     device: torch.device | str | None) -> CachedSplit:
    device = torch.device(device or "cpu")
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)
    images: torch.Tensor | None = None
    with ThreadPoolExecutor(num_workers) as ex, warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec, which
        # the pinned install does not include; the module docstring says so once
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        for start in range(0, len(samples), _TV_BATCH):
            chunk = [p for p, _ in samples[start:start + _TV_BATCH]]
            decoded = _tv_decode(chunk, list(ex.map(_read_bytes, chunk)), device)
            for j, img in enumerate(decoded):
                img = _tv_prep(img, prep)
                if images is None:
                    images = torch.empty((len(samples), *img.shape), dtype=torch.uint8,
                                         device=device)
                if img.shape != images.shape[1:]:
                    raise BenchmarkDataError(
                        f"{chunk[j]}: size {img.shape[2]}x{img.shape[1]} differs from "
                        f"{images.shape[3]}x{images.shape[2]}; set a resize to cache images "
                        "of mixed sizes")
                images[start + j] = img
    return CachedSplit(images, labels.to(device))
