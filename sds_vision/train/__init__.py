"""Training engine: `fit(cfg, train_ds, val_ds, num_classes)` with checkpoints, resume and DDP."""

from .callbacks import Callback, TrainContext
from .config import NonFiniteLossError, TrainConfig, TrainError
from .engine import build_model, fit, param_groups, save_weights, seed_everything

__all__ = ["Callback", "TrainContext", "TrainConfig", "TrainError", "NonFiniteLossError", "fit",
           "build_model", "param_groups", "save_weights", "seed_everything"]
