"""The r x r work of SDS-LoRA and preconditioned LoRA, batched over all layers of a backward.

Both methods multiply their factor gradients by small matrices that depend only on the
factors: SDS-LoRA by ``M = Gram^(-1/2)`` (polar) or ``L^-1`` (qr), preconditioned LoRA by
``(Gram + delta I)^-1``, with ``Gram = A A^T`` or ``B^T B`` (r x r). Computed per layer inside
each layer's backward, that is two tiny factorisations per adapted layer and step (about a
hundred on a ViT-B with all projections adapted): on a GPU each is a few kernel launches, and
``torch.linalg.eigh`` also waits for the device to check its result, so the backward would
stall about a hundred times per step. Here every layer's forward registers its factors in a
*group* (one per kind of work, rank and device); the first backward of the group (the last
layer's) computes the transforms of all members at once: Gram matrices batched by factor
shape, then ONE batched ``eigh`` (or Cholesky / inverse) for the whole group. The other
layers' backwards only look their result up. docs/method.md (section 2.7) has the launch
counts and the measurement.

The numerics are the per-layer ones (float64 Gram, same thresholds); ``transform`` below is
also what the per-layer fallback calls (under ``torch.compile``, where a forward must not
touch Python state, and for callers of the autograd functions without a group).

A group closes when a layer that is already a member runs its forward again (the next
micro-batch or step) or when its first backward runs; parameters cannot change between a
forward and its backward (autograd's saved-tensor check would refuse), so the transforms
always match the factors the forward used.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from typing import NamedTuple

import torch

from ..errors import UserError
from .base import low_rank_product

KINDS = ("polar", "qr", "inv")


class Work(NamedTuple):
    """What to compute from each Gram matrix: ``kind`` in ``KINDS`` and its parameter
    (``eps_rel`` for polar/qr, the damping ``delta`` for inv)."""

    kind: str
    eps: float


def gram(factor: torch.Tensor, side: str) -> torch.Tensor:
    """float64 ``A A^T`` (``side="row"``, A ``(k, r, in)``) or ``B^T B`` ("col", B ``(k, m, r)``).

    float64: in float32 the Gram squares the condition number and weak directions turn to
    noise."""
    f = factor.double()
    return f @ f.mT if side == "row" else f.mT @ f


def transform(g: torch.Tensor, side: str, work: Work) -> torch.Tensor:
    """The r x r matrix ``M`` of each Gram in the batch ``g`` (``(N, r, r)`` float64).

    polar: ``M = Gram^(-1/2)`` on the directions with singular value above ``eps_rel``
    times the largest (zero elsewhere), so ``Q_A = M A`` / ``Q_B = B M`` is an orthonormal
    basis of the factor's numerical range. qr: ``M = L^-1`` (rows) or ``L^-T`` (columns) with
    ``Gram = L L^T``, the sign-fixed thin QR; a rank-deficient factor falls back to polar
    (same subspace). inv: ``M = (Gram + delta I)^-1``.
    """
    if work.kind == "inv":
        eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        return torch.linalg.inv_ex(g + work.eps * eye)[0]
    if work.kind not in ("polar", "qr"):
        raise UserError(f"r x r work must be one of {KINDS}, got {work.kind!r}")
    evals, evecs = torch.linalg.eigh(g)  # ascending
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma > work.eps * sigma[..., -1:]
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    m = (evecs * inv_sigma.unsqueeze(-2)) @ evecs.mT  # Gram^(-1/2) on the kept directions
    if work.kind == "qr":
        chol, info = torch.linalg.cholesky_ex(g)
        full_rank = (keep.all(-1) & (info == 0))[:, None, None]
        eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g)
        l_inv = torch.linalg.solve_triangular(torch.where(full_rank, chol, eye), eye, upper=False)
        # rows: Q_A = L^-1 A;  columns: B = Q R with R = L^T, so Q_B = B L^-T
        m = torch.where(full_rank, l_inv if side == "row" else l_inv.mT, m)
    return m


def factor_transforms(a: torch.Tensor, b: torch.Tensor, work: Work
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_A, M_B)`` of one layer, ``(k, r, r)`` float64 each (the per-layer path)."""
    return transform(gram(a, "row"), "row", work), transform(gram(b, "col"), "col", work)


class _Member:
    """One layer's factors for one backward. Its ticket (kept by the autograd graph) holds it;
    the group only refers to it weakly, so a graph freed without a backward (an evaluation
    under grad, an interrupted step, another model) drops out of the group by itself."""

    __slots__ = ("a", "b", "__weakref__")

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a.detach(), b.detach()


