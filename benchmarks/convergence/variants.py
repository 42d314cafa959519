"""The methods the convergence benchmark compares: registry entries plus adapter options.

A *variant* is one row of the tables: a registry method (``sds_vision.methods.METHODS``) and
the ``AdapterConfig`` options it runs with, so two readings of one method (SDS-LoRA's polar
and qr bases, the bases form's refresh schedules and start-ups) are compared side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sds_vision.methods import METHODS


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    options: dict = field(default_factory=dict)
    label: str = ""

    @property
    def low_rank(self) -> bool:
        return METHODS[self.method].low_rank


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lora", "lora", {}, "LoRA"),
    Variant("lora_plus", "lora_plus", {}, "LoRA+ (lr_B = 16 lr_A)"),
    Variant("dora", "dora", {}, "DoRA"),
    Variant("pissa", "pissa", {}, "PiSSA"),
    Variant("precond_lora", "precond_lora", {}, "preconditioned LoRA"),
    Variant("sds_lora", "sds_lora", {}, "SDS-LoRA, exact forward (polar)"),
    Variant("sds_lora_qr", "sds_lora", {"basis": "qr"}, "SDS-LoRA, exact forward (qr)"),
    Variant("sds_bases", "sds_lora_bases", {}, "SDS-LoRA, bases (authors' refresh and start-up)"),
    Variant("sds_bases_every", "sds_lora_bases", {"bases_refresh": "every"},
            "SDS-LoRA, bases (refresh every step, authors' start-up)"),
    Variant("sds_bases_random", "sds_lora_bases",
            {"bases_refresh": "every", "bases_startup": "random"},
            "SDS-LoRA, bases (refresh every step, random start)"),
    Variant("full", "full", {}, "full fine-tuning"),
    Variant("linear", "linear", {}, "linear probing"),
)}

LOW_RANK = tuple(n for n, v in VARIANTS.items() if v.low_rank)
