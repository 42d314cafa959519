"""Riemannian-preconditioned LoRA (Zhang & Pilanci 2024), method ``precond_lora``.

LoRA's forward; LoRA's factor gradients multiplied by the inverse (damped) Gram of the
other factor before the optimizer sees them:

    dB = s G A^T (A A^T + delta I)^-1        dA = (B^T B + delta I)^-1 s B^T G

with ``delta = 1e-6`` (the authors' comparison code). With plain SGD this is their scaled
GD; with AdamW, AdamW on the preconditioned gradients. One plain gradient step then moves
``delta W`` by ``G P_A + P_B G`` (projections, no singular values; docs/method.md section 3).
The input gradient is LoRA's. The backward is SDS-LoRA's with ``M = (Gram + delta I)^-1``
(``rxr.TransformedGradDelta``); the r x r inverses of all layers are computed in one
batched call per backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import rxr
from .base import LowRankAdapter


class PrecondLoRALinear(LowRankAdapter):
    """LoRA with Riemannian-preconditioned factor gradients; see the module docstring.

    Extra args:
        delta: damping of the r x r Gram matrices before inversion.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None, delta: float = 1e-6):
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.delta = delta

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        work = rxr.Work("inv", self.delta)
        return rxr.TransformedGradDelta.apply(x2d, a, b, self.scaling, work,
                                              rxr.register(self, a, b, work))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", delta={self.delta:g}"
