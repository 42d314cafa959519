"""Gradient diagnostics of low-rank adapter layers, any method (docs/method.md, sections 1-3).

Per adapted layer (per slice for a fused qkv) and per logging step:

* ``erank_gA`` / ``erank_gB``: effective rank of the factor gradients ``dL/dA``, ``dL/dB``,
  ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (Roy & Vetterli, 2007);
* ``srank_*``: stable rank ``||M||_F^2 / ||M||_2^2`` of ``A``, ``B`` and ``delta`` (the
  layer's update ``delta_weight()``, ``s B A`` for LoRA);
* ``cond_*``: condition number ``sigma_1 / sigma_r`` over the top ``r`` (adapter rank)
  singular values of ``A``, ``B`` and ``delta`` (a LoRA ``delta`` has rank <= r, so the
  full-size condition number would always be infinite); ``inf`` when ``sigma_r == 0``;
* ``cos_update``: ``cos(-G, d delta)``, the alignment between the full fine-tuning gradient
  ``G = dY^T X`` of the layer (summed over tokens) and the first-order change of ``delta``
  that the optimizer step made (``s (dB A + B dA)`` for LoRA, ``s (dB P_A + P_B dA)`` for the
  bases form; buffers such as bases held at their values during the step). 1 = the step
  moved ``delta`` exactly along steepest descent of the full weight;
* ``cos_update_exact``: the same with the exact change of ``delta`` from before the step to
  after it, including work done after the optimizer step (a base refresh).

``G`` is not otherwise available: ``GradientDiagnostics`` captures each adapted layer's
input ``X`` and output gradient ``dY`` with hooks that exist only during logging steps
(registered after the previous optimizer step, removed before the logging step's
optimizer step), so a non-logging step costs one integer modulo. On a fused qkv, the
slice's ``G`` uses the slice's rows of ``dY``. Under DDP the captured ``G`` is the local
rank's (the factor gradients are all-reduced): the cosine is then a per-shard estimate.

Standalone use: ``layer_diagnostics(module, x, dy, dA, dB)`` on any adapter layer.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import plotting
from .methods.base import LowRankAdapter, adapter_modules, adapter_parameters
from .train.rundir import DIAGNOSTICS_PNG

__all__ = ["effective_rank", "stable_rank", "condition_number", "cosine", "full_gradient",
           "layer_diagnostics", "GradientDiagnostics", "plot_diagnostics", "summarize", "METRICS"]

METRICS = ("erank_gA", "erank_gB", "srank_A", "srank_B", "srank_delta", "cond_A", "cond_B",
           "cond_delta", "cos_update", "cos_update_exact")


def _svdvals(m: torch.Tensor) -> torch.Tensor:
    # float64: these are small matrices (or one per logging step) and tiny singular values
    # matter for the condition number.
    return torch.linalg.svdvals(m.detach().double().cpu())


def effective_rank(m: torch.Tensor) -> float:
    """``exp(-sum p log p)`` with ``p = sigma / sum(sigma)``; 0.0 for a zero matrix."""
    s = _svdvals(m)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(m: torch.Tensor) -> float:
    """``||M||_F^2 / ||M||_2^2`` (between 1 and rank); 0.0 for a zero matrix."""
    s = _svdvals(m)
    if s.numel() == 0 or s[0] <= 0:
        return 0.0
    return float((s ** 2).sum() / s[0] ** 2)


def condition_number(m: torch.Tensor, rank: int | None = None) -> float:
    """``sigma_1 / sigma_k`` with ``k = rank`` (default ``min(m.shape)``); inf if singular.

    A zero matrix gives ``inf`` as well (no direction is resolved).
    """
    s = _svdvals(m)
    k = min(s.numel(), rank or s.numel())
    if k == 0 or s[k - 1] <= 0:
        return math.inf
    return float(s[0] / s[k - 1])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius cosine ``<a, b> / (|a| |b|)``; nan when either is zero."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return float(a @ b / (na * nb))


def _slices(module: LowRankAdapter) -> list[tuple[int, int]]:
    return module.slices or [(0, module.out_features)]


def _as_blocks(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """A factor-shaped tensor as ``(k, ...)`` blocks, one per slice."""
    if t is None:
        return None
    return t if t.dim() == 3 else t.unsqueeze(0).expand(k, *t.shape)


def full_gradient(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``G = dY^T X`` summed over all tokens: x ``(..., in)``, dy ``(..., out)`` -> (out, in)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    dy2 = dy.detach().reshape(-1, dy.shape[-1]).float()
    return dy2.mT @ x2


def layer_diagnostics(module: LowRankAdapter, x: torch.Tensor | None, dy: torch.Tensor | None,
                      dA: torch.Tensor, dB: torch.Tensor, *, G: torch.Tensor | None = None,
                      A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                      grad_A: torch.Tensor | None = None, grad_B: torch.Tensor | None = None,
                      state_before: dict[str, torch.Tensor] | None = None,
                      ) -> dict[str, dict[str, float]]:
    """Diagnostics of one adapter layer (any method) around one optimizer step.

    Args:
        module: an adapter layer (``LowRankAdapter``), holding its state AFTER the step.
        x, dy: the layer's input ``(..., in)`` and output gradient ``(..., out)`` of the
            step (may be ``None`` when ``G`` is given).
        dA, dB: the parameter change the optimizer step made (new - old), shaped like
            ``lora_A`` / ``lora_B``.
        G: the full-weight gradient ``(out, in)``; default ``dy^T x`` summed over tokens.
        A, B: the factors BEFORE the step; default ``module``'s current factors minus
            ``dA`` / ``dB`` (i.e. the module holds the factors after the step).
        grad_A, grad_B: the factor gradients; default ``module.lora_A.grad`` / ``.lora_B.grad``
            (the effective ranks are scale invariant, so clipping does not matter).
        state_before: ``module.adapter_state()`` before the step (every parameter and
            buffer; overrides ``A``/``B``); default: the current state with ``A``, ``B``.

    The update of ``delta`` (the layer's ``delta_weight()``): ``cos_update`` uses its first-order
    change from the parameters' change with the buffers (bases) as they were at the step;
    ``cos_update_exact`` its whole change from the state before to the state after, which
    includes work after the step such as a base refresh.

    Returns:
        ``{key: {metric: value}}`` with one key per slice: ``""`` for an unsliced layer,
        ``"[start:stop]"`` per fused slice. Metrics are those in ``METRICS``.
    """
    spans = _slices(module)
    k = len(spans)
    if G is None:
        if x is None or dy is None:
            raise ValueError("layer_diagnostics: give x and dy, or G")
        G = full_gradient(x, dy)
    G = G.detach().double()
    after = module.adapter_state()
    if state_before is None:
        before = dict(after)
        before["lora_A"] = (module.lora_A.detach() - dA.detach()) if A is None else A.detach()
        before["lora_B"] = (module.lora_B.detach() - dB.detach()) if B is None else B.detach()
    else:
        before = state_before
    A, B = before["lora_A"], before["lora_B"]
    # the parameters as moved by the step, the buffers as they were at the step
    moved = {**before, **{n: after[n] for n, _ in adapter_parameters(module)}}
    grad_A = module.lora_A.grad if grad_A is None else grad_A
    grad_B = module.lora_B.grad if grad_B is None else grad_B
    A, B = (_as_blocks(t.detach().double(), k) for t in (A, B))
    grad_A, grad_B = _as_blocks(grad_A, k), _as_blocks(grad_B, k)
    first_order, exact, delta = _delta_changes(module, before, moved, after)
    r = module.rank
    out = {}
    for j, (lo, hi) in enumerate(spans):
        a, b = A[j], B[j]
        g = G[lo:hi]
        key = f"[{lo}:{hi}]" if module.slices else ""
        out[key] = {
            "erank_gA": effective_rank(grad_A[j]) if grad_A is not None else math.nan,
            "erank_gB": effective_rank(grad_B[j]) if grad_B is not None else math.nan,
            "srank_A": stable_rank(a), "srank_B": stable_rank(b),
            "srank_delta": stable_rank(delta[j]),
            "cond_A": condition_number(a, r), "cond_B": condition_number(b, r),
            "cond_delta": condition_number(delta[j], r),
            "cos_update": cosine(-g, first_order[j]), "cos_update_exact": cosine(-g, exact[j]),
        }
    return out


def _delta_changes(module: LowRankAdapter, before: dict, moved: dict, after: dict
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slice ``(k, ...)``: the first-order change of delta (parameters moved, buffers
    held), its exact change (before -> after), and delta before the step (for its ranks),
    all float64."""
    def factors(state):
        with module.state_swapped(state):
            f = module.lowrank_factors()
            return None if f is None else tuple(t.detach().to(torch.float64, copy=True) for t in f)

    f0 = factors(before)
    if f0 is not None:  # delta = s B' A' per slice
        (a0, b0), (a1, b1), (a2, b2) = f0, factors(moved), factors(after)
        s = module.scaling
        first = s * ((b1 - b0) @ a0 + b0 @ (a1 - a0))
        exact = s * (b2 @ a2 - b0 @ a0)
        # delta = Q_B (s R_B R_A^T) Q_A^T: its singular values from a small core, so no SVD
        # of an out x in matrix (ViT-B's qkv slice is 768 x 768)
        core = s * (torch.linalg.qr(b0).R @ torch.linalg.qr(a0.mT).R.mT)
        return first, exact, core

    twin = copy.deepcopy(module).double()  # float64, or small changes cancel to noise

    def dense(state):  # not low-rank (DoRA): the dense update, per slice
        with twin.state_swapped({n: t.double() for n, t in state.items()}):
            return twin._slice_rows(twin.delta_weight().detach()).clone()

    # central difference: exact for updates that are quadratic in the parameters
    minus = {n: 2 * before[n] - moved[n] for n in moved}
    d0 = dense(before)
    return 0.5 * (dense(moved) - dense(minus)), dense(after) - d0, d0


class _Capture:
    """Forward hook on one adapter layer: keeps X until its backward, then adds dY^T X to G."""

    def __init__(self, module: nn.Module):
        self.G: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()

        def backward(dy):
            g = full_gradient(x, dy)
            self.G = g if self.G is None else self.G + g  # several forwards per step add up

        output.register_hook(backward)

    def remove(self) -> None:
        self.handle.remove()


class GradientDiagnostics:
    """Engine callback: ``layer_diagnostics`` of every adapter layer every ``every`` steps.

    Steps ``every, 2*every, ...`` (and step 1 when ``first=True``) are logged, one row per
    layer (slice) via ``ctx.log`` into the run's ``diagnostics.jsonl``::

        {"step", "epoch", "kind": "layer_diagnostics", "layer", <METRICS>}

    (non-finite values are written as null). ``on_train_end`` writes ``diagnostics.png``
    (per-layer heatmaps and layer-mean curves) into ``ctx.out_dir``. ``self.rows`` keeps
    the rows in memory too. Off-steps cost one modulo: hooks exist only on logging steps.
    """

    def __init__(self, every: int = 50, first: bool = True, plot: bool = True):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.first, self.plot = every, first, plot
        self.rows: list[dict] = []
        self._captures: dict[str, _Capture] = {}
        self._before: dict[str, tuple] = {}

    def _is_log_step(self, step: int) -> bool:
        return step % self.every == 0 or (self.first and step == 1)

    def _arm(self, model: nn.Module) -> None:
        self._disarm()
        self._captures = {n: _Capture(m) for n, m in adapter_modules(model)}

    def _disarm(self) -> None:
        for c in self._captures.values():
            c.remove()
        self._captures = {}

    # Engine hooks. ctx.step is the number of the step being made (1-based) in
    # on_before_optimizer_step and the number just made in on_after_optimizer_step.
    def on_train_start(self, ctx) -> None:
        if self._is_log_step(ctx.step + 1):
            self._arm(ctx.model)

    def on_before_optimizer_step(self, ctx) -> None:
        if not self._captures:
            return
        mods = dict(adapter_modules(ctx.model))
        self._before = {}
        for name, cap in self._captures.items():
            m = mods[name]
            grads = tuple(None if p.grad is None else p.grad.detach().clone()
                          for p in (m.lora_A, m.lora_B))
            self._before[name] = (cap.G, m.adapter_state(), *grads)
        self._disarm()

    def on_after_optimizer_step(self, ctx) -> None:
        if self._before:
            mods = dict(adapter_modules(ctx.model))
            for name, (G, state, ga, gb) in self._before.items():
                m = mods[name]
                if G is None:  # layer not reached by this step's backward
                    continue
                da, db = m.lora_A.detach() - state["lora_A"], m.lora_B.detach() - state["lora_B"]
                res = layer_diagnostics(m, None, None, da, db, G=G, grad_A=ga, grad_B=gb,
                                        state_before=state)
                for key, metrics in res.items():
                    row = {"kind": "layer_diagnostics", "layer": name + key,
                           **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
                    self.rows.append({"step": ctx.step, "epoch": ctx.epoch, **row})
                    ctx.log(row)
            self._before = {}
        if self._is_log_step(ctx.step + 1):
            self._arm(ctx.model)

    def on_train_end(self, ctx) -> None:
        self._disarm()
        if self.plot and self.rows and getattr(ctx, "is_main", True):
            plot_diagnostics(self.rows, Path(ctx.out_dir) / DIAGNOSTICS_PNG)


def summarize(rows: list[dict], metrics=METRICS) -> dict[str, float]:
    """Mean of each metric over layers and logged steps (nulls/non-finite skipped)."""
    out = {}
    for m in metrics:
        vals = [r[m] for r in rows if r.get(m) is not None and math.isfinite(r[m])]
        out[m] = sum(vals) / len(vals) if vals else math.nan
    return out


def plot_diagnostics(rows: list[dict], path: str | Path, title: str = "") -> None:
    """PNG: layer-mean curves of effective rank, cosine, stable rank and condition number,
    and per-layer heatmaps (layer x step) of ``cos_update`` and ``erank_gB``."""
    steps = sorted({r["step"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    table = defaultdict(dict)
    for r in rows:
        table[r["layer"]][r["step"]] = r

    def grid(metric):
        return np.array([[np.nan if (v := table[ly].get(st, {}).get(metric)) is None else v
                          for st in steps] for ly in layers], dtype=float)

    def mean_curve(metric):
        g = grid(metric)
        g[~np.isfinite(g)] = np.nan
        ok = np.isfinite(g)
        with np.errstate(all="ignore"):  # a step where no layer has a finite value -> nan
            return np.where(ok.any(0), np.nansum(g, 0) / ok.sum(0), np.nan)

    fig, axes = plotting.figure(2, 3, figsize=(15, 8))
    panels = [(axes[0, 0], ("erank_gA", "erank_gB"), "effective rank of factor grads", False),
              (axes[0, 1], ("cos_update", "cos_update_exact"), "cos(-G, induced dDelta)", False),
              (axes[0, 2], ("srank_A", "srank_B", "srank_delta"), "stable rank", False),
              (axes[1, 0], ("cond_A", "cond_B", "cond_delta"), "condition number (top r)", True)]
    for ax, metrics, label, log in panels:
        for m in metrics:
            ax.plot(steps, mean_curve(m), marker=".", label=m)
        ax.set_xlabel("step")
        ax.set_title(f"{label} (mean over layers)")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax, m in ((axes[1, 1], "cos_update"), (axes[1, 2], "erank_gB")):
        im = ax.imshow(grid(m), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"{m} per layer")
        ax.set_xlabel("logged step")
        ticks = list(range(0, len(steps), max(1, len(steps) // 12)))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=7, rotation=90)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=5)
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    plotting.save(fig, path, dpi=100)
