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
from .base import LowRankAdapter

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
        return rxr.TransformedGradDelta.apply(x2d, a, b, self.scaling, work,
                                              rxr.register(self, a, b, work))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", basis={self.basis}"
