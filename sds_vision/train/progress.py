"""Progress display: tqdm bars on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self._epoch_bar = self._step_bar = None

    def start(self, first_epoch: int) -> None:
        if self.tty:
            self._epoch_bar = tqdm(total=self.epochs, initial=first_epoch, desc="epochs",
                                   file=self.stream, dynamic_ncols=True)

    def start_epoch(self, epoch: int, first_step: int) -> None:
        if self.tty:
            self._step_bar = tqdm(total=self.steps_per_epoch, initial=first_step,
                                  desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                                  file=self.stream, dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        if self._step_bar is not None:
            self._step_bar.update(n)

    def log_step(self, epoch: int, step_in_epoch: int, step: int, loss: float, lr: float) -> None:
        if self._step_bar is not None:
            self._step_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.enabled:
            self.write(f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/"
                       f"{self.steps_per_epoch} (global {step}) loss {loss:.4f} lr {lr:.3e}")

    def end_epoch(self, row: dict) -> None:
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = None
        if self._epoch_bar is not None:
            self._epoch_bar.update(1)
        if self.enabled:
            val = (f"val_loss {row['val_loss']:.4f} val_top1 {row['val_top1']:.2f} "
                   f"val_top5 {row['val_top5']:.2f}" if row["val_top1"] is not None
                   else "(no evaluation this epoch)")
            self.write(f"epoch {row['epoch']}/{self.epochs} train_loss {row['train_loss']:.4f} "
                       f"{val} ({row['seconds']:.1f}s)")

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in (self._step_bar, self._epoch_bar):
            if bar is not None:
                bar.close()
        self._step_bar = self._epoch_bar = None
