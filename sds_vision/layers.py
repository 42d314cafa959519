"""Compatibility names: the adapter layers live in ``sds_vision.methods`` (one file per method)."""

from .methods.base import LowRankAdapter, adapter_modules
from .methods.lora import LoRALinear
from .methods.sds_lora import BASES, SDSLoRALinear, basis_transform, orthonormal_basis

__all__ = ["BASES", "LoRALinear", "LowRankAdapter", "SDSLoRALinear", "adapter_modules",
           "basis_transform", "orthonormal_basis"]
