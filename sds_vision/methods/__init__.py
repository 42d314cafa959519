"""The method registry: every way this library can fine-tune a model, in one table.

A low-rank method is one adapter-layer class (a ``LowRankAdapter`` subclass in its own
module here) plus one entry below. Everything else derives from this table: the CLI's
``--method`` choices, ``create_sds_model``, parameter counts, adapter files, merging, peft
export, the benchmark harness's ``--methods``, report labels and the demo.

This module is torch-free (the CLI reads it to build ``--help``); layer classes are
imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Method:
    """One registry entry.

    Attributes:
        name: the identifier used everywhere (``--method``, files, reports).
        label: the name printed in tables and plots.
        trains: ``"adapters"`` (adapter factors + the new head), ``"all"`` or ``"head"``.
        layer: ``"<module>:<class>"`` of the adapter layer, or None for methods without
            adapters. ``".lora:LoRALinear"`` (leading dot) is a module of this package; a
            method defined elsewhere gives an absolute module (``"my_methods:MyLinear"``).
        summary: one line for ``--help`` and the docs.
    """

    name: str
    label: str
    trains: str
    layer: str | None
    summary: str

    @property
    def low_rank(self) -> bool:
        return self.layer is not None

    def layer_class(self) -> type:
        """The ``LowRankAdapter`` subclass (imports torch)."""
        if self.layer is None:
            raise UserError(f"method {self.name!r} has no adapter layer")
        module, cls = self.layer.split(":")
        package = __name__ if module.startswith(".") else None
        return getattr(importlib.import_module(module, package), cls)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sds_lora", "SDS-LoRA", "adapters", ".sds_lora:SDSLoRALinear",
           "LoRA's forward; factor gradients through orthonormal bases of A and B"),
    Method("sds_lora_bases", "SDS-LoRA (bases)", "adapters",
           ".sds_lora_bases:SDSLoRABasesLinear",
           "the authors' SDS-LoRA: W0 + s·(B·P_A + P_B·A) with refreshed orthonormal bases"),
    Method("lora", "LoRA", "adapters", ".lora:LoRALinear",
           "low-rank adapters W0 + s·BA (Hu et al. 2021)"),
    Method("lora_plus", "LoRA+", "adapters", ".lora_plus:LoRAPlusLinear",
           "LoRA with B's learning rate a multiple of A's (Hayou et al. 2024)"),
    Method("precond_lora", "Precond. LoRA", "adapters", ".precond_lora:PrecondLoRALinear",
           "LoRA with Riemannian-preconditioned factor gradients (Zhang & Pilanci 2024)"),
    Method("dora", "DoRA", "adapters", ".dora:DoRALinear",
           "weight-decomposed LoRA: magnitude x normalised direction (Liu et al. 2024)"),
    Method("pissa", "PiSSA", "adapters", ".pissa:PiSSALinear",
           "LoRA initialised from the top-r SVD of W0, on the residual (Meng et al. 2024)"),
    Method("full", "full fine-tuning", "all", None, "every weight trains"),
    Method("linear", "linear probing", "head", None, "only the new classifier head trains"),
)}


def get_method(name: str) -> Method:
    """The registry entry for ``name``, or a one-line error listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def low_rank_methods() -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if m.low_rank)
