"""PiSSA (Meng, Wang, Zhang 2024), method ``pissa``: LoRA initialised from the principal
singular directions of W0, on the residual.

With the top-r SVD ``W0 ~ U_r S_r V_r^T`` (per fused slice): ``B0 = U_r (S_r / s)^(1/2)``,
``A0 = (S_r / s)^(1/2) V_r^T`` (peft's ``init_lora_weights="pissa"``), so ``s B0 A0`` is the
principal part of W0, and the frozen ``weight`` becomes the residual ``W0 - s B0 A0``. The
forward and gradients are LoRA's on that residual; the initial output equals the base's up
to float32 rounding. The SVD is exact (``torch.linalg.svd``) or randomized
(``torch.svd_lowrank`` with ``pissa_niter`` power iterations, peft's ``pissa_niter_N``).

Relative to the pretrained W0 the update is ``s (B A - B0 A0)``: rank 2r. ``A0``, ``B0`` are
kept as persistent buffers (in checkpoints and adapter files), so an adapter file rebuilds
the model from W0 alone and exports to peft as a plain rank-2r LoRA ``[B, -B0]``,
``[A; A0]``, as peft converts PiSSA adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from .lora import LoRALinear

SVDS = ("exact", "randomized")


class PiSSALinear(LoRALinear):
    """PiSSA on a frozen ``nn.Linear`` (whose ``weight`` it turns into the residual, in place).

    Extra args:
        pissa_svd: ``"exact"`` or ``"randomized"``.
        pissa_niter: power iterations of the randomized SVD.
    """

    options = ("pissa_svd", "pissa_niter")

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None,
                 pissa_svd: str = "exact", pissa_niter: int = 4):
        if pissa_svd not in SVDS:
            raise UserError(f"pissa_svd must be one of {SVDS}, got {pissa_svd!r}")
        if isinstance(pissa_niter, bool) or not isinstance(pissa_niter, int) or pissa_niter < 0:
            raise UserError(f"pissa_niter must be an int >= 0, got {pissa_niter!r}")
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.pissa_svd, self.pissa_niter = pissa_svd, pissa_niter
        a0, b0 = self._principal_factors()
        self.register_buffer("pissa_A0", a0.view_as(self.lora_A).clone())
        self.register_buffer("pissa_B0", b0.view_as(self.lora_B).clone())
        with torch.no_grad():
            self.lora_A.copy_(self.pissa_A0)
            self.lora_B.copy_(self.pissa_B0)
            self._add_to_rows(-self.scaling * (b0 @ a0))  # weight <- W0 - s B0 A0

    @torch.no_grad()
    def _principal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A0, B0)`` as ``(k, r, in)``, ``(k, m, r)`` from the top-r SVD of each slice of
        W0, in float32 like peft."""
        w = self._slice_rows(self.weight.detach().float())
        if self.pissa_svd == "exact":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[..., :self.rank], sv[..., :self.rank], vh[..., :self.rank, :]
        else:
            u, sv, v = torch.svd_lowrank(w, q=self.rank, niter=self.pissa_niter)
            vh = v.mT
        root = (sv / self.scaling).sqrt()
        return root.unsqueeze(-1) * vh, u * root.unsqueeze(-2)

    def _add_to_rows(self, blocks: torch.Tensor) -> None:
        """``weight[adapted rows] += blocks`` (``(k, m, in)``), computed in float32."""
        dense = self.weight.float() + self._blocks_to_dense(blocks)
        self.weight.copy_(dense.to(self.weight.dtype))

    def reset_parameters(self) -> None:
        """Back to the principal factors (LoRA's init only while the buffers do not exist)."""
        if not hasattr(self, "pissa_A0"):
            super().reset_parameters()
            return
        with torch.no_grad():
            self.lora_A.copy_(self.pissa_A0)
            self.lora_B.copy_(self.pissa_B0)

    def _initial_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slices:
            return self.pissa_A0, self.pissa_B0
        return self.pissa_A0.unsqueeze(0), self.pissa_B0.unsqueeze(0)

    # --- the update relative to the pretrained W0 ----------------------------------------
    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        a0, b0 = self._initial_factors()
        return torch.cat([a, a0], dim=1), torch.cat([b, -b0], dim=2)

    def pretrained_weight(self) -> torch.Tensor:
        a0, b0 = (t.float() for t in self._initial_factors())
        return self.weight.detach().float() + self._blocks_to_dense(self.scaling * (b0 @ a0))

    def merged_weight(self) -> torch.Tensor:
        """Residual + ``s B A``, as the forward computes it."""
        a, b = (t.detach().float() for t in self.factors())
        return self.weight.detach().float() + self._blocks_to_dense(self.scaling * (b @ a))

    # --- files ---------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "pissa_A0": self.pissa_A0,
                "pissa_B0": self.pissa_B0}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the factors; re-derive the residual from the file's initial factors (a fresh
        randomized SVD, or another machine's exact one, may have chosen other ones)."""
        self._rebase(tensors["pissa_A0"], tensors["pissa_B0"])
        super().load_adapter_tensors(tensors)

    @torch.no_grad()
    def _rebase(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """``weight <- weight + s B0 A0 - s B0' A0'`` when the initial factors change."""
        a0, b0 = a0.to(self.pissa_A0.device), b0.to(self.pissa_B0.device)
        if torch.equal(a0, self.pissa_A0) and torch.equal(b0, self.pissa_B0):
            return
        old_a, old_b = (t.float() for t in self._initial_factors())
        new_a = (a0 if self.slices else a0.unsqueeze(0)).float()
        new_b = (b0 if self.slices else b0.unsqueeze(0)).float()
        self._add_to_rows(self.scaling * (old_b @ old_a - new_b @ new_a))
        self.pissa_A0.copy_(a0)
        self.pissa_B0.copy_(b0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints restore the buffers through load_state_dict: keep the residual in step
        a0, b0 = state_dict.get(prefix + "pissa_A0"), state_dict.get(prefix + "pissa_B0")
        if a0 is not None and b0 is not None and a0.shape == self.pissa_A0.shape \
                and b0.shape == self.pissa_B0.shape:
            self._rebase(a0, b0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", svd={self.pissa_svd}" + (
            f", niter={self.pissa_niter}" if self.pissa_svd == "randomized" else "")
