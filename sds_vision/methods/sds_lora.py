"""SDS-LoRA, exact-forward reading (method ``sds_lora``).

The forward is exactly LoRA's, ``y = W0 x + s B (A x)``, so a trained adapter is a plain
LoRA adapter. Only the factor gradients change: ``dB = s G Q_A^T``, ``dA = s Q_B^T G``
where ``Q_A`` / ``Q_B`` are orthonormal bases of the factors' row / column spaces (polar
factor by default), so the singular values of A and B no longer scale the factor
gradients. The input gradient stays exact. Derivation and invariants: docs/method.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from . import rxr
from .base import LowRankAdapter, low_rank_product

BASES = ("polar", "qr")


def basis_transform(factor: torch.Tensor, side: str, basis: str = "polar",
                    eps_rel: float = 1e-6) -> torch.Tensor:
    """The ``r x r`` matrix ``M`` with ``Q_A = M A`` (``side="row"``) or ``Q_B = B M`` ("col").

    ``Q`` is an orthonormal basis of the factor's numerical range (see ``orthonormal_basis``).
    Every such basis is the factor times an ``r x r`` matrix, which lets the backward reuse
    LoRA's thin products (``X A^T`` and ``dY B``) instead of forming new ones.

    Args:
        factor: ``(k, r, in)`` for ``side="row"`` (A factors) or ``(k, out, r)`` for
            ``side="col"`` (B factors).
        side: ``"row"`` or ``"col"``.
        basis: ``"polar"`` -> ``M = (A A^T)^(-1/2)`` (``Q = U V^T`` of the thin SVD, invariant
            to the singular values); ``"qr"`` -> ``M = L^-1`` (``A A^T = L L^T``), the
            sign-fixed thin QR (diag(R) > 0).
        eps_rel: directions with singular value ``<= eps_rel * sigma_max`` get no basis
            vector (all of them for a zero factor): ``Q`` spans the numerical range only.

    Returns:
        ``M`` as ``(k, r, r)`` float64.

    The Gram matrix and its eigendecomposition are formed in float64: in float32 the Gram
    squares the condition number and small directions would turn to noise. QR is undefined
    on a rank-deficient factor; there the polar basis of the numerical range is used (same
    subspace, which is all the QR variant promises).
    """
    if basis not in BASES:
        raise UserError(f"basis must be one of {BASES}, got {basis!r}")
    return rxr.transform(rxr.gram(factor, side), side, rxr.Work(basis, eps_rel))


def orthonormal_basis(factor: torch.Tensor, side: str, basis: str = "polar",
                      eps_rel: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis ``Q`` of a batch of factors, same shape and dtype as ``factor``.

    ``side="row"``: ``Q`` has orthonormal rows spanning A's row space (``Q Q^T = I``);
    ``side="col"``: orthonormal columns spanning B's column space. See ``basis_transform``.
    """
    m = basis_transform(factor, side, basis, eps_rel)
    q = m @ factor.double() if side == "row" else factor.double() @ m
    return q.to(factor.dtype)


class _SDSLoRADelta(torch.autograd.Function):
    """``delta = s * B (A x)`` with SDS factor gradients and the exact input gradient.

    Shapes: x ``(n, in)``, A ``(k, r, in)``, B ``(k, m, r)`` -> delta ``(n, k, m)``.
    Backward (docs/method.md), with dY ``(n, k, m)`` and ``Q_A = M_A A``, ``Q_B = B M_B``:
        dX = s (dY B) A
        dB = s dY^T (X Q_A^T) = s dY^T (h M_A^T)        with h = X A^T saved by the forward
        dA = s (dY Q_B)^T X   = s ((dY B) M_B)^T X     reusing dY B from dX
    So SDS-LoRA costs LoRA's thin matmuls plus r x r work; no dense ``out x in`` matrix.
    Reusing h is exact in exact arithmetic; in float32 its rounding is amplified by at most
    cond(A) in A's weakest direction, the same order as the rounding of A itself. In reduced
    precision (autocast) that would not hold, so there ``X Q_A^T`` is recomputed directly.
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
        s, dt = ctx.scaling, grad_out.dtype  # compute in the forward's (autocast) dtype
        k, r, d_in = lora_a.shape
        dy = grad_out.transpose(0, 1)  # (k, n, m)
        a, xd = lora_a.to(dt), x.to(dt)
        gb = dy @ lora_b.to(dt)  # dY B: (k, n, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ((s * gb).transpose(0, 1).reshape(-1, k * r) @ a.reshape(k * r, d_in))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # M_A, M_B of every layer of this backward come from one batched call (rxr.py)
            m_a, m_b = rxr.transforms_for(ctx.ticket, lora_a, lora_b, ctx.work)
        if ctx.needs_input_grad[2]:
            if h is not None:
                xq = h @ m_a.to(dt).mT
            else:
                q_a = (m_a @ lora_a.double()).to(dt)
                xq = (xd @ q_a.reshape(k * r, d_in).mT).view(-1, k, r).transpose(0, 1)
            # (xq^T dY)^T, not dY^T xq: a BLAS product with the long n as the inner dimension
            # and the skinny r as rows runs ~8x faster on CPU than the transposed one
            grad_b = (s * (xq.mT @ dy)).mT.contiguous().to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            gq = (gb @ m_b.to(dt)).transpose(0, 1).reshape(-1, k * r)  # dY Q_B
            grad_a = (s * (gq.mT @ xd)).view(k, r, d_in).to(lora_a.dtype)
        ctx.ticket = None  # release the group's results with this layer's graph
        return grad_x, grad_a, grad_b, None, None, None


class SDSLoRALinear(LowRankAdapter):
    """SDS-LoRA: LoRA's forward; factor gradients through orthonormal bases of the factors.

    Extra args:
        basis: ``"polar"`` (default) or ``"qr"``, see ``orthonormal_basis``.
        eps_rel: relative singular-value threshold below which a direction gets no basis
            vector (rank-deficient factors, including the B = 0 init: first step dA = 0).
    """

    options = ("basis",)

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None,
                 basis: str = "polar", eps_rel: float = 1e-6):
        if basis not in BASES:
            raise UserError(f"basis must be one of {BASES}, got {basis!r}")
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.basis, self.eps_rel = basis, eps_rel

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        work = rxr.Work(self.basis, self.eps_rel)
        return _SDSLoRADelta.apply(x2d, a, b, self.scaling, work, rxr.register(self, a, b, work))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", basis={self.basis}"
