"""Controlled low-rank regression: steps to a loss target vs the condition number.

One frozen ``nn.Linear`` ``W0`` (random, ``out x in``) adapted by each variant's layer from
the method registry (``variants.py``; rank ``r``, ``alpha = r`` so scaling 1, each method's
own init from the same seed: LoRA's A Kaiming-uniform and B = 0, PiSSA's SVD of W0, the
bases form's A = B = 0 with random bases). The teacher is
``W* = W0 + U diag(sigma) V^T`` with ``r`` singular values spaced geometrically from
``sigma_1`` to ``sigma_1 / kappa`` (``kappa`` = the condition number), scaled so that the
initial loss is 1. Inputs: ONE fixed batch of ``n`` Gaussian samples, whitened so that
``X^T X = n I`` (then the empirical loss equals the population loss
``E ||(dW - D) x||^2 / out`` of ``x ~ N(0, I)``, and the only ill-conditioning is the
target's). Loss: ``F.mse_loss`` (mean over samples and outputs), full-batch steps.
Optimizers: plain SGD (no momentum) and AdamW with weight_decay = 0 (so it is Adam:
weight decay would bias the fit and cap the reachable loss).

A run stops early when the loss falls below ``1e-10`` of the initial loss (float32 floor;
below every target reported) or stops being finite (diverged: no target reached).

Each method's training hooks run as the engine runs them: learning-rate multipliers
(``param_lr_scales``, LoRA+) become parameter groups, and its callbacks (``BasesSchedule``:
refreshes and the authors' pre-phase) get a ``TrainContext``. Pre-phase steps count: a
variant's "steps to a target" include them, and its curve is shifted by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sds_vision.config import AdapterConfig
from sds_vision.methods import METHODS as REGISTRY
from sds_vision.methods.base import adapter_parameters
from sds_vision.train.callbacks import CallbackList, TrainContext

from .variants import LOW_RANK, VARIANTS

METHODS = LOW_RANK
TARGETS = (1e-2, 1e-4)
STOP_REL = 1e-10


@dataclass(frozen=True)
class Problem:
    d_out: int = 128
    d_in: int = 96
    rank: int = 8
    n: int = 256
    seed: int = 0


def make_problem(p: Problem, kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W0, X, Y)``; the same ``W0``, ``X`` and singular vectors for every ``kappa``."""
    g = torch.Generator().manual_seed(p.seed)
    w0 = torch.randn(p.d_out, p.d_in, generator=g, dtype=torch.float64) / math.sqrt(p.d_in)
    u = torch.linalg.qr(torch.randn(p.d_out, p.rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(p.d_in, p.rank, generator=g, dtype=torch.float64)).Q
    x = torch.linalg.qr(torch.randn(p.n, p.d_in, generator=g, dtype=torch.float64)).Q
    x = x * math.sqrt(p.n)  # X^T X = n I
    sv = torch.logspace(0, -math.log10(kappa), p.rank, dtype=torch.float64)
    sv = sv * math.sqrt(p.d_out / (sv ** 2).sum())  # initial loss ||D||_F^2 / out = 1
    y = x @ (w0 + (u * sv) @ v.T).T
    return w0.float(), x.float(), y.float()


def make_layer(variant: str, w0: torch.Tensor, rank: int, seed: int) -> nn.Module:
    """The variant's adapter layer on a frozen copy of ``W0``, initialised from ``seed``."""
    if variant not in VARIANTS or not VARIANTS[variant].low_rank:
        raise ValueError(f"unknown variant {variant!r}; expected one of {METHODS}")
    v = VARIANTS[variant]
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    torch.manual_seed(seed)  # same A init for every LoRA-initialised method
    return REGISTRY[v.method].layer_class().from_config(base, AdapterConfig(rank=rank,
                                                                            **v.options))


def make_optimizer(layer: nn.Module, opt: str, lr: float) -> torch.optim.Optimizer:
    """SGD (no momentum) or AdamW (no weight decay) over the adapter's parameters, one group
    per learning-rate multiplier the method asks for."""
    scales = layer.param_lr_scales()
    groups: dict[float, list] = {}
    for name, p in adapter_parameters(layer):
        groups.setdefault(scales.get(name, 1.0), []).append(p)
    params = [{"params": ps, "lr": lr * sc} for sc, ps in groups.items()]
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {opt!r}")


def train_curve(method: str, opt: str, lr: float, kappa: float, steps: int,
                p: Problem = Problem()) -> tuple[np.ndarray, int]:
    """Relative loss ``L_t / L_0`` of the main phase, t = 0..steps (shorter if stopped
    early; last = inf if diverged), and the number of pre-phase steps made before it."""
    w0, x, y = make_problem(p, kappa)
    layer = make_layer(method, w0, p.rank, p.seed + 1)
    optim = make_optimizer(layer, opt, lr)
    callbacks = CallbackList(type(layer).training_callbacks(layer))

    def step() -> torch.Tensor:
        loss = F.mse_loss(layer(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss

    pre = [0]

    def run_steps(n: int) -> None:
        for _ in range(n):
            step()
            pre[0] += 1

    ctx = TrainContext(model=layer, optimizer=optim, cfg=None, out_dir=Path("."),
                       total_steps=steps, run_steps=run_steps)
    with torch.no_grad():
        initial = F.mse_loss(layer(x), y).item()
    callbacks.on_train_start(ctx)
    losses = []
    for t in range(steps + 1):
        loss = F.mse_loss(layer(x), y)
        val = loss.item()
        if not math.isfinite(val) or val > 1e6 * initial:
            losses.append(math.inf)
            break
        losses.append(val)
        if t == steps or val < STOP_REL * initial:
            break
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        ctx.step = t + 1
        callbacks.on_after_optimizer_step(ctx)
    return np.asarray(losses) / initial, pre[0]


def steps_to(rel: np.ndarray, target: float) -> int | None:
    """First step t with ``L_t <= target * L_0``; None if never."""
    hit = np.nonzero(rel <= target)[0]
    return int(hit[0]) if hit.size else None


def summarize_run(rel: np.ndarray, steps: int, pre: int = 0) -> dict:
    diverged = bool(np.isinf(rel[-1]))
    finite = rel[np.isfinite(rel)]
    hits = {f"{t:g}": steps_to(rel, t) for t in TARGETS}
    return {"steps_to": {k: None if v is None else v + pre for k, v in hits.items()},
            "final_rel_loss": math.inf if diverged else float(rel[-1]),
            "min_rel_loss": float(finite.min()), "pre_steps": pre,
            "diverged": diverged, "stopped_at": int(len(rel) - 1) + pre,
            "stopped_early": (not diverged) and len(rel) - 1 < steps}


def _rank_key(s: dict) -> tuple:
    """Best lr: reaches 1e-4 first; else 1e-2 first; else lowest final loss."""
    st = s["steps_to"]
    return tuple(st[f"{t:g}"] if st[f"{t:g}"] is not None else math.inf
                 for t in reversed(TARGETS)) + (s["final_rel_loss"],)


def run_regression(kappas, lr_grids: dict[str, tuple[float, ...]], steps: int,
                   methods=METHODS, p: Problem = Problem(), log=print) -> dict:
    """Every (optimizer, kappa, method, lr); picks the best lr per (optimizer, kappa, method).

    Returns a JSON-able dict: ``runs`` (every lr, with a subsampled curve) and ``best``.
    """
    runs, best = [], []
    for opt, lrs in lr_grids.items():
        for kappa in kappas:
            for method in methods:
                cands = []
                for lr in lrs:
                    rel, pre = train_curve(method, opt, lr, kappa, steps, p)
                    s = {"optimizer": opt, "kappa": kappa, "method": method, "lr": lr,
                         **summarize_run(rel, steps, pre)}
                    s["curve"] = [[i + pre, v] for i, v in _subsample(rel)]
                    runs.append(s)
                    cands.append(s)
                b = min(cands, key=_rank_key)
                b_lr = b["lr"]
                best.append({k: v for k, v in b.items() if k != "curve"}
                            | {"lr_at_grid_edge": b_lr in (min(lrs), max(lrs)),
                               "curve": b["curve"]})
                st = b["steps_to"]
                log(f"  regression {opt:5s} kappa={kappa:<6g} {method:16s} best lr={b_lr:<7g} "
                    f"steps to 1e-2: {_fmt(st['0.01'])}, 1e-4: {_fmt(st['0.0001'])}, "
                    f"final {b['final_rel_loss']:.1e}")
    return {"problem": p.__dict__, "steps": steps, "kappas": list(kappas), "methods": list(methods),
            "lr_grids": {k: list(v) for k, v in lr_grids.items()}, "runs": runs, "best": best,
            "stop_rel": STOP_REL}


def _subsample(rel: np.ndarray, points: int = 150) -> list[list[float]]:
    idx = np.unique(np.concatenate([np.geomspace(1, len(rel), points).astype(int) - 1,
                                    [len(rel) - 1]]))
    return [[int(i), float(rel[i])] for i in idx]


def _fmt(v) -> str:
    return "not reached" if v is None else str(v)
