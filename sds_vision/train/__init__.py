"""Training engine: `fit(cfg, train_ds, val_ds, num_classes)` with checkpoints, resume and DDP.

`TrainConfig` and the error types are torch-free and imported eagerly (the CLI reads them);
the engine itself is imported on first use (PEP 562), so `--help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import NonFiniteLossError, TrainConfig, TrainError

if TYPE_CHECKING:
    from .callbacks import Callback, TrainContext
    from .engine import build_model, fit, param_groups, save_weights, seed_everything

_LAZY = {"Callback": "callbacks", "TrainContext": "callbacks", "build_model": "engine",
         "fit": "engine", "param_groups": "engine", "save_weights": "engine",
         "seed_everything": "engine"}

__all__ = ["Callback", "NonFiniteLossError", "TrainConfig", "TrainContext", "TrainError",
           "build_model", "fit", "param_groups", "save_weights", "seed_everything"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
