"""VTAB-1k reader for the NOAH/SSF dump that FacT, GLoRA, RepAdapter, SSF and V-PETL read.

Layout (docs/benchmarks.md, section 1)::

    <root>/<task>/{train800,val200,train800val200,test}.txt
    <root>/<task>/images/<split>/<file>

Each split-file line is ``<path relative to the task folder> <0-based label>``. Any
whitespace separates the two fields and blank lines are skipped. Anything else is
rejected with a ``BenchmarkDataError`` that names the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sds_vision.data.catalog import BenchmarkDataError, lookup, pick
from sds_vision.data.listing import SplitListing

__all__ = [
    "BenchmarkDataError", "VTabTask", "VTAB_TASKS", "VTAB_ALIASES", "VTAB_GROUPS",
    "SPLIT_FILES", "SPLIT_MODES", "resolve_task", "resolve_tasks",
    "read_split_lines", "check_vtab_root",
    "load_vtab_split", "find_task_dir", "vtab_listing",
]


@dataclass(frozen=True)
class VTabTask:
    name: str
    group: str          # natural | specialized | structured
    num_classes: int
    test_size: int      # size of test.txt in the standard dump


# Canonical name, group, classes, test size: docs/benchmarks.md, in VTAB order.
_TABLE = [
    ("cifar", "natural", 100, 10_000),
    ("caltech101", "natural", 102, 6_084),
    ("dtd", "natural", 47, 1_880),
    ("oxford_flowers102", "natural", 102, 6_149),
    ("oxford_iiit_pet", "natural", 37, 3_669),
    ("svhn", "natural", 10, 26_032),
    ("sun397", "natural", 397, 21_750),
    ("patch_camelyon", "specialized", 2, 32_768),
    ("eurosat", "specialized", 10, 5_400),
    ("resisc45", "specialized", 45, 6_300),
    ("diabetic_retinopathy", "specialized", 5, 42_670),
    ("clevr_count", "structured", 8, 15_000),
    ("clevr_dist", "structured", 6, 15_000),
    ("dmlab", "structured", 6, 22_735),
    ("kitti", "structured", 4, 711),
    ("dsprites_loc", "structured", 16, 73_728),
    ("dsprites_ori", "structured", 16, 73_728),
    ("smallnorb_azi", "structured", 18, 12_150),
    ("smallnorb_ele", "structured", 9, 12_150),
]
VTAB_TASKS: dict[str, VTabTask] = {n: VTabTask(n, g, c, t) for n, g, c, t in _TABLE}
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    g: tuple(t.name for t in VTAB_TASKS.values() if t.group == g)
    for g in ("natural", "specialized", "structured")
}
# Aliases seen in the wild (folder names of other dumps, TFDS names).
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "flowers102": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet",
    "camelyon": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist",
    "dsprites_position": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

SPLIT_FILES = ("train800", "val200", "train800val200", "test")
# Named split modes: (train split, evaluation split).
SPLIT_MODES: dict[str, tuple[str, str]] = {
    "tune": ("train800", "val200"),
    "final": ("train800val200", "test"),
}


def resolve_task(name: str) -> VTabTask:
    """Canonical task for a canonical name or alias (case-insensitive, '-' == '_')."""
    return lookup(name, VTAB_TASKS, VTAB_ALIASES, "VTAB task")


def resolve_tasks(names) -> list[VTabTask]:
    """Resolve a list of names; ``all`` = the 19 tasks, a group name = its tasks."""
    groups = {g: [VTAB_TASKS[t] for t in ts] for g, ts in VTAB_GROUPS.items()}
    return pick(names, resolve_task, {"all": list(VTAB_TASKS.values()), **groups})


def read_split_lines(path: str | Path) -> list[tuple[int, str, int]]:
    """Parse one split file into ``(line number, relative path, label)`` rows."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: split file missing")
    rows: list[tuple[int, str, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise BenchmarkDataError(
                    f"{path}:{lineno}: expected '<image path> <label>', got {line.strip()!r}")
            rel, label = fields
            try:
                lab = int(label)
            except ValueError:
                raise BenchmarkDataError(
                    f"{path}:{lineno}: label {label!r} is not an integer") from None
            if lab < 0:
                raise BenchmarkDataError(f"{path}:{lineno}: negative label {lab}")
            rows.append((lineno, rel, lab))
    return rows


def find_task_dir(root: str | Path, task: VTabTask) -> Path:
    """The folder of ``task`` under ``root``: canonical name first, then any alias."""
    root = Path(root)
    check_vtab_root(root)
    names = [task.name] + [a for a, c in VTAB_ALIASES.items() if c == task.name]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise BenchmarkDataError(
        f"{root}: task folder missing for {task.name!r} (looked for {', '.join(names)})")


def check_vtab_root(root: Path) -> None:
    """Refuse data roots of the wrong kind with a hint (FGVC root, a single task folder)."""
    if not root.is_dir():
        raise BenchmarkDataError(f"{root}: VTAB data root is not a directory")
    if (root / "train800.txt").is_file():
        raise BenchmarkDataError(
            f"{root}: this is a single VTAB task folder; pass its parent as the data root")
    if (root / "train.json").is_file() or any(root.glob("*/train.json")):
        raise BenchmarkDataError(
            f"{root}: looks like an FGVC root (train.json files), not a VTAB-1k dump; "
            "use --benchmark fgvc")


def vtab_listing(root: str | Path, task: str | VTabTask, split: str,
                 check_labels: bool = True) -> SplitListing:
    """One split as a ``SplitListing`` (``check_labels``: see ``load_vtab_split``)."""
    t = resolve_task(task) if isinstance(task, str) else task
    if split not in SPLIT_FILES:
        raise BenchmarkDataError(f"unknown VTAB split {split!r}; expected one of {SPLIT_FILES}")
    tdir = find_task_dir(root, t)
    path = tdir / f"{split}.txt"
    rows = read_split_lines(path)
    if check_labels:
        for lineno, _, lab in rows:
            if lab >= t.num_classes:
                raise BenchmarkDataError(
                    f"{path}:{lineno}: label {lab} out of range for "
                    f"{t.name} ({t.num_classes} classes)")
    return SplitListing(t.name, split, path, [lab for _, _, lab in rows], t.num_classes,
                        lambda i: f"{path}:{rows[i][0]}", paths=[tdir / rel for _, rel, _ in rows])


def load_vtab_split(root: str | Path, task: str | VTabTask, split: str,
                    check_labels: bool = True) -> list[tuple[Path, int]]:
    """Samples ``(absolute image path, label)`` of one split of one task.

    Labels are the split file's integers (one mapping for all splits); with
    ``check_labels`` a label >= the task's class count raises naming file and line.
    """
    return vtab_listing(root, task, split, check_labels).samples()
