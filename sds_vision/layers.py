"""Compatibility names: the adapter layers live in ``sds_vision.methods`` (one file per method)."""

from .methods.base import LowRankAdapter, adapter_modules
from .methods.dora import DoRALinear
from .methods.lora import LoRALinear
from .methods.lora_plus import LoRAPlusLinear
from .methods.pissa import PiSSALinear
from .methods.precond_lora import PrecondLoRALinear
from .methods.sds_lora import BASES, SDSLoRALinear, basis_transform, orthonormal_basis
from .methods.sds_lora_bases import SDSLoRABasesLinear

__all__ = ["BASES", "DoRALinear", "LoRALinear", "LoRAPlusLinear", "LowRankAdapter",
           "PiSSALinear", "PrecondLoRALinear", "SDSLoRABasesLinear", "SDSLoRALinear",
           "adapter_modules", "basis_transform", "orthonormal_basis"]
