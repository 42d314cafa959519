"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .. import plotting


def plot_curves(epoch_rows: list[dict], step_rows: list[dict], path: str | Path,
                title: str = "") -> None:
    """Two panels: loss (per logged step and per epoch, train and val) and val accuracy."""
    fig, (ax_loss, ax_acc) = plotting.figure(1, 2, figsize=(10, 4))
    if step_rows:
        ax_loss.plot([r["step"] for r in step_rows], [r["train_loss"] for r in step_rows],
                     color="tab:blue", alpha=0.35, lw=1, label="train (logged steps)")
    ax_loss.plot([r["step"] for r in epoch_rows], [r["train_loss"] for r in epoch_rows],
                 "o-", color="tab:blue", label="train (epoch mean)")
    evaluated = [r for r in epoch_rows if r["val_top1"] is not None]
    ax_loss.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated],
                 "s-", color="tab:orange", label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot([r["epoch"] for r in evaluated], [r["val_top1"] for r in evaluated], "o-",
                label="val top-1")
    ax_acc.plot([r["epoch"] for r in evaluated], [r["val_top5"] for r in evaluated], "s--",
                label="val top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    plotting.save(fig, path)


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first
    points are not pulled towards zero, and ``weight=0`` returns the values unchanged."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight ** i))
    return out


def smoothing_weight(n: int) -> float:
    """EMA weight for a curve of ``n`` points: about n/5 points of memory (so a short run
    is barely smoothed), at most 0.95."""
    return min(0.95, max(0.0, 1.0 - 5.0 / n)) if n else 0.0


def plot_comparison(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path,
                    title: str = "") -> None:
    """One panel per task; one train-loss line per method, smoothed (EMA, `ema`) over the
    raw per-step losses, which stay in the plot as faint lines of the same colour.

    `curves[task][method] = [(step, loss)]`."""
    tasks = list(curves)
    fig, axes = plotting.figure(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        weights = []
        for i, (method, pts) in enumerate(curves[task].items()):
            if not pts:
                continue
            steps, losses = [p[0] for p in pts], [p[1] for p in pts]
            color = f"C{i % 10}"
            w = smoothing_weight(len(losses))
            weights.append(w)
            ax.plot(steps, losses, "-", color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, ema(losses, w), "-", color=color, lw=1.8, label=method)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss" + (f" (EMA {max(weights):.2f}; faint: raw)"
                                      if weights and max(weights) > 0 else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    plotting.save(fig, path)
