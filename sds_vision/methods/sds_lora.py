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
    f = factor.double()
    gram = f @ f.mT if side == "row" else f.mT @ f  # (k, r, r)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma > eps_rel * sigma[..., -1:]
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
    m = (evecs * inv_sigma.unsqueeze(-2)) @ evecs.mT  # Gram^(-1/2) on the kept directions
    if basis == "qr":
        chol, info = torch.linalg.cholesky_ex(gram)
        full_rank = (keep.all(-1) & (info == 0))[:, None, None]
        eye = torch.eye(gram.shape[-1], dtype=f.dtype, device=f.device).expand_as(gram)
        l_inv = torch.linalg.solve_triangular(torch.where(full_rank, chol, eye), eye, upper=False)
        # rows: Q_A = L^-1 A;  columns: B = Q R with R = L^T, so Q_B = B L^-T
        m = torch.where(full_rank, l_inv if side == "row" else l_inv.mT, m)
    return m


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
    def forward(ctx, x, lora_a, lora_b, scaling: float, basis: str, eps_rel: float):
        h, out = low_rank_product(x, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, h if h.dtype == torch.float32 else None, lora_a, lora_b)
        ctx.scaling, ctx.basis, ctx.eps_rel = scaling, basis, eps_rel
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
        if ctx.needs_input_grad[2]:
            m_a = basis_transform(lora_a, "row", ctx.basis, ctx.eps_rel)
            if h is not None:
                xq = h @ m_a.to(dt).mT
            else:
                q_a = (m_a @ lora_a.double()).to(dt)
                xq = (xd @ q_a.reshape(k * r, d_in).mT).view(-1, k, r).transpose(0, 1)
            grad_b = (s * (dy.mT @ xq)).to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            m_b = basis_transform(lora_b, "col", ctx.basis, ctx.eps_rel).to(dt)
            gq = (gb @ m_b).transpose(0, 1).reshape(-1, k * r)  # dY Q_B
            grad_a = (s * (gq.mT @ xd)).view(k, r, d_in).to(lora_a.dtype)
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
        return _SDSLoRADelta.apply(x2d, a, b, self.scaling, self.basis, self.eps_rel)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", basis={self.basis}"
