"""Callback protocol for `fit` (diagnostics, the benchmark harness, tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .rundir import DIAGNOSTICS


class Callback:
    """Override any subset. Hooks run on every rank; write files only when `ctx.is_main`."""

    def on_train_start(self, ctx: "TrainContext") -> None: ...

    def on_before_optimizer_step(self, ctx: "TrainContext") -> None:
        """Gradients are populated (not yet clipped)."""

    def on_after_optimizer_step(self, ctx: "TrainContext") -> None: ...

    def on_epoch_end(self, ctx: "TrainContext", metrics: dict) -> None: ...

    def on_train_end(self, ctx: "TrainContext") -> None: ...


@dataclass
class TrainContext:
    """What a callback sees. `model` is the unwrapped model (never the DDP wrapper);
    `step` counts optimizer steps done (1-based after the first), `epoch` is 0-based.
    `run_steps(n)` makes n optimizer steps at the peak lr on training batches without
    advancing the schedule or the step count: a method's start-up phase calls it from
    `on_train_start` when `fresh` (a resumed run restores what the phase produced)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: Any
    out_dir: Path
    step: int = 0
    epoch: int = 0
    is_main: bool = True
    loss: torch.Tensor | None = None  # the current batch's loss (a device tensor)
    fresh: bool = True        # False when the run resumed from a checkpoint
    total_steps: int = 0      # optimizer steps of the whole run
    run_steps: Callable[[int], None] | None = None  # extra steps outside the schedule
    extras: dict = field(default_factory=dict)

    def log(self, row: dict) -> None:
        """Append `row` (plus step and epoch) to `diagnostics.jsonl` (rank 0 only)."""
        if not self.is_main:
            return
        full = {"step": self.step, "epoch": self.epoch, **row}
        with open(self.out_dir / DIAGNOSTICS, "a") as f:
            f.write(json.dumps(full, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    return float(o)


class CallbackList:
    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def call(*args):
            for cb in self.callbacks:
                getattr(cb, name, lambda *a: None)(*args)
        return call
