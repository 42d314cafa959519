"""Controlled low-rank regression: steps to a loss target vs the condition number.

One frozen ``nn.Linear`` ``W0`` (random, ``out x in``) adapted by the library's
``LoRALinear`` / ``SDSLoRALinear`` (rank ``r``, ``alpha = r`` so scaling 1, standard init:
A Kaiming-uniform, B = 0; the same seeded init for every method). The teacher is
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sds_vision.layers import LoRALinear, SDSLoRALinear

METHODS = ("lora", "sds_polar", "sds_qr")
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


def make_layer(method: str, w0: torch.Tensor, rank: int, seed: int) -> nn.Module:
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    torch.manual_seed(seed)  # same A init for every method
    if method == "lora":
        return LoRALinear(base, rank)
    if method.startswith("sds_"):
        return SDSLoRALinear(base, rank, basis=method[4:])
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def train_curve(method: str, opt: str, lr: float, kappa: float, steps: int,
                p: Problem = Problem()) -> np.ndarray:
    """Relative loss ``L_t / L_0`` for t = 0..steps (shorter if stopped early; last = inf
    if diverged)."""
    w0, x, y = make_problem(p, kappa)
    layer = make_layer(method, w0, p.rank, p.seed + 1)
    params = [layer.lora_A, layer.lora_B]
    if opt == "sgd":
        optim = torch.optim.SGD(params, lr=lr)
    elif opt == "adamw":
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {opt!r}")
    losses = []
    for t in range(steps + 1):
        loss = F.mse_loss(layer(x), y)
        val = loss.item()
        if not math.isfinite(val) or val > 1e6 * (losses[0] if losses else 1.0):
            losses.append(math.inf)
            break
        losses.append(val)
        if t == steps or val < STOP_REL * losses[0]:
            break
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    rel = np.asarray(losses) / losses[0]
    return rel


def steps_to(rel: np.ndarray, target: float) -> int | None:
    """First step t with ``L_t <= target * L_0``; None if never."""
    hit = np.nonzero(rel <= target)[0]
    return int(hit[0]) if hit.size else None


def summarize_run(rel: np.ndarray, steps: int) -> dict:
    diverged = bool(np.isinf(rel[-1]))
    finite = rel[np.isfinite(rel)]
    return {"steps_to": {f"{t:g}": steps_to(rel, t) for t in TARGETS},
            "final_rel_loss": math.inf if diverged else float(rel[-1]),
            "min_rel_loss": float(finite.min()),
            "diverged": diverged, "stopped_at": int(len(rel) - 1),
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
                    rel = train_curve(method, opt, lr, kappa, steps, p)
                    s = {"optimizer": opt, "kappa": kappa, "method": method, "lr": lr,
                         **summarize_run(rel, steps)}
                    s["curve"] = _subsample(rel)
                    runs.append(s)
                    cands.append(s)
                b = min(cands, key=_rank_key)
                b_lr = b["lr"]
                best.append({k: v for k, v in b.items() if k != "curve"}
                            | {"lr_at_grid_edge": b_lr in (min(lrs), max(lrs)),
                               "curve": b["curve"]})
                st = b["steps_to"]
                log(f"  regression {opt:5s} kappa={kappa:<6g} {method:9s} best lr={b_lr:<7g} "
                    f"steps to 1e-2: {_fmt(st['0.01'])}, 1e-4: {_fmt(st['0.0001'])}, "
                    f"final {b['final_rel_loss']:.1e}")
    return {"problem": p.__dict__, "steps": steps, "kappas": list(kappas),
            "lr_grids": {k: list(v) for k, v in lr_grids.items()}, "runs": runs, "best": best,
            "stop_rel": STOP_REL}


def _subsample(rel: np.ndarray, points: int = 150) -> list[list[float]]:
    idx = np.unique(np.concatenate([np.geomspace(1, len(rel), points).astype(int) - 1,
                                    [len(rel) - 1]]))
    return [[int(i), float(rel[i])] for i in idx]


def _fmt(v) -> str:
    return "not reached" if v is None else str(v)
