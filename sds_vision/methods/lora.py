"""LoRA (Hu et al., 2021): ``y = W0 x + s B (A x)``; factor gradients from plain autograd,
``dB = s G A^T``, ``dA = s B^T G`` with ``G = dY^T X``."""

from __future__ import annotations

import torch

from .base import LowRankAdapter, low_rank_product


class LoRALinear(LowRankAdapter):
    """LoRA on a frozen ``nn.Linear``; see ``LowRankAdapter`` for the arguments."""

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return low_rank_product(x2d, a, b, self.scaling)[1]
