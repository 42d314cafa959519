"""Riemannian-preconditioned LoRA (Zhang & Pilanci 2024), method ``precond_lora``.

LoRA's forward; LoRA's factor gradients multiplied by the inverse (damped) Gram of the
other factor before the optimizer sees them:

    dB = s G A^T (A A^T + delta I)^-1        dA = (B^T B + delta I)^-1 s B^T G

with ``delta = 1e-6`` (the authors' comparison code). With plain SGD this is their scaled
GD; with AdamW, AdamW on the preconditioned gradients. One plain gradient step then moves
``delta W`` by ``G P_A + P_B G`` (projections, no singular values; docs/method.md section 3).
The input gradient is LoRA's. Like SDS-LoRA's, the r x r inverses of all layers are computed
in one batched call per backward (``rxr.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import rxr
from .base import LowRankAdapter, low_rank_product


class _PrecondLoRADelta(torch.autograd.Function):
    """``delta = s * B (A x)`` with preconditioned factor gradients, exact input gradient.

    Shapes as ``_SDSLoRADelta``. With ``P_A = (A A^T + delta I)^-1``, ``P_B = (B^T B + delta I)^-1``
    and ``h = X A^T`` saved by the forward (as LoRA saves it):
        dX = s (dY B) A
        dB = s (dY^T h) P_A            LoRA's dB, times an r x r matrix
        dA = P_B (s (dY B)^T X)        LoRA's dA, times an r x r matrix
    Under autocast ``h`` is not saved: ``dB = s dY^T (X (P_A A)^T)`` with the well-scaled
    ``P_A A`` in the matmul, so bf16 rounding in A's weak directions is not amplified by
    ``P_A`` afterwards (as in SDS-LoRA's backward).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float, work: rxr.Work, ticket):
        h, out = low_rank_product(x, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, h if h.dtype == torch.float32 else None, lora_a, lora_b)
        ctx.scaling, ctx.work, ctx.ticket = scaling, work, ticket
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, lora_a, lora_b = ctx.saved_tensors
        s, dt = ctx.scaling, grad_out.dtype
        k, r, d_in = lora_a.shape
        dy = grad_out.transpose(0, 1)  # (k, n, m)
        a, xd = lora_a.to(dt), x.to(dt)
        gb = dy @ lora_b.to(dt)  # dY B: (k, n, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ((s * gb).transpose(0, 1).reshape(-1, k * r) @ a.reshape(k * r, d_in))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            p_a, p_b = rxr.transforms_for(ctx.ticket, lora_a, lora_b, ctx.work)
        if ctx.needs_input_grad[2]:
            if h is not None:
                grad_b = (s * (h.mT @ dy)).mT @ p_a.to(h.dtype)  # (h^T dY)^T: see SDS-LoRA
            else:
                pa_a = (p_a @ lora_a.double()).to(dt)
                xq = (xd @ pa_a.reshape(k * r, d_in).mT).view(-1, k, r).transpose(0, 1)
                grad_b = (s * (xq.mT @ dy)).mT
            grad_b = grad_b.contiguous().to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            lora_grad = (s * (gb.transpose(0, 1).reshape(-1, k * r).mT @ xd)).view(k, r, d_in)
            grad_a = (p_b.to(torch.float32) @ lora_grad.float()).to(lora_a.dtype)
        ctx.ticket = None
        return grad_x, grad_a, grad_b, None, None, None


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
        return _PrecondLoRADelta.apply(x2d, a, b, self.scaling, work,
                                       rxr.register(self, a, b, work))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", delta={self.delta:g}"
