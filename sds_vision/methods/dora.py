"""DoRA (Liu et al. 2024), method ``dora``: weight-decomposed low-rank adaptation.

The adapted weight is ``W' = m * (W0 + s B A) / ||W0 + s B A||``, the norm taken per output
feature (per row of PyTorch's ``out x in`` weight) and treated as a constant in the backward
(detached), as the paper proposes; ``m`` (one entry per output feature) trains and starts at
the row norms of ``W0``, so the initial output equals the base's. The forward follows peft's
``use_dora=True`` layer term by term (tests compare the two on a timm ViT):

    y = W0 x + b + (m / n - 1) * (W0 x') + (m / n) * s B A x'

with ``n`` the detached row norms, ``x' = dropout(x)`` in training (``x`` otherwise; then
``W0 x`` is taken from the base output instead of a second matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankAdapter, low_rank_product


class DoRALinear(LowRankAdapter):
    """DoRA on a frozen ``nn.Linear``; see ``LowRankAdapter`` for the arguments.

    ``lora_magnitude`` is ``(out,)``, or ``(k, m)`` for ``k`` fused slices (rows outside the
    slices are untouched).
    """

    peft_options = {"use_dora": True}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = (len(self.slices), -1) if self.slices else (-1,)
        self.lora_magnitude = nn.Parameter(self._row_norms(self.lora_B.detach()).reshape(shape))

    def _row_norms(self, lora_b: torch.Tensor) -> torch.Tensor:
        """``||W0 + s B A||`` per adapted output row, float32, ``(k, m)``."""
        a = self.factors()[0].detach().float()
        b = lora_b.float() if lora_b.dim() == 3 else lora_b.float().unsqueeze(0)
        w = self._slice_rows(self.weight.detach().float())
        return torch.linalg.norm(w + self.scaling * (b @ a), dim=-1)

    def _magnitude(self) -> torch.Tensor:
        return self.lora_magnitude.view(len(self.slices or [0]), -1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_magnitude"):
            with torch.no_grad():
                self.lora_magnitude.copy_(self._row_norms(self.lora_B).view_as(self.lora_magnitude))

    def lowrank_factors(self) -> None:
        return None  # the magnitude rescales whole rows of W0: not a low-rank update

    def delta_weight(self) -> torch.Tensor:
        dt = torch.promote_types(self.lora_A.dtype, torch.float32)  # float64 for a float64 twin
        a, b = (t.to(dt) for t in self.factors())
        w = self._slice_rows(self.weight.detach().to(dt))
        direction = w + self.scaling * (b @ a)
        norm = torch.linalg.norm(direction, dim=-1, keepdim=True).detach()
        return self._blocks_to_dense(self._magnitude().to(dt).unsqueeze(-1) / norm * direction - w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dropout_active = self.training and not isinstance(self.dropout, nn.Identity)
        xa = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            xa = xa.to(self.lora_A.dtype)
        x2d = xa.reshape(-1, self.in_features)
        a, b = self.factors()
        lora = low_rank_product(x2d, a, b, self.scaling)[1]  # (n, k, m)
        with torch.no_grad():
            w = self._slice_rows(self.weight.float())
            norm = torch.linalg.norm(w + self.scaling * (b.float() @ a.float()), dim=-1)
        # (k, m), float32 even under autocast (as peft keeps it): bf16 would round a
        # magnitude change under ~0.4 % to nothing; the norm is a constant
        scale = self._magnitude() / norm
        k, m = scale.shape
        if dropout_active:  # W0 x' with the dropped-out input, as peft does
            w0 = self.weight if not self.slices else self.weight.index_select(0, self.slice_rows)
            base = F.linear(x2d, w0.to(x2d.dtype)).view(-1, k, m)
        else:
            base = (out if self.bias is None else out - self.bias).reshape(-1, self.out_features)
            base = base.index_select(1, self.slice_rows) if self.slices else base
            base = base.view(-1, k, m)
        delta = ((scale - 1) * base + scale * lora).to(out.dtype)
        if not self.slices:
            return out + delta.reshape(out.shape)
        flat = out.reshape(-1, self.out_features)
        return flat.index_add(1, self.slice_rows, delta.flatten(1)).view(out.shape)

    # --- files ---------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude}

    def peft_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._plain_lora(*self.factors())

    def peft_extra(self) -> dict[str, torch.Tensor]:
        """peft's magnitude vector covers every output row: outside the slices it is the
        row norm of W0, computed as peft computes its norm, so that ``m / n = 1`` there."""
        if not self.slices:
            return {"lora_magnitude_vector": self.lora_magnitude.detach().float().clone()}
        a, b = self.peft_lora()
        full = torch.linalg.norm(self.weight.detach().float() + self.scaling * (b @ a), dim=1)
        full = full.index_copy(0, self.slice_rows, self.lora_magnitude.detach().flatten())
        return {"lora_magnitude_vector": full}
