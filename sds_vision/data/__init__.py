"""Image-folder data for fine-tuning: splits, transforms and synthetic demo tasks.

``build_transform`` / ``TransformedDataset`` are imported lazily (PEP 562): albumentations
and torch take seconds to import, and listing or validating a folder needs neither. timm
is never imported here; pass ``timm.data.resolve_model_data_config(model)`` in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sds_vision.data.folder import IMG_EXTENSIONS, DataError, ImageFolderSplits, load_image_rgb
from sds_vision.data.synthetic import (
    SOURCE_TASK,
    TARGET_TASKS,
    TASKS,
    generate_task,
    make_demo_data,
)

if TYPE_CHECKING:
    from sds_vision.data.transforms import ImageTransform, TransformedDataset, build_transform

__all__ = [
    "DataError", "IMG_EXTENSIONS", "ImageFolderSplits", "ImageTransform", "SOURCE_TASK",
    "TARGET_TASKS", "TASKS", "TransformedDataset", "build_transform", "generate_task",
    "load_image_rgb", "make_demo_data",
]

_LAZY = {"build_transform", "TransformedDataset", "ImageTransform"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from sds_vision.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
