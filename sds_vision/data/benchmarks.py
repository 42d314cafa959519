"""The benchmarks, in one table: name -> title, task groups, split modes, task resolver,
split reader and validator. The harness (``benchmarks/vtab``) and ``sds-vision validate``
read it; nothing else branches on a benchmark's name.

    vtab       VTAB-1k, the NOAH/SSF dump (sds_vision/data/vtab.py)
    fgvc       FGVC in the VPT layout (sds_vision/data/fgvc.py)
    sds_paper  the SDS-LoRA paper's seven full datasets (sds_vision/data/sds_paper.py)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sds_vision.data import fgvc, sds_paper, vtab
from sds_vision.data.listing import SplitListing
from sds_vision.data.vtab import BenchmarkDataError

__all__ = ["BenchmarkData", "BENCHMARKS", "get_benchmark"]


@dataclass(frozen=True)
class BenchmarkData:
    """One benchmark's data side.

    Attributes:
        name: the identifier (``--benchmark``, ``bench.json``).
        title: the name printed in reports.
        groups: group -> canonical task names, in reporting order (one group = no groups).
        splits: every split a data root holds, in the order the validator prints them.
        split_modes: mode -> (train split, evaluation split).
        resolve: names, aliases, group names or ``all`` -> canonical task names.
        num_classes: classes of a canonical task (the head size).
        listing: ``(root, task, split)`` -> the split's ``SplitListing``.
        validator: name of the function in ``sds_vision.data.validate`` that checks a root
            (by name: that module's command line reads this table).
        sized_splits: splits whose expected size ``--expect-sizes`` sets (VTAB-1k's fixed
            800/200/1000); empty where sizes are only compared with the standard ones.
    """

    name: str
    title: str
    groups: dict[str, tuple[str, ...]]
    splits: tuple[str, ...]
    split_modes: dict[str, tuple[str, str]]
    resolve: Callable[[Sequence[str] | str], list[str]]
    num_classes: Callable[[str], int]
    listing: Callable[[str | Path, str, str], SplitListing]
    validator: str
    sized_splits: tuple[str, ...] = ()

    @property
    def tasks(self) -> list[str]:
        return [t for ts in self.groups.values() for t in ts]

    def group_of(self, task: str) -> str:
        return next(g for g, ts in self.groups.items() if task in ts)

    def mode_splits(self, mode: str) -> tuple[str, str]:
        if mode not in self.split_modes:
            raise BenchmarkDataError(f"{self.name} has no split mode {mode!r}; expected one of "
                                     f"{', '.join(self.split_modes)}")
        return self.split_modes[mode]

    def validate(self, root: str | Path, tasks, **options):
        """``ValidationReport`` of ``root`` for ``tasks`` (options go to the validator)."""
        module = importlib.import_module("sds_vision.data.validate")
        return getattr(module, self.validator)(root, tasks, **options)


BENCHMARKS: dict[str, BenchmarkData] = {b.name: b for b in (
    BenchmarkData(
        "vtab", "VTAB-1k", dict(vtab.VTAB_GROUPS), vtab.SPLIT_FILES, vtab.SPLIT_MODES,
        lambda names: [t.name for t in vtab.resolve_tasks(names)],
        lambda t: vtab.resolve_task(t).num_classes, vtab.vtab_listing, "validate_vtab",
        sized_splits=("train800", "val200", "train800val200")),
    BenchmarkData(
        "fgvc", "FGVC", {"fgvc": tuple(fgvc.FGVC_DATASETS)}, fgvc.FGVC_SPLITS, fgvc.SPLIT_MODES,
        lambda names: [d.name for d in fgvc.resolve_fgvc_list(names)],
        lambda t: fgvc.resolve_fgvc(t).num_classes, fgvc.fgvc_listing, "validate_fgvc"),
    BenchmarkData(
        "sds_paper", "SDS-LoRA paper suite", {"sds_paper": tuple(sds_paper.SDS_PAPER_DATASETS)},
        sds_paper.SDS_PAPER_SPLITS, sds_paper.SPLIT_MODES,
        lambda names: [d.name for d in sds_paper.resolve_sds_paper_list(names)],
        lambda t: sds_paper.resolve_sds_paper(t).num_classes, sds_paper.load_sds_paper_split,
        "validate_sds_paper"),
)}


def get_benchmark(name: str) -> BenchmarkData:
    """The registry entry, or a one-line error listing the choices."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose one of "
                                 f"{', '.join(BENCHMARKS)}") from None
