"""sds_vision: SDS-LoRA and LoRA adapters for timm vision backbones."""

__version__ = "0.1.0"

from .adapter_io import (export_peft_adapter, load_adapter, load_sds_model,  # noqa: E402
                         read_config, save_adapter)
from .inject import FAMILY_TARGETS, inject_adapters, merge_adapters  # noqa: E402
from .layers import LoRALinear, SDSLoRALinear, adapter_modules  # noqa: E402
from .models import (METHODS, MODEL_ALIASES, SDSConfig, count_parameters,  # noqa: E402
                     create_sds_model, resolve_model_name)

__all__ = [
    "FAMILY_TARGETS", "LoRALinear", "METHODS", "MODEL_ALIASES", "SDSConfig", "SDSLoRALinear",
    "adapter_modules", "count_parameters", "create_sds_model", "export_peft_adapter",
    "inject_adapters", "load_adapter", "load_sds_model", "merge_adapters", "read_config",
    "resolve_model_name", "save_adapter",
]