class _Group:
    """Layers whose forwards registered the same kind of r x r work since the group opened."""

    def __init__(self, work: Work) -> None:
        self.members: list[weakref.ref] = []
        self.owners: set[int] = set()
        self.results: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.work = work

    def add(self, owner: int, member: _Member) -> int:
        self.owners.add(owner)
        self.members.append(weakref.ref(member))
        return len(self.members) - 1

    def get(self, index: int, member: _Member) -> tuple[torch.Tensor, torch.Tensor]:
        if self.results is None:
            live = {i: m for i, ref in enumerate(self.members) if (m := ref()) is not None}
            self.members = []
            try:
                self.results = self._compute(live)
            except torch.linalg.LinAlgError:
                # one layer's factors are not finite (a diverged step): every layer computes
                # its own, so the error is raised by the layer it belongs to
                self.results = {}
        if index not in self.results:
            self.results[index] = factor_transforms(member.a, member.b, self.work)
        return self.results[index]

    def _compute(self, live: dict[int, _Member]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        order = list(live)
        sizes = [live[i].a.shape[0] for i in order]
        grams = []
        for side, attr in (("row", "a"), ("col", "b")):
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for j, i in enumerate(order):
                by_shape[tuple(getattr(live[i], attr).shape[1:])].append(j)
            g = [None] * len(order)
            for js in by_shape.values():  # one Gram product per factor shape
                stacked = gram(torch.cat([getattr(live[order[j]], attr) for j in js]), side)
                for j, part in zip(js, stacked.split([sizes[j] for j in js])):
                    g[j] = part
            grams.append(torch.cat(g))
        n = grams[0].shape[0]
        if self.work.kind == "qr":  # side-dependent result: one call per side
            m_a, m_b = transform(grams[0], "row", self.work), transform(grams[1], "col", self.work)
        else:  # symmetric result: ONE batched factorisation for both sides of every layer
            m = transform(torch.cat(grams), "row", self.work)
            m_a, m_b = m[:n], m[n:]
        return dict(zip(order, zip(m_a.split(sizes), m_b.split(sizes))))


class Ticket(NamedTuple):
    group: _Group
    index: int
    member: _Member

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group.get(self.index, self.member)


_local = threading.local()


def register(owner: object, a: torch.Tensor, b: torch.Tensor, work: Work) -> Ticket | None:
    """Join the open group for ``work`` on this rank and device (called by a layer's forward).

    Returns None (per-layer path) when nothing will be differentiated or under
    ``torch.compile``."""
    if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad) \
            or torch.compiler.is_compiling():
        return None
    groups = getattr(_local, "groups", None)
    if groups is None:
        groups = _local.groups = {}
    key = (work, a.shape[-2], a.device)
    group = groups.get(key)
    if group is None or group.results is not None or id(owner) in group.owners:
        group = groups[key] = _Group(work)
    member = _Member(a, b)
    return Ticket(group, group.add(id(owner), member), member)


def transforms_for(ticket: Ticket | None, a: torch.Tensor, b: torch.Tensor, work: Work
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_A, M_B)`` for a backward: from the group when registered, else per layer."""
    if ticket is not None:
        return ticket.transforms()
    return factor_transforms(a, b, work)


class TransformedGradDelta(torch.autograd.Function):
    """``delta = s * B (A x)`` (LoRA's forward, exact input gradient) whose factor gradients
    are LoRA's multiplied by the r x r transforms ``M_A``, ``M_B`` of the factors that this
    layer's group computes in one batched call (``transforms_for``).

    Shapes: x ``(n, in)``, A ``(k, r, in)``, B ``(k, m, r)`` -> delta ``(n, k, m)``. With dY
    ``(n, k, m)`` and ``h = X A^T`` saved by the forward (as LoRA saves it):
        dX = s (dY B) A
        dB = s dY^T X A^T M_A^T = s dY^T (h M_A^T)
        dA = s M_B^T B^T dY^T X = s ((dY B) M_B)^T X     reusing dY B from dX
    SDS-LoRA (docs/method.md section 2): ``M_A A = Q_A`` and ``B M_B = Q_B`` are orthonormal
    bases, so ``dB = s G Q_A^T`` and ``dA = s Q_B^T G``. Preconditioned LoRA: ``M = (Gram +
    delta I)^-1`` (symmetric). Either costs LoRA's thin matmuls plus r x r work; no dense
    ``out x in`` matrix. Reusing h is exact in exact arithmetic; in float32 its rounding is
    amplified by at most cond(A) in A's weakest direction, the same order as the rounding of
    A itself. In reduced precision (autocast) that would not hold, so there ``X (M_A A)^T``
    and ``dY (B M_B)`` are computed from the bases formed in float64 (one more thin matmul).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float, work: Work, ticket):
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
            # M_A, M_B of every layer of this backward come from one batched call
            m_a, m_b = transforms_for(ctx.ticket, lora_a, lora_b, ctx.work)
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
            if h is not None:
                gq = gb @ m_b.to(dt)  # dY Q_B = (dY B) M_B, reusing dY B
            else:  # dY (B M_B): M_B's entries reach 1/sigma_min, too large for half types
                gq = dy @ (lora_b.double() @ m_b).to(dt)
            gq = gq.transpose(0, 1).reshape(-1, k * r)
            grad_a = (s * (gq.mT @ xd)).view(k, r, d_in).to(lora_a.dtype)
        ctx.ticket = None  # release the group's results with this layer's graph
        return grad_x, grad_a, grad_b, None, None, None
