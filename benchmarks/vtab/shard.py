"""Splitting a sweep across processes, GPUs and nodes that share one output folder.

Every run folder is claimed with the same lock ``fit`` takes (``FolderLock``: an ``O_EXCL``
file with host, pid and a heartbeat): a process runs a (task, method, seed) only while it
holds that folder's lock, so two processes never run the same run at once, whatever
their order. A lock whose holder died (its pid is gone on this host, or its heartbeat is
older than ten minutes on any host) is stale and taken over; the run then resumes from
its last checkpoint. So a Slurm job array or a Kubernetes indexed job needs nothing but
``--shard I/N`` and a shared filesystem.

``--shard I/N`` only decides the ORDER in which a process visits the runs: the plan
(task-major) is cut into N contiguous blocks; shard I takes its own block first, front to
back, then helps with the other blocks from their ends, where their owners arrive last.
Contiguous blocks keep a shard on few tasks, so it decodes few splits.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from sds_vision.train.lock import FolderLock

__all__ = ["parse_shard", "shard_order", "claim"]

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``; a one-line ``ValueError`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"{text!r}: expected I/N with 0 <= I < N (e.g. 0/4; a Slurm array "
                         "passes $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def shard_order(plan: Sequence[T], index: int, count: int) -> list[T]:
    """Every item of ``plan``, in the order shard ``index`` of ``count`` visits them: its
    own contiguous block front to back, then each following block back to front."""
    bounds = [len(plan) * k // count for k in range(count + 1)]
    blocks = [list(plan[bounds[k]:bounds[k + 1]]) for k in range(count)]
    order = list(blocks[index])
    for k in range(1, count):
        order += blocks[(index + k) % count][::-1]
    return order


@contextmanager
def claim(run_dir: str | Path) -> Iterator[dict | None]:
    """Hold ``run_dir``'s lock for the block; yields None when this process holds it, else
    the holder's record (``host``, ``pid``, ``started``) and holds nothing."""
    lock = FolderLock(run_dir)
    if not lock.try_acquire():
        yield lock.holder() or {"host": "?", "pid": "?", "started": 0.0}
        return
    try:
        yield None
    finally:
        lock.release()
