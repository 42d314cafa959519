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


def orthonormal_basis(factor: torch.Tensor, side: str, basis: str = "polar",
                      eps_rel: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of a batch of factors' numerical range, from the r x r Gram.

    Args:
        factor: ``(k, r, in)`` for ``side="row"`` (the A factors) or ``(k, out, r)`` for
            ``side="col"`` (the B factors).
        side: ``"row"`` -> ``Q`` with orthonormal rows spanning A's row space (``Q Q^T = I``);
            ``"col"`` -> ``Q`` with orthonormal columns spanning B's column space.
        basis: ``"polar"`` (``U V^T`` of the thin SVD, invariant to the singular values) or
            ``"qr"`` (sign-fixed thin QR, diag(R) > 0).
        eps_rel: directions with singular value ``<= eps_rel * sigma_max`` get no basis
            vector (all of them for a zero factor), so ``Q`` spans the numerical range only.

    Returns:
        ``Q`` with the factor's shape and dtype.

    The Gram matrix and its eigendecomposition are formed in float64: in float32 the Gram
    squares the condition number and small directions would turn to noise. QR is undefined
    on a rank-deficient factor; there the polar basis of the numerical range is used (same
    subspace, which is all that the QR variant promises).
    """
    f = factor.double()
    gram = f @ f.mT if side == "row" else f.mT @ f  # (k, r, r)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma > eps_rel * sigma[..., -1:]
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
    # Gram^(-1/2) restricted to the kept eigenvectors.
    inv_sqrt = (evecs * inv_sigma.unsqueeze(-2)) @ evecs.mT
    q = inv_sqrt @ f if side == "row" else f @ inv_sqrt
    if basis == "qr":
        # Sign-fixed QR via Cholesky of the Gram: A A^T = L L^T, Q_A = L^-1 A (diag(L) > 0).
        chol, info = torch.linalg.cholesky_ex(gram)
        full_rank = keep.all(-1) & (info == 0)
        eye = torch.eye(gram.shape[-1], dtype=f.dtype, device=f.device)
        chol = torch.where(full_rank[:, None, None], chol, eye)
        if side == "row":
            q_qr = torch.linalg.solve_triangular(chol, f, upper=False)
        else:  # B = Q R with R = L^T  ->  Q = B L^-T
            q_qr = torch.linalg.solve_triangular(chol.mT, f, upper=True, left=False)
        q = torch.where(full_rank[:, None, None], q_qr, q)
    elif basis != "polar":
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    return q.to(factor.dtype)


class _SDSLoRADelta(torch.autograd.Function):
    """``delta = s * B (A x)`` with SDS factor gradients and the exact input gradient.

    Shapes: x ``(n, in)``, A ``(k, r, in)``, B ``(k, m, r)`` -> delta ``(n, k, m)``.
    Backward (METHOD.md section 2), with dY ``(n, k, m)``:
        dX = s * (dY B) A,   dB = s * dY^T (X Q_A^T),   dA = s * (dY Q_B)^T X
    No dense ``out x in`` matrix is formed; bases are computed only when needed.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float, basis: str, eps_rel: float):
        k, r, d_in = lora_a.shape
        h = (x @ lora_a.reshape(k * r, d_in).mT).view(-1, k, r)  # autocast applies here
        out = torch.einsum("nkr,kmr->nkm", h, lora_b.to(h.dtype)) * scaling
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.scaling, ctx.basis, ctx.eps_rel = scaling, basis, eps_rel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b = ctx.saved_tensors
        s, dt = ctx.scaling, grad_out.dtype  # compute in the forward's (autocast) dtype
        k, r, d_in = lora_a.shape
        a, b, xd = lora_a.to(dt), lora_b.to(dt), x.to(dt)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            gb = torch.einsum("nkm,kmr->nkr", grad_out, b).reshape(-1, k * r)
            grad_x = (s * (gb @ a.reshape(k * r, d_in))).to(x.dtype)
        if ctx.needs_input_grad[2]:
            q_a = orthonormal_basis(lora_a, "row", ctx.basis, ctx.eps_rel).to(dt)
            xq = (xd @ q_a.reshape(k * r, d_in).mT).view(-1, k, r)
            grad_b = (s * torch.einsum("nkm,nkr->kmr", grad_out, xq)).to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            q_b = orthonormal_basis(lora_b, "col", ctx.basis, ctx.eps_rel).to(dt)
            gq = torch.einsum("nkm,kmr->nkr", grad_out, q_b).reshape(-1, k * r)
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
            return out + delta.view(out.shape)
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
        k, r, d_in = a.shape
        h = (x2d @ a.reshape(k * r, d_in).mT).view(-1, k, r)
        return torch.einsum("nkr,kmr->nkm", h, b.to(h.dtype)) * self.scaling


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
