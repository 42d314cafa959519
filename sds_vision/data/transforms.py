"""Albumentations train/eval transforms driven by a timm data config, and a Dataset.

Randomness: each ``ImageTransform`` owns an albumentations ``Compose`` with its own
generator (global ``np.random`` / ``random`` seeds do not affect it). ``seed=None`` takes
``torch.initial_seed()``, so ``torch.manual_seed(s)`` before building a transform makes
it reproducible. A forked DataLoader worker would otherwise inherit an identical copy of
that generator and every worker would replay the same crops; ``TransformedDataset``
therefore reseeds the transform once per worker from ``get_worker_info().seed``, which
differs per worker and per epoch and is itself derived from the torch RNG (or the
DataLoader's ``generator``), so seeded runs stay reproducible for a fixed ``num_workers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# albumentations otherwise asks PyPI for a newer version on import: a network call (2 s
# timeout and a warning when offline) in every process, DataLoader workers included.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from sds_vision.data.augmentation import DEFAULT_AUG, check_aug
from sds_vision.data.folder import DataError, load_image_rgb

__all__ = ["ImageTransform", "TransformedDataset", "build_transform", "cv2_interpolation"]

# timm / PIL interpolation names -> OpenCV flags. 'box' (PIL's area average) matches
# INTER_AREA when downscaling; timm's 'random' (bilinear or bicubic per image) is fixed
# to bicubic so the eval pipeline stays deterministic.
_CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "area": cv2.INTER_AREA,
    "box": cv2.INTER_AREA,
    "random": cv2.INTER_CUBIC,
}


def cv2_interpolation(name: str) -> int:
    """OpenCV interpolation flag for a timm/PIL interpolation name."""
    try:
        return _CV2_INTERP[name.lower()]
    except (KeyError, AttributeError):
        raise DataError(f"interpolation={name!r}: unknown, expected one of "
                        f"{sorted(_CV2_INTERP)}") from None


class ImageTransform:
    """``np.ndarray`` HxWx3 uint8 -> normalised ``torch.float32`` tensor 3xHxW.

    A thin callable around ``A.Compose`` that checks its input, converts to CHW and
    exposes ``set_random_seed`` for per-worker reseeding. ``aug`` is the preset
    (``none`` for every eval pipeline) and ``describe()`` the pipeline in words.
    """

    def __init__(self, compose: A.Compose, train: bool, aug: str,
                 steps: Sequence[str] = ()) -> None:
        self.compose = compose
        self.train = train
        self.aug = aug if train else "none"
        self.steps = list(steps)

    @property
    def augment(self) -> bool:
        """True when the pipeline is random (a training preset other than ``none``)."""
        return self.aug != "none"

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                and image.ndim == 3 and image.shape[2] == 3):
            got = (f"{type(image).__name__} {getattr(image, 'dtype', '')} "
                   f"{getattr(image, 'shape', '')}")
            raise DataError(f"image: expected an HxWx3 uint8 numpy array, got {got}")
        out = self.compose(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32))

    def set_random_seed(self, seed: int | None) -> None:
        """Reset the augmentation generator (a no-op for deterministic eval pipelines)."""
        self.compose.set_random_seed(seed)

    def describe(self) -> str:
        """The steps in order, e.g. ``resize shorter side to 35 (bicubic) -> random crop
        32x32 -> horizontal flip p=0.5 -> normalize``."""
        return " -> ".join(self.steps)

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"ImageTransform(train={self.train}, aug={self.aug!r}, [{names}])"


def build_transform(data_config: Mapping[str, Any], train: bool, aug: str = DEFAULT_AUG,
                    hflip: bool = True, crop_scale: tuple[float, float] | None = None,
                    color_jitter: float = 0.0, seed: int | None = None) -> ImageTransform:
    """Build the train or eval transform for a timm model's data config.

    Eval (and train with ``aug="none"``): resize so the image covers
    ``floor(H / crop_pct) x floor(W / crop_pct)`` keeping aspect ratio (shorter side for
    square inputs, like timm; ``crop_mode="squash"`` resizes to exactly that) ->
    CenterCrop(H, W) -> Normalize. Train presets (``data/augmentation.py``):

    - ``light`` (default): the eval resize -> RandomCrop(H, W) -> HorizontalFlip;
    - ``strong``: RandomResizedCrop(H, W, scale=crop_scale or (0.08, 1)) -> HorizontalFlip;

    each followed by ColorJitter when ``color_jitter`` > 0, then Normalize.

    Args:
        data_config: ``timm.data.resolve_model_data_config(model)``: ``input_size``
            (3, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` and optionally
            ``crop_mode`` ('center' or 'squash').
        train: Training pipeline (random) or evaluation pipeline (deterministic).
        aug: Training preset, ``none``, ``light`` or ``strong``; ignored for eval.
        hflip: Random horizontal flip in ``light``/``strong`` (turn off for anything that
            is not mirror-symmetric: digits, text, orientation-sensitive tasks).
        crop_scale: RandomResizedCrop area range of ``strong`` (only valid with it).
        color_jitter: Brightness/contrast/saturation strength (timm convention); 0 = off.
        seed: Augmentation seed; None = ``torch.initial_seed()``.

    Returns:
        ImageTransform: callable HxWx3 uint8 array -> float32 tensor 3xHxW.
    """
    height, width, interp, mean, std, crop_pct, crop_mode = _read_config(data_config)
    lo, hi = check_aug(aug, crop_scale)
    if color_jitter < 0:
        raise DataError(f"color_jitter={color_jitter!r}: must be >= 0")
    interp_name = _interp_name(data_config)
    scale_h, scale_w = (int(height / crop_pct), int(width / crop_pct))
    if crop_mode == "squash":
        resize = (A.Resize(scale_h, scale_w, interpolation=interp),
                  f"resize to {scale_h}x{scale_w} ({interp_name})")
    else:
        side = f"{scale_h}" if scale_h == scale_w else f"cover {scale_h}x{scale_w}"
        resize = (A.SmallestMaxSize(max_size_hw=(scale_h, scale_w), interpolation=interp),
                  f"resize shorter side to {side} ({interp_name})")
    if not train or aug == "none":
        # pad_if_needed guards crop_pct > 1 and off-by-one rounding in the resize.
        steps = [resize, (A.CenterCrop(height, width, pad_if_needed=True),
                          f"center crop {height}x{width}")]
    elif aug == "light":
        steps = [resize, (A.RandomCrop(height, width, pad_if_needed=True),
                          f"random crop {height}x{width}")]
    else:  # strong
        steps = [(A.RandomResizedCrop(size=(height, width), scale=(lo, hi), interpolation=interp),
                  f"random resized crop {height}x{width} (area {lo:g}-{hi:g}, {interp_name})")]
    if train and aug != "none":
        if hflip:
            steps.append((A.HorizontalFlip(p=0.5), "horizontal flip p=0.5"))
        if color_jitter > 0:
            steps.append((A.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                        saturation=color_jitter, hue=0.0, p=1.0),
                          f"color jitter {color_jitter:g}"))
    steps.append((A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
                  f"normalize (mean {_fmt(mean)}, std {_fmt(std)})"))
    if seed is None:
        seed = torch.initial_seed() % 2**32
    return ImageTransform(A.Compose([t for t, _ in steps], seed=seed), train=train, aug=aug,
                          steps=[d for _, d in steps])


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _interp_name(cfg: Mapping[str, Any]) -> str:
    name = (cfg.get("interpolation") or "bilinear").lower()
    return "bicubic" if name == "random" else name


def _read_config(cfg: Mapping[str, Any]) -> tuple:
    missing = {"input_size", "mean", "std"} - set(cfg)
    if missing:
        raise DataError(f"data_config: missing key(s) {sorted(missing)}")
    input_size = tuple(cfg["input_size"])
    if len(input_size) != 3 or input_size[0] != 3:
        raise DataError(f"data_config['input_size']={input_size!r}: expected (3, H, W)")
    crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    if crop_pct <= 0:
        raise DataError(f"data_config['crop_pct']={crop_pct!r}: must be > 0")
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        raise DataError(f"data_config['crop_mode']={crop_mode!r}: only 'center' and 'squash' "
                        "are supported")
    interp = cv2_interpolation(cfg.get("interpolation") or "bilinear")
    return (int(input_size[1]), int(input_size[2]), interp, tuple(cfg["mean"]),
            tuple(cfg["std"]), crop_pct, crop_mode)


class TransformedDataset(Dataset):
    """``(path, label)`` samples -> ``(transform(loader(path)), label)``.

    Args:
        samples: e.g. ``ImageFolderSplits(...).train``.
        transform: Callable on the loaded image, typically from ``build_transform``.
        loader: Path -> HxWx3 uint8 array.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable,
                 loader: Callable[[Path], np.ndarray] = load_image_rgb) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.loader = loader
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self._maybe_reseed()
        path, label = self.samples[index]
        return self.transform(self.loader(path)), int(label)

    def _maybe_reseed(self) -> None:
        # See the module docstring: without this, forked workers share one RNG state.
        info = get_worker_info()
        if info is None or self._seeded_for == (info.id, info.seed):
            return
        reseed = getattr(self.transform, "set_random_seed", None)
        if reseed is not None:
            reseed(info.seed % 2**32)
        self._seeded_for = (info.id, info.seed)
