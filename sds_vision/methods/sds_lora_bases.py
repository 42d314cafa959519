"""SDS-LoRA, the authors' formulation (method ``sds_lora_bases``; docs/method.md section 4).

    delta W = s (B P_A + P_B A)    P_A: r x in, orthonormal rows;  P_B: out x r, orthonormal cols

``P_A``, ``P_B`` are persistent buffers ``basis_A``, ``basis_B`` (checkpoints and adapter files
hold them). Plain autograd gives the SDS factor gradients ``dB = s G P_A^T``,
``dA = s P_B^T G`` with bases frozen between refreshes. ``refresh_bases`` re-derives them
after an optimizer step by sign-fixed thin QR of ``A^T`` and ``B``; ``BasesSchedule`` (the
engine callback the method brings) decides when, and runs the authors' start-up.

The forward is a rank-2r LoRA, ``B' = [B, P_B]``, ``A' = [P_A; A]``, which is also how the
layer merges and exports to peft.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError
from .base import LowRankAdapter, adapter_modules, low_rank_product

REFRESH = ("authors", "every")
STARTUP = ("authors", "random")
MIN_NORM = 1e-2  # refresh a layer only when every row of A and column of B is this long


def _orthonormal_rows(shape: tuple[int, ...], device, generator=None) -> torch.Tensor:
    """Random ``(k, r, n)`` matrices with orthonormal rows (QR of a Gaussian, sign-fixed)."""
    k, r, n = shape
    g = torch.randn(k, n, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    q = q * torch.where(torch.diagonal(rr, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    return q.mT.to(device=device, dtype=torch.float32)


def signed_qr(m: torch.Tensor) -> torch.Tensor:
    """``Q`` of the thin QR ``m = Q R`` (batched, ``(..., n, r)``) with ``diag(R) > 0``."""
    q, r = torch.linalg.qr(m.double())
    return q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


class SDSLoRABasesLinear(LowRankAdapter):
    """The authors' SDS-LoRA: ``W0 + s (B P_A + P_B A)`` with frozen orthonormal bases.

    Starts with ``A = B = 0`` (the initial output is the base's) and random orthonormal
    bases, seeded by the global torch RNG like any init.

    Extra args:
        bases_refresh: ``"authors"`` or ``"every"`` (``BasesSchedule``).
        bases_startup: ``"authors"`` (pre-phase + SVD split) or ``"random"``.
    """

    options = ("bases_refresh", "bases_startup")

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None,
                 bases_refresh: str = "authors", bases_startup: str = "authors"):
        if bases_refresh not in REFRESH:
            raise UserError(f"bases_refresh must be one of {REFRESH}, got {bases_refresh!r}")
        if bases_startup not in STARTUP:
            raise UserError(f"bases_startup must be one of {STARTUP}, got {bases_startup!r}")
        super().__init__(base, rank, alpha, dropout, rslora, slices)
        self.bases_refresh, self.bases_startup = bases_refresh, bases_startup
        k, m = self.lora_B.shape[-3] if self.slices else 1, self.lora_B.shape[-2]
        dev = self.lora_A.device
        p_a = _orthonormal_rows((k, rank, self.in_features), dev)
        p_b = _orthonormal_rows((k, rank, m), dev).mT
        self.register_buffer("basis_A", p_a.view_as(self.lora_A).clone())
        self.register_buffer("basis_B", p_b.reshape(self.lora_B.shape).clone())

    def reset_parameters(self) -> None:
        """A = B = 0: the delta starts at zero whatever the bases."""
        nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_A`` as ``(k, r, in)`` and ``P_B`` as ``(k, m, r)``."""
        if self.slices:
            return self.basis_A, self.basis_B
        return self.basis_A.unsqueeze(0), self.basis_B.unsqueeze(0)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        p_a, p_b = self.bases()
        return torch.cat([p_a, a], dim=1), torch.cat([b, p_b], dim=2)

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        a2, b2 = self.lowrank_factors()  # autograd: dB = s G P_A^T, dA = s P_B^T G
        return low_rank_product(x2d, a2, b2, self.scaling)[1]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "basis_A": self.basis_A, "basis_B": self.basis_B}

    @torch.no_grad()
    def set_bases(self, p_a: torch.Tensor, p_b: torch.Tensor) -> None:
        """Set ``P_A`` ``(k, r, in)`` and ``P_B`` ``(k, m, r)`` (any float dtype)."""
        self.basis_A.copy_(p_a.reshape(self.basis_A.shape))
        self.basis_B.copy_(p_b.reshape(self.basis_B.shape))

    def refresh_bases(self) -> None:
        """Re-derive the bases from the current factors (see ``refresh_bases`` below)."""
        refresh_bases([self])

    @torch.no_grad()
    def update_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-r SVD ``U S V^T`` of the current update ``B P_A + P_B A`` per slice:
        ``U`` ``(k, m, r)``, ``S`` ``(k, r)``, ``V^T`` ``(k, r, in)``, float64.

        The update has rank <= 2r (``[B, P_B] [P_A; A]``), so its SVD is exact from the
        QR factors of the two thin matrices and the SVD of a 2r x 2r core."""
        a2, b2 = self.lowrank_factors()
        q_b, r_b = torch.linalg.qr(b2.double())
        q_a, r_a = torch.linalg.qr(a2.double().mT)
        u, sv, vh = torch.linalg.svd(r_b @ r_a.mT)
        r = self.rank
        return (q_b @ u)[..., :r], sv[..., :r], (vh @ q_a.mT)[..., :r, :]

    @classmethod
    def training_callbacks(cls, model: nn.Module) -> list:
        return [BasesSchedule.for_model(model)]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", refresh={self.bases_refresh}, "
                                       f"startup={self.bases_startup}")


@torch.no_grad()
def refresh_bases(modules: Iterable[SDSLoRABasesLinear]) -> None:
    """Sign-fixed thin QR of each slice's ``A^T`` and ``B`` -> new ``P_A``, ``P_B``.

    ``A^T = Q R`` gives ``P_A = Q^T``, ``B = Q R`` gives ``P_B = Q`` (``diag(R) > 0``, float64).
    A slice keeps its bases unless every row norm of A and column norm of B exceeds
    ``MIN_NORM`` (chosen on the device, without a host sync). Factors of equal shape across
    layers are factorised in one batched call.
    """
    groups: dict[tuple, list[SDSLoRABasesLinear]] = defaultdict(list)
    for m in modules:
        groups[(tuple(m.lora_A.shape), tuple(m.lora_B.shape), m.lora_A.device)].append(m)
    for mods in groups.values():
        a = torch.cat([m.factors()[0] for m in mods])  # (sum k, r, in)
        b = torch.cat([m.factors()[1] for m in mods])
        p_a, p_b = (torch.cat(t) for t in zip(*(m.bases() for m in mods)))
        ok = (a.norm(dim=-1) > MIN_NORM).all(-1) & (b.norm(dim=-2) > MIN_NORM).all(-1)
        new_a = torch.where(ok[:, None, None], signed_qr(a.mT).mT, p_a.double())
        new_b = torch.where(ok[:, None, None], signed_qr(b), p_b.double())
        sizes = [m.factors()[0].shape[0] for m in mods]
        for m, na, nb in zip(mods, new_a.split(sizes), new_b.split(sizes)):
            m.set_bases(na, nb)


class BasesSchedule:
    """Engine callback of ``sds_lora_bases``: the start-up and the base refreshes.

    Start-up ``authors`` (fresh runs only; a resumed run restores its bases from the
    checkpoint): ``PRE_STEPS`` optimizer steps at the peak lr before the main training
    (``ctx.run_steps``, outside the schedule); after every ``SVD_EVERY`` of them the bases are
    set to the singular vectors of each layer's update (``P_B = U``, ``P_A = V^T``), A and B are
    zeroed, the head is restored to its state before the pre-phase and the optimizer state is
    cleared. No QR refresh runs in the pre-phase. After main step ``SPLIT_STEP`` the update
    ``U S V^T`` is split: ``P_B = U``, ``P_A = V^T``, ``A = S V^T / 2``, ``B = U S / 2``, optimizer
    state cleared; QR refreshes start after it.

    Refresh ``every``: after every optimizer step; ``authors``: after step ``t`` when
    ``t % (t // (T // 5) + 1) == 0`` (``T`` = the run's steps): every step in the first fifth,
    every 2nd in the second, ..., every 5th in the last.
    """

    PRE_STEPS = 50
    SVD_EVERY = 10
    SPLIT_STEP = 10

    def __init__(self, modules: Sequence[SDSLoRABasesLinear]):
        if not modules:
            raise UserError("BasesSchedule needs at least one sds_lora_bases layer")
        self.modules = list(modules)
        first = self.modules[0]
        self.refresh, self.startup = first.bases_refresh, first.bases_startup
        if any((m.bases_refresh, m.bases_startup) != (self.refresh, self.startup)
               for m in self.modules):
            raise UserError("all sds_lora_bases layers of a model must share refresh and startup")

    @classmethod
    def for_model(cls, model: nn.Module) -> "BasesSchedule":
        return cls([m for _, m in adapter_modules(model) if isinstance(m, SDSLoRABasesLinear)])

    # --- the decisions, usable without the engine ----------------------------------------
    def refreshes_after(self, step: int, total_steps: int) -> bool:
        """Whether the QR refresh runs after optimizer step ``step`` (1-based)."""
        if self.startup == "authors" and step <= self.SPLIT_STEP:
            return False
        if self.refresh == "every":
            return True
        return step % (step // max(total_steps // 5, 1) + 1) == 0

    def pre_phase(self, run_steps, optimizer: torch.optim.Optimizer,
                  head: nn.Module | None = None) -> None:
        """The authors' pre-phase; ``run_steps(n)`` makes n optimizer steps."""
        saved = {k: v.detach().clone() for k, v in head.state_dict().items()} if head else None
        for _ in range(self.PRE_STEPS // self.SVD_EVERY):
            run_steps(self.SVD_EVERY)
            with torch.no_grad():
                for m in self.modules:
                    u, _, vh = m.update_svd()
                    m.set_bases(vh, u)
                    m.lora_A.zero_()
                    m.lora_B.zero_()
                if head is not None:
                    head.load_state_dict(saved)
            optimizer.state.clear()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Work after optimizer step ``step``: the split (authors start-up) or a refresh."""
        if self.startup == "authors" and step == self.SPLIT_STEP:
            for m in self.modules:
                u, sv, vh = m.update_svd()
                m.set_bases(vh, u)
                m.lora_A.copy_((0.5 * sv.unsqueeze(-1) * vh).view_as(m.lora_A))
                m.lora_B.copy_((0.5 * u * sv.unsqueeze(-2)).view_as(m.lora_B))
            optimizer.state.clear()
        elif self.refreshes_after(step, total_steps):
            refresh_bases(self.modules)

    # --- engine hooks --------------------------------------------------------------------
    def on_train_start(self, ctx) -> None:
        if ctx.fresh and self.startup == "authors":
            head = ctx.model.get_classifier() if hasattr(ctx.model, "get_classifier") else None
            self.pre_phase(ctx.run_steps, ctx.optimizer,
                           head if isinstance(head, nn.Module) else None)

    def on_after_optimizer_step(self, ctx) -> None:
        self.after_step(ctx.step, ctx.total_steps, ctx.optimizer)
