"""Shared plumbing of every low-rank adapter on a frozen ``nn.Linear``.

A ``LowRankAdapter`` keeps the frozen base parameters under their original names
(``weight``, ``bias``), so a timm checkpoint loads unchanged, and owns the factors
``lora_A`` / ``lora_B``. A method subclasses it and overrides ``_delta`` (the adapter
branch of the forward) and, where its math differs, the hooks below.

Fused projections (timm's ``attn.qkv``) can be adapted on output *slices* only: ``slices``
is a sequence of ``(start, stop)`` row ranges of equal length, each with its own (A, B)
pair, exactly as if q and v were separate layers. Then ``lora_A`` is ``(k, r, in)`` and
``lora_B`` is ``(k, m, r)`` for ``k`` slices of ``m`` rows; rows outside the slices get an
exactly zero delta. Without slices the shapes are LoRA's usual ``(r, in)`` and ``(out, r)``.

Dtype rule (the one place it is written down): adapter parameters are always float32,
whatever the base weight's dtype. Under autocast the adapter matmuls follow autocast;
without autocast the adapter branch runs in float32 and its result is cast to the base
output dtype. Merging (``delta_weight``) is computed in float32.

Hooks a method may override (``W0`` is the pretrained weight; every method but PiSSA keeps
it as ``weight``):
    ``options``               AdapterConfig fields its constructor takes beyond the shared ones
    ``_delta(x2d)``           the adapter branch for flattened tokens -> ``(n, k, m)``
    ``lowrank_factors()``     ``(A', B')`` per slice with ``delta = s B' A'`` relative to W0, or
                              None when the update is not low-rank (DoRA)
    ``delta_weight()``        the dense update, so ``pretrained_weight() + delta_weight()`` is
                              ``merged_weight()``, the weight of the equivalent ``nn.Linear``
    ``pretrained_weight()``   W0 (PiSSA keeps a residual as ``weight``)
    ``adapter_tensors()``     what an adapter file holds for this layer (peft-style suffixes);
    ``load_adapter_tensors()`` puts them back (PiSSA re-derives its residual)
    ``peft_lora()``           (A, B) of an equivalent plain LoRA relative to W0, for export;
    ``peft_extra()``, ``peft_options``  further peft tensors and config keys (DoRA)
    ``param_lr_scales()``     learning-rate multipliers per parameter name (LoRA+)
    ``training_callbacks()``  engine callbacks the method needs (refreshes, start-up phases)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import UserError


def check_slices(slices: Sequence[tuple[int, int]], out_features: int) -> list[tuple[int, int]]:
    spans = sorted((int(a), int(b)) for a, b in slices)
    if not spans:
        raise UserError("slices: expected at least one (start, stop) row range")
    if len({b - a for a, b in spans}) != 1:
        raise UserError(f"slices: all row ranges must have equal length, got {spans}")
    for (a, b), nxt in zip(spans, spans[1:] + [(out_features, out_features)]):
        if not 0 <= a < b <= nxt[0] <= out_features:
            raise UserError(f"slices: {spans} must be disjoint ranges within [0, {out_features})")
    return spans


def low_rank_product(x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = X A^T`` as ``(k, n, r)`` and ``s * B h`` as ``(n, k, m)``; autocast applies."""
    k, r, d_in = lora_a.shape
    h = (x2d @ lora_a.reshape(k * r, d_in).mT).view(-1, k, r).transpose(0, 1)
    out = h @ (scaling * lora_b).to(h.dtype).mT  # scale the small factor, not the output
    return h, out.transpose(0, 1)


