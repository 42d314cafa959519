"""One split of one benchmark task as it is listed on disk: the common currency of the
benchmark readers (VTAB-1k, FGVC, the SDS-LoRA paper's suite), the validator and the
harness's dataset builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SplitListing"]


@dataclass
class SplitListing:
    """Samples of one split: image files (``paths``) or pixels stored in the listing itself
    (``pixels``, N x H x W x 3 uint8, e.g. CIFAR-100's pickles), with 0-based labels.

    ``locate(i)`` names where sample ``i`` is listed (``file:line``, or ``file: entry i``
    for files without lines); it is a function because some listings are one long line
    of JSON and the location is only worth computing for a sample with a problem.
    ``notes`` are warnings the reader found (e.g. a checksum that differs from the
    official archive's).
    """

    task: str
    split: str
    source: Path
    labels: list[int]
    num_classes: int
    locate: Callable[[int], str]
    paths: list[Path] | None = None
    pixels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def samples(self) -> list[tuple[Path, int]]:
        """``(image path, label)`` pairs; only for listings of image files."""
        if self.paths is None:
            raise ValueError(f"{self.source}: {self.task}/{self.split} stores pixels, not files")
        return list(zip(self.paths, self.labels))
