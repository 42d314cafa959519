"""sds_vision: SDS-LoRA, LoRA and related low-rank adapters for timm vision backbones.

The public names below are imported on first use (PEP 562), so ``import sds_vision`` and
the ``sds-vision`` command start without loading torch and timm (seconds) until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import AdapterConfig
from .errors import UserError

if TYPE_CHECKING:
    from .adapter_io import load_adapter, load_sds_model, read_config, save_adapter
    from .export import export_peft_adapter, export_timm
    from .inject import FAMILY_TARGETS, inject_adapters, merge_adapters
    from .methods import METHODS
    from .methods.base import LowRankAdapter, adapter_modules
    from .methods.lora import LoRALinear
    from .methods.sds_lora import SDSLoRALinear
    from .models import (
        MODEL_ALIASES,
        SDSConfig,
        count_parameters,
        create_sds_model,
        resolve_model_name,
    )

_LAZY = {
    "load_adapter": "adapter_io", "load_sds_model": "adapter_io", "read_config": "adapter_io",
    "save_adapter": "adapter_io", "export_peft_adapter": "export", "export_timm": "export",
    "FAMILY_TARGETS": "inject", "inject_adapters": "inject", "merge_adapters": "inject",
    "METHODS": "methods", "LowRankAdapter": "methods.base", "adapter_modules": "methods.base",
    "LoRALinear": "methods.lora", "SDSLoRALinear": "methods.sds_lora",
    "MODEL_ALIASES": "models", "SDSConfig": "models", "count_parameters": "models",
    "create_sds_model": "models", "resolve_model_name": "models",
}

__all__ = [
    "FAMILY_TARGETS", "METHODS", "MODEL_ALIASES", "AdapterConfig", "LoRALinear", "LowRankAdapter",
    "SDSConfig", "SDSLoRALinear", "UserError", "__version__", "adapter_modules",
    "count_parameters", "create_sds_model", "export_peft_adapter", "export_timm",
    "inject_adapters", "load_adapter", "load_sds_model", "merge_adapters", "read_config",
    "resolve_model_name", "save_adapter",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
