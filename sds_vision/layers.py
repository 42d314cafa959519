"""Low-rank adapters for ``nn.Linear``: LoRA and SDS-LoRA.

Both layers compute exactly LoRA's forward, ``y = W0 x + b + s * B (A x)``, keep the frozen
base parameters under their original names (``weight``, ``bias``) so a timm checkpoint loads
unchanged, and own ``lora_A`` / ``lora_B``. They differ only in the factor gradients:

* ``LoRALinear``: plain autograd, ``dB = s G A^T``, ``dA = s B^T G`` with ``G = dY^T X``.
* ``SDSLoRALinear``: ``dB = s G Q_A^T``, ``dA = s Q_B^T G`` where ``Q_A`` / ``Q_B`` are
  orthonormal bases of the factors' row / column spaces (polar factor by default), so the
  singular values of A and B no longer scale the update. The input gradient stays exact.
  See ``shared/design/METHOD.md`` for the formulation.

Fused projections (timm's ``attn.qkv``) can be adapted on output *slices* only: ``slices``
is a sequence of ``(start, stop)`` row ranges of equal length, each with its own (A, B) pair,
exactly as if q and v were separate layers. Then ``lora_A`` is ``(k, r, in)`` and ``lora_B``
is ``(k, m, r)`` for ``k`` slices of ``m`` rows; rows outside the slices get an exactly zero
delta. Without slices the shapes are LoRA's usual ``(r, in)`` and ``(out, r)``.

Dtype rule (the one place it is written down): adapter parameters are always float32,
whatever the base weight's dtype. Under autocast the adapter matmuls follow autocast; without
autocast the adapter branch runs in float32 and its result is cast to the base output dtype.
Merging (``delta_weight``) is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
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


def _low_rank(x2d, lora_a, lora_b, scaling):
    """``h = X A^T`` as ``(k, n, r)`` and ``s * B h`` as ``(n, k, m)``; autocast applies."""
    k, r, d_in = lora_a.shape
    h = (x2d @ lora_a.reshape(k * r, d_in).mT).view(-1, k, r).transpose(0, 1)
    out = h @ (scaling * lora_b).to(h.dtype).mT  # scale the small factor, not the output
    return h, out.transpose(0, 1)


class _SDSLoRADelta(torch.autograd.Function):
    """``delta = s * B (A x)`` with SDS factor gradients and the exact input gradient.

    Shapes: x ``(n, in)``, A ``(k, r, in)``, B ``(k, m, r)`` -> delta ``(n, k, m)``.
    Backward (METHOD.md section 2), with dY ``(n, k, m)`` and ``Q_A = M_A A``, ``Q_B = B M_B``:
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
        h, out = _low_rank(x, lora_a, lora_b, scaling)
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


def _check_slices(slices: Sequence[tuple[int, int]], out_features: int) -> list[tuple[int, int]]:
    spans = sorted((int(a), int(b)) for a, b in slices)
    if not spans:
        raise ValueError("slices: expected at least one (start, stop) row range")
    if len({b - a for a, b in spans}) != 1:
        raise ValueError(f"slices: all row ranges must have equal length, got {spans}")
    for (a, b), nxt in zip(spans, spans[1:] + [(out_features, out_features)]):
        if not 0 <= a < b <= nxt[0] <= out_features:
            raise ValueError(f"slices: {spans} must be disjoint ranges within [0, {out_features})")
    return spans


class LowRankAdapter(nn.Module):
    """Shared structure of LoRA and SDS-LoRA on a frozen ``nn.Linear``.

    Args:
        base: the linear layer to adapt; its ``weight``/``bias`` are reused (frozen).
        rank: adapter rank r, ``1 <= r <= min(in, rows per slice)``.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scaling 1).
        dropout: dropout on the adapter branch input.
        rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        slices: optional ``(start, stop)`` output row ranges (equal length) to adapt, e.g.
            q and v of a fused qkv: ``[(0, d), (2 * d, 3 * d)]``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = _check_slices(slices, self.out_features) if slices is not None else None
        rows = self.slices[0][1] - self.slices[0][0] if self.slices else self.out_features
        if not isinstance(rank, int) or not 1 <= rank <= min(self.in_features, rows):
            raise ValueError(f"rank must be an int in [1, {min(self.in_features, rows)}] for a "
                             f"{self.in_features}->{rows} projection, got {rank!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.rslora = rslora
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        k = len(self.slices) if self.slices else 1
        a_shape = (k, rank, self.in_features) if self.slices else (rank, self.in_features)
        b_shape = (k, rows, rank) if self.slices else (rows, rank)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=dev, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.slices:
            idx = torch.cat([torch.arange(a, b) for a, b in self.slices])
            self.register_buffer("slice_rows", idx.to(dev), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LoRA init: A Kaiming-uniform (as nn.Linear), B zeros, so the delta starts at 0."""
        for a in self.lora_A.view(-1, self.rank, self.in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A as ``(k, r, in)`` and B as ``(k, m, r)``, views of the parameters."""
        if self.slices:
            return self.lora_A, self.lora_B
        return self.lora_A.unsqueeze(0), self.lora_B.unsqueeze(0)

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        """``s * B (A x)`` for flattened tokens -> ``(n, k, m)``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` as a dense ``(out, in)`` float32 matrix (zero outside the slices)."""
        a, b = self._factors()
        blocks = self.scaling * (b.float() @ a.float())  # (k, m, in)
        if not self.slices:
            return blocks[0]
        delta = blocks.new_zeros(self.out_features, self.in_features)
        return delta.index_copy(0, self.slice_rows, blocks.reshape(-1, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        xa = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            xa = xa.to(self.lora_A.dtype)
        delta = self._delta(xa.reshape(-1, self.in_features)).to(out.dtype)
        if not self.slices:
            return out + delta.reshape(out.shape)
        flat = out.reshape(-1, self.out_features)
        return flat.index_add(1, self.slice_rows, delta.flatten(1)).view(out.shape)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"rank={self.rank}, scaling={self.scaling:g}")
        return s + (f", slices={self.slices}" if self.slices else "")


class LoRALinear(LowRankAdapter):
    """LoRA (Hu et al., 2021): factor gradients come from plain autograd."""

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return _low_rank(x2d, a, b, self.scaling)[1]


class SDSLoRALinear(LowRankAdapter):
    """SDS-LoRA: LoRA's forward; factor gradients through orthonormal bases of the factors.

    Extra args:
        basis: ``"polar"`` (default) or ``"qr"``, see ``orthonormal_basis``.
        eps_rel: relative singular-value threshold below which a direction gets no basis
            vector (rank-deficient factors, including the B = 0 init: first step dA = 0).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None,
                 basis: str = "polar", eps_rel: float = 1e-6):
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.basis, self.eps_rel = basis, eps_rel

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return _SDSLoRADelta.apply(x2d, a, b, self.scaling, self.basis, self.eps_rel)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", basis={self.basis}"


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LowRankAdapter]]:
    """Yield ``(name, module)`` for every adapter layer in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankAdapter):
            yield name, mod
