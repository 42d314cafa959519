"""LoRA+ (Hayou, Ghosh, Yu 2024), method ``lora_plus``: LoRA whose B factor trains with a
larger learning rate, ``lr_B = ratio * lr_A`` (the paper's default ratio is 16).

The forward and gradients are LoRA's; only the optimizer parameter groups differ, through the
``param_lr_scales`` hook (the engine builds one group per multiplier).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UserError
from .lora import LoRALinear


class LoRAPlusLinear(LoRALinear):
    """LoRA with B's learning rate ``lora_plus_ratio`` times A's.

    Extra args:
        lora_plus_ratio: ``lr_B / lr_A`` (> 0).
    """

    options = ("lora_plus_ratio",)

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None,
                 lora_plus_ratio: float = 16.0):
        if not lora_plus_ratio > 0:
            raise UserError(f"lora_plus_ratio must be > 0, got {lora_plus_ratio!r}")
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.lora_plus_ratio = float(lora_plus_ratio)

    def param_lr_scales(self) -> dict[str, float]:
        return {"lora_B": self.lora_plus_ratio}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_plus_ratio={self.lora_plus_ratio:g}"
