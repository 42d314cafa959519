"""Training configuration and the engine's error types."""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields that may change between a run and its `--resume` without changing the result
# (where the run lives, how fast data is loaded, how often it is logged).
RESUME_FREE_FIELDS = frozenset(
    {"resume", "overwrite", "out_dir", "num_workers", "eval_batch_size", "log_every_steps",
     "save_every_steps", "progress", "checkpoint_path"})


class TrainError(RuntimeError):
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

    `head_lr=None` uses `lr` for the classifier too. `img_size=None` keeps the model's
    default. `eval_batch_size=None` uses `2 * batch_size`. `eval_every=N` evaluates every N-th epoch
    and always the last (0 = the last epoch only: benchmark final runs on a large test split). `save_every_steps=0` checkpoints
    once per epoch only. `warmup_epochs` is capped at `epochs - 1`. `amp`/`channels_last` apply on CUDA only (bf16 autocast); CPU
    always trains in float32. `extra_timm_kwargs` go to `timm.create_model`.
    """

    model: str = "vit_base"
    method: str = "sds_lora"
    rank: int = 8
    alpha: float | None = None
    targets: list[str] | None = None
    basis: str = "polar"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    drop_path: float = 0.0
    img_size: int | None = None
    seed: int = 0
    pretrained: bool = False
    checkpoint_path: str | None = None
    amp: bool = True
    channels_last: bool = True
    num_workers: int = 2
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
        if self.targets is not None:
            self.targets = list(self.targets)
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
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
