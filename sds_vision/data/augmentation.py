"""Training augmentation presets: names, defaults and descriptions (torch-free: the CLI reads it).

``build_transform`` (``data/transforms.py``) turns a preset into an albumentations pipeline.
The default, ``light``, is the FGVC fine-tuning recipe: resize as for evaluation, take a
random crop of the input size instead of the centre one, flip half the images. ``strong``
is timm's ImageNet training crop (RandomResizedCrop over 8-100 % of the area), which keeps
as little as 8 % of an image: right for training from scratch on large data, harmful when
fine-tuning on small images or objects that fill the frame (on scikit-learn's digits at
32 px it cost SDS-LoRA about 30 points of accuracy; see docs/finetuning.md).
"""

from __future__ import annotations

from .folder import DataError

AUG_PRESETS: dict[str, str] = {
    "none": "resize + center crop, as for evaluation (no randomness)",
    "light": "resize as for evaluation + random crop of the input size + horizontal flip "
             "(FGVC-style fine-tuning recipe)",
    "strong": "random resized crop over --crop-scale of the area (default 0.08-1, timm's "
              "ImageNet training crop) + horizontal flip",
}
DEFAULT_AUG = "light"
DEFAULT_CROP_SCALE = (0.08, 1.0)


def check_aug(aug: str, crop_scale: tuple[float, float] | None = None) -> tuple[float, float]:
    """Validate a preset and its crop scale; returns the scale ``strong`` uses.

    Raises:
        DataError: unknown preset, a crop scale outside ``0 < min <= max <= 1``, or a crop
            scale given with a preset that does not crop by area.
    """
    if aug not in AUG_PRESETS:
        raise DataError(f"augmentation {aug!r}: unknown, expected one of "
                        f"{', '.join(AUG_PRESETS)}")
    if crop_scale is not None and aug != "strong":
        raise DataError(f"crop scale {tuple(crop_scale)} applies to augmentation 'strong' "
                        f"only (got {aug!r})")
    lo, hi = crop_scale if crop_scale is not None else DEFAULT_CROP_SCALE
    if not 0.0 < lo <= hi <= 1.0:
        raise DataError(f"crop scale ({lo:g}, {hi:g}): need 0 < min <= max <= 1")
    return float(lo), float(hi)


def parse_crop_scale(text: str) -> tuple[float, float]:
    """``"0.5"`` -> (0.5, 1.0); ``"0.5,0.9"`` -> (0.5, 0.9) (range checked by ``check_aug``)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"crop scale {text!r}: expected MIN or MIN,MAX (fractions of the "
                        "image area)") from None
    if len(values) == 1:
        values.append(1.0)
    if len(values) != 2:
        raise DataError(f"crop scale {text!r}: expected MIN or MIN,MAX")
    return values[0], values[1]
