"""Headless figures without pyplot: no global backend switch, nothing left open.

``Figure`` objects are drawn with matplotlib's object API and saved atomically, so
importing or plotting never changes the caller's matplotlib state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .fileio import atomic_write


def figure(nrows: int = 1, ncols: int = 1, figsize=(6.0, 4.0), squeeze: bool = True):
    """``(fig, axes)`` like ``plt.subplots``, with no pyplot state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return Path(path)
