"""Training configuration and the engine's error types (torch-free: the CLI reads it)."""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AdapterConfig
from ..errors import UserError
from ..methods import get_method

# Fields that may change between a run and its `--resume` without changing the result
# (where the run lives, how fast data is loaded, how often it is logged).
RESUME_FREE_FIELDS = frozenset(
    {"resume", "overwrite", "out_dir", "num_workers", "eval_batch_size", "log_every_steps",
     "save_every_steps", "progress", "checkpoint_path", "threads", "compile"})
SCHEDULES = ("cosine", "linear")
PRECISIONS = ("bf16", "fp32")


class TrainError(UserError):
    """A training run cannot start or continue; the message is one line for the user."""


class NonFiniteLossError(TrainError):
    """The loss (or, found at a checkpoint, a trained weight) stopped being finite at
    optimizer step `step`; the last checkpoint on disk is from before it."""

    def __init__(self, step: int, epoch: int, last_checkpoint: str | None, what: str = "loss"):
        self.step, self.epoch, self.last_checkpoint = step, epoch, last_checkpoint
        kept = f"; last good checkpoint kept at {last_checkpoint}" if last_checkpoint else \
            "; no checkpoint was written before it"
        event = "non-finite loss at step" if what == "loss" else "non-finite weights after step"
        super().__init__(f"{event} {step} (epoch {epoch}){kept}. "
                         "Try a lower --lr (or --clip-grad).")


@dataclass
class TrainConfig:
    """Everything that determines a fine-tuning run (saved as `config.json`).

    Model: `model` (alias or timm name), `method` (a registry entry), `adapter` (its
    settings), `img_size` (None keeps the model's default), `drop_path`, `pretrained` /
    `checkpoint_path`, `extra_timm_kwargs` (to `timm.create_model`).

    Optimisation: AdamW (`lr`, `weight_decay`, `head_lr` = None uses `lr` for the
    classifier), `batch_size` per process and optimizer step, `accum_steps` micro-batches of
    `batch_size` per optimizer step (exact: the loss is the mean over all of them),
    `drop_last` drops each epoch's last partial batch, `clip_grad` (None = off),
    `label_smoothing`.

    Schedule: `sched` "cosine" or "linear" (decay to `min_lr`), after `warmup_epochs`
    (capped at `epochs - 1`) of linear warm-up from `warmup_lr` (None = `lr * 1e-2`).
    `sched_per` "step" updates the lr every optimizer step, "epoch" once per epoch (timm's
    per-epoch schedulers, as the VTAB references use). `warmup_prefix=True` starts the decay
    after the warm-up; False lets the decay span all epochs, warm-up included (timm's and
    the references' default). `sched_lag_epochs=1` trains epoch e at the per-epoch value of
    e - 1 (the references call `scheduler.step(epoch)` after each epoch).

    Runtime (CUDA only; the CPU always trains in float32): `precision` "bf16" (autocast) or
    "fp32" (TF32 matmuls), `channels_last`, `compile` (torch.compile of the model). Run
    directory: `out_dir`, `resume`, `overwrite`, `save_every_steps` (0 = once per epoch),
    `eval_every` (every N-th epoch and always the last; 0 = last only), `log_every_steps`,
    `progress`, `num_workers` (DataLoader), `eval_batch_size` (None = 2 x batch_size),
    `threads` (torch CPU threads; None = torch's default).
    """

    model: str = "vit_base"
    method: str = "sds_lora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    epochs: int = 10
    batch_size: int = 32
    accum_steps: int = 1
    drop_last: bool = False
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 1e-4
    sched: str = "cosine"
    sched_per: str = "step"
    warmup_epochs: int = 1
    warmup_lr: float | None = None
    warmup_prefix: bool = True
    sched_lag_epochs: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    drop_path: float = 0.0
    img_size: int | None = None
    seed: int = 0
    pretrained: bool = False
    checkpoint_path: str | None = None
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 2
    threads: int | None = None
    eval_batch_size: int | None = None
    eval_every: int = 1
    out_dir: str = "runs/finetune"
    save_every_steps: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every_steps: int = 10
    progress: bool = True
    extra_timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig.from_dict(self.adapter)
        get_method(self.method)  # unknown method: one line listing the choices
        problems = []
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_epochs", "sched_lag_epochs", "eval_every", "save_every_steps",
                     "num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.head_lr is not None and not self.head_lr > 0:
            problems.append(f"head_lr must be > 0 (got {self.head_lr})")
        if self.clip_grad is not None and not self.clip_grad >= 0:  # < 0 flips the gradients
            problems.append(f"clip_grad must be >= 0, 0 or None = off (got {self.clip_grad})")
        for name in ("threads", "eval_batch_size"):  # optional; None = the default
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.weight_decay < 0 or self.min_lr < 0:
            problems.append("weight_decay and min_lr must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        for name, choices in (("sched", SCHEDULES), ("sched_per", ("step", "epoch")),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)} "
                                f"(got {getattr(self, name)!r})")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from `config.json`; keys of other versions are ignored (version 0.1 kept
        the adapter fields at top level and `amp` instead of `precision`)."""
        d = dict(d)
        if "adapter" not in d:
            d["adapter"] = {k: d[k] for k in ("rank", "alpha", "targets", "basis") if k in d}
        if "amp" in d and "precision" not in d:
            d["precision"] = "bf16" if d["amp"] else "fp32"
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names and values of fields that differ, as `name: saved -> current`."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