class LowRankAdapter(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the linear layer to adapt; its ``weight``/``bias`` are reused (frozen).
        rank: adapter rank r, ``1 <= r <= min(in, rows per slice)``.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scaling 1).
        dropout: dropout on the adapter branch input.
        rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        slices: optional ``(start, stop)`` output row ranges (equal length) to adapt, e.g.
            q and v of a fused qkv: ``[(0, d), (2 * d, 3 * d)]``.
    """

    options: ClassVar[tuple[str, ...]] = ()
    peft_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False,
                 slices: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = check_slices(slices, self.out_features) if slices is not None else None
        rows = self.slices[0][1] - self.slices[0][0] if self.slices else self.out_features
        if not isinstance(rank, int) or not 1 <= rank <= min(self.in_features, rows):
            raise UserError(f"rank must be an int in [1, {min(self.in_features, rows)}] for a "
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

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig,
                    slices: Sequence[tuple[int, int]] | None = None) -> "LowRankAdapter":
        """Build from an ``AdapterConfig`` (what ``inject_adapters`` calls)."""
        extra = {name: getattr(cfg, name) for name in cls.options}
        return cls(base, cfg.rank, cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                   slices=slices, **extra)

    def reset_parameters(self) -> None:
        """LoRA init: A Kaiming-uniform (as nn.Linear), B zeros, so the delta starts at 0."""
        for a in self.lora_A.view(-1, self.rank, self.in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- the math a method defines --------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A as ``(k, r, in)`` and B as ``(k, m, r)``, views of the parameters."""
        if self.slices:
            return self.lora_A, self.lora_B
        return self.lora_A.unsqueeze(0), self.lora_B.unsqueeze(0)

    def _delta(self, x2d: torch.Tensor) -> torch.Tensor:
        """``s * B (A x)`` for flattened tokens -> ``(n, k, m)``."""
        raise NotImplementedError

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A', B')`` as ``(k, r', in)``, ``(k, m, r')`` with ``delta = s B' A'`` per slice,
        relative to W0 (default: the factors themselves, ``r' = r``)."""
        return self.factors()

    def _blocks_to_dense(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(k, m, in)`` per-slice blocks -> a dense ``(out, in)`` matrix (zero elsewhere)."""
        if not self.slices:
            return blocks[0]
        delta = blocks.new_zeros(self.out_features, self.in_features)
        return delta.index_copy(0, self.slice_rows, blocks.reshape(-1, self.in_features))

    def _slice_rows(self, w: torch.Tensor) -> torch.Tensor:
        """The adapted rows of an ``(out, in)`` matrix as ``(k, m, in)`` blocks."""
        if not self.slices:
            return w.unsqueeze(0)
        return w.index_select(0, self.slice_rows).view(len(self.slices), -1, w.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``(out, in)`` float32 matrix (zero outside the slices), so
        that ``pretrained_weight() + delta_weight()`` is the merged weight."""
        a, b = self.lowrank_factors()
        return self._blocks_to_dense(self.scaling * (b.float() @ a.float()))

    def pretrained_weight(self) -> torch.Tensor:
        """W0, the weight the layer was built from, float32."""
        return self.weight.detach().float()

    def merged_weight(self) -> torch.Tensor:
        """The weight of the equivalent plain ``nn.Linear``, float32."""
        return self.pretrained_weight() + self.delta_weight().detach()

    # --- files ---------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds for this layer, under peft-style key suffixes."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``adapter_tensors()``-keyed tensors (shapes already checked) into the layer."""
        for key, dst in self.adapter_tensors().items():
            dst.copy_(tensors[key])

    def peft_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a plain LoRA with this layer's scaling, ``W0 + s B A`` == merged
        (from ``lowrank_factors()``; a method without them overrides this)."""
        return self._plain_lora(*self.lowrank_factors())

    def _plain_lora(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice factors ``(k, r', in)``, ``(k, m, r')`` as one rank-``k*r'`` LoRA of the
        whole layer: A stacks the slices' A's, B is block-structured (zero outside the slices)."""
        a, b = a.detach().float(), b.detach().float()
        k, r, _ = a.shape
        big_b = torch.zeros(self.out_features, k * r, dtype=torch.float32, device=b.device)
        for i, (start, stop) in enumerate(self.slices or [(0, self.out_features)]):
            big_b[start:stop, i * r:(i + 1) * r] = b[i]
        return a.reshape(k * r, -1), big_b

    def peft_extra(self) -> dict[str, torch.Tensor]:
        """Further tensors of the peft export, under peft's key suffixes (default: none)."""
        return {}

    # --- state snapshots (diagnostics) ---------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Copies of every parameter and buffer except the frozen ``weight``/``bias``."""
        return {n: t.detach().clone() for n, t in self._adapter_tensors_by_name().items()}

    @contextlib.contextmanager
    def state_swapped(self, state: dict[str, torch.Tensor]):
        """Temporarily hold ``state`` (names as in ``adapter_state()``, any subset)."""
        live = self._adapter_tensors_by_name()
        saved = {n: live[n].detach().clone() for n in state}
        with torch.no_grad():
            for n, t in state.items():
                live[n].copy_(t)
        try:
            yield self
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    live[n].copy_(t)

    def _adapter_tensors_by_name(self) -> dict[str, torch.Tensor]:
        out = dict(adapter_parameters(self))
        out.update((n, b) for n, b in self.named_buffers() if n != "slice_rows")
        return out

    # --- training ------------------------------------------------------------------------
    def param_lr_scales(self) -> dict[str, float]:
        """Learning-rate multiplier per parameter name of this module (default: none)."""
        return {}

    @classmethod
    def training_callbacks(cls, model: nn.Module) -> list:
        """Engine callbacks this method needs on ``model`` (default: none)."""
        return []

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


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LowRankAdapter]]:
    """Yield ``(name, module)`` for every adapter layer in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankAdapter):
            yield name, mod


def adapter_parameters(module: LowRankAdapter) -> Iterator[tuple[str, nn.Parameter]]:
    """The trainable parameters of one adapter layer (everything but ``weight``/``bias``)."""
    for name, p in module.named_parameters():
        if name not in ("weight", "bias"):
            yield name, p


def method_callbacks(model: nn.Module) -> list:
    """The training callbacks of every adapter class present in ``model``."""
    classes = dict.fromkeys(type(m) for _, m in adapter_modules(model))
    return [cb for cls in classes for cb in cls.training_callbacks(model)]
