"""Learning-rate schedules (timm's schedulers), built from a `TrainConfig`.

Both kinds step every optimizer update (`sched_per="step"`) or once per epoch
(`sched_per="epoch"`, as the VTAB references do with timm's `CosineLRScheduler`):
the engine calls `scheduler.step(epoch_position(cfg, epoch))` at the start of every epoch and
`scheduler.step_update(step)` after every update, and timm ignores the one that does
not apply.
"""

from __future__ import annotations

from timm.scheduler import CosineLRScheduler, PolyLRScheduler

from .config import TrainConfig


def warmup_epochs_used(cfg: TrainConfig) -> int:
    """Warm-up is capped at `epochs - 1` (short CPU runs keep one epoch of decay)."""
    return min(cfg.warmup_epochs, cfg.epochs - 1)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """`cosine`: CosineLRScheduler; `linear`: PolyLRScheduler with power 1 (linear decay).

    With `warmup_prefix` the decay starts after the warm-up and spans the remaining
    epochs; without it the decay spans every epoch and the warm-up overrides its start."""
    warmup = warmup_epochs_used(cfg)
    unit = steps_per_epoch if cfg.sched_per == "step" else 1
    t_initial = (cfg.epochs - warmup if cfg.warmup_prefix else cfg.epochs) * unit
    common = dict(t_initial=max(t_initial, 1), lr_min=cfg.min_lr, warmup_t=warmup * unit,
                  warmup_lr_init=cfg.lr * 1e-2 if cfg.warmup_lr is None else cfg.warmup_lr,
                  warmup_prefix=cfg.warmup_prefix, t_in_epochs=cfg.sched_per == "epoch")
    if cfg.sched == "cosine":
        return CosineLRScheduler(optimizer, **common)
    return PolyLRScheduler(optimizer, power=1.0, **common)


def epoch_position(cfg: TrainConfig, epoch: int) -> int:
    """Where a per-epoch schedule stands while `epoch` (0-based) trains: `epoch`, or
    `sched_lag_epochs` earlier (the references step it after each epoch)."""
    return max(epoch - cfg.sched_lag_epochs, 0)


def describe(cfg: TrainConfig) -> str:
    """One line, e.g. for `config.json` and the run's first message."""
    warmup = warmup_epochs_used(cfg)
    start = f"{cfg.lr * 1e-2 if cfg.warmup_lr is None else cfg.warmup_lr:g}"
    warm = f"{warmup} warm-up epoch(s) from {start}, " if warmup else "no warm-up, "
    return (f"{cfg.sched} to {cfg.min_lr:g}, {warm}"
            f"{'decay after warm-up' if cfg.warmup_prefix else 'decay spans all epochs'}, "
            f"stepped per {cfg.sched_per}"
            + (f", {cfg.sched_lag_epochs} epoch(s) late" if cfg.sched_lag_epochs else ""))
