"""Check a benchmark data root before any compute (``--dry-run`` / ``validate``).

Every requested task present, every split file parses, every listed image exists and
decodes, labels are in range, split sizes are as expected (800/200/1000 for VTAB-1k;
other sizes only warn), and a per-task summary is printed. Problems are collected (not
raised one at a time) so a single pass lists them all; ``raise_if_failed`` then raises
a one-line ``BenchmarkDataError`` naming the first one. Which validator checks which
benchmark is in the benchmark table (``sds_vision.data.benchmarks``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sds_vision.data.benchmarks import BENCHMARKS, get_benchmark
from sds_vision.data.fgvc import (
    FGVC_SPLITS,
    check_fgvc_root,
    fgvc_listing,
    find_fgvc_dir,
    resolve_fgvc_list,
)
from sds_vision.data.listing import SplitListing
from sds_vision.data.sds_paper import (
    SDS_PAPER_SPLITS,
    check_sds_paper_root,
    load_sds_paper_split,
    resolve_sds_paper_list,
)
from sds_vision.data.vtab import (
    SPLIT_FILES,
    BenchmarkDataError,
    check_vtab_root,
    find_task_dir,
    read_split_lines,
    resolve_tasks,
)

__all__ = ["SplitSizes", "TaskSummary", "ValidationReport", "validate_vtab", "validate_fgvc",
           "validate_sds_paper"]


@dataclass(frozen=True)
class SplitSizes:
    """Expected VTAB-1k split sizes; a mismatch is an error, except ``test`` (a warning;
    None = the task's standard test size)."""
    train800: int = 800
    val200: int = 200
    train800val200: int = 1000
    test: int | None = None


@dataclass
class TaskSummary:
    name: str
    group: str
    num_classes: int
    folder: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    classes_seen: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    benchmark: str
    root: Path
    splits: tuple[str, ...]
    tasks: list[TaskSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [e for t in self.tasks for e in t.errors]

    @property
    def warnings(self) -> list[str]:
        return [w for t in self.tasks for w in t.warnings]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self) -> None:
        errs = self.errors
        if errs:
            more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
            raise BenchmarkDataError(errs[0] + more)

    def format(self) -> str:
        cols = "".join(f"{s:>16}" for s in self.splits)
        lines = [f"{self.benchmark} data root {self.root}: {len(self.tasks)} task(s), "
                 f"{len(self.errors)} error(s), {len(self.warnings)} warning(s), "
                 f"{self.seconds:.1f}s",
                 f"{'task':<22}{'group':<13}{'classes':>8}{'seen':>6}{cols}  status"]
        for t in self.tasks:
            counts = "".join(f"{t.counts.get(s, '-'):>16}" for s in self.splits)
            seen = max(t.classes_seen.values(), default=0)
            status = ("ERROR" if t.errors else "warn" if t.warnings else "ok")
            lines.append(f"{t.name:<22}{t.group:<13}{t.num_classes:>8}{seen:>6}{counts}  {status}")
        lines += [f"ERROR {e}" for e in self.errors]
        lines += [f"warning {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_images(paths: list[Path], locate: Callable[[int], str], decode: bool,
                  num_workers: int, max_report: int) -> list[str]:
    """Every path exists (and decodes); errors name where the image is listed
    (``locate(i)``, computed only for images with a problem)."""
    def check(i: int) -> str | None:
        path = paths[i]
        if not path.is_file():
            return f"{locate(i)}: image listed but missing ({path})"
        if decode:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # PIL raises several types for bad data
                return f"{locate(i)}: image {path} cannot be decoded ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(num_workers) as ex:
        errs = [e for e in ex.map(check, range(len(paths))) if e]
    if len(errs) > max_report:
        errs = errs[:max_report] + [f"{locate(0).split(':')[0]}: "
                                    f"{len(errs) - max_report} more image problem(s)"]
    return errs


def _check_listing(s: TaskSummary, lst: SplitListing, decode: bool, num_workers: int,
                   max_report: int) -> None:
    """Counts, classes seen, the reader's notes and (for image files) every image."""
    s.counts[lst.split] = len(lst)
    s.classes_seen[lst.split] = len(set(lst.labels))
    s.warnings += [n for n in lst.notes if n not in s.warnings]  # notes about the dataset
    if lst.paths is not None and lst.paths:
        s.errors += _check_images(lst.paths, lst.locate, decode, num_workers, max_report)


def _check_dsprites_scale(s: TaskSummary, path: Path, lineno: int, img: Path) -> None:
    """dSprites is stored as 0/1 pixels; a dump written without x255 looks all black."""
    try:
        with Image.open(img) as im:
            lo, hi = im.convert("L").getextrema()
    except Exception:  # already reported by the image check
        return
    if hi <= 1:
        s.warnings.append(f"{path}:{lineno}: image max pixel value {hi}: dSprites stored "
                          "without x255 scaling (docs/benchmarks.md, data traps)")


def validate_vtab(root: str | Path, tasks="all", sizes: SplitSizes = SplitSizes(),
                  splits: tuple[str, ...] = SPLIT_FILES, decode: bool = True,
                  num_workers: int | None = None, max_report: int = 5) -> ValidationReport:
    """Validate a VTAB-1k dump. Unknown task names and a root of the wrong kind raise
    at once; everything else is collected in the returned report."""
    t0 = time.time()
    root = Path(root)
    task_list = resolve_tasks(tasks)
    check_vtab_root(root)
    nw = num_workers or min(16, 2 * (os.cpu_count() or 1))
    rep = ValidationReport("VTAB-1k", root, tuple(splits))
    for task in task_list:
        s = TaskSummary(task.name, task.group, task.num_classes)
        rep.tasks.append(s)
        try:
            s.folder = find_task_dir(root, task)
        except BenchmarkDataError as e:
            s.errors.append(str(e))
            continue
        for split in splits:
            path = s.folder / f"{split}.txt"
            try:
                rows = read_split_lines(path)
            except BenchmarkDataError as e:
                s.errors.append(str(e))
                continue
            s.counts[split] = len(rows)
            s.classes_seen[split] = len({lab for _, _, lab in rows})
            bad = [f"{path}:{n}: label {lab} out of range for {task.name} "
                   f"({task.num_classes} classes)" for n, _, lab in rows
                   if lab >= task.num_classes]
            s.errors += bad[:max_report]
            expected = getattr(sizes, split)
            if split == "test":
                expected = task.test_size if expected is None else expected
                if len(rows) != expected:
                    s.warnings.append(f"{path}: {len(rows)} test examples, expected {expected}")
            elif len(rows) != expected:
                s.errors.append(f"{path}: {len(rows)} examples, expected {expected}")
            s.errors += _check_images([s.folder / rel for _, rel, _ in rows],
                                      lambda i, rows=rows, path=path: f"{path}:{rows[i][0]}",
                                      decode, nw, max_report)
            if task.name.startswith("dsprites") and rows and decode:
                _check_dsprites_scale(s, path, rows[0][0], s.folder / rows[0][1])
    rep.seconds = time.time() - t0
    return rep


def validate_fgvc(root: str | Path, datasets="all", decode: bool = True,
                  check_sizes: bool = True, num_workers: int | None = None,
                  max_report: int = 5, splits: tuple[str, ...] = FGVC_SPLITS) -> ValidationReport:
    """Validate an FGVC root in the VPT layout (sizes that differ from VPT's by more
    than 5% warn)."""
    t0 = time.time()
    root = Path(root)
    ds_list = resolve_fgvc_list(datasets)
    check_fgvc_root(root)
    nw = num_workers or min(16, 2 * (os.cpu_count() or 1))
    rep = ValidationReport("FGVC", root, tuple(splits))
    for ds in ds_list:
        s = TaskSummary(ds.name, "fgvc", ds.num_classes)
        rep.tasks.append(s)
        try:
            s.folder = find_fgvc_dir(root, ds)
        except BenchmarkDataError as e:
            s.errors.append(str(e))
            continue
        for split in splits:
            try:
                lst = fgvc_listing(root, ds, split)
            except BenchmarkDataError as e:
                s.errors.append(str(e))
                if split == "train":  # every split maps its ids through train: report once
                    break
                continue
            exp = ds.sizes[FGVC_SPLITS.index(split)]
            if check_sizes and abs(len(lst) - exp) > 0.05 * exp:
                s.warnings.append(f"{lst.source}: {len(lst)} examples, VPT's split has {exp}")
            _check_listing(s, lst, decode, nw, max_report)
    rep.seconds = time.time() - t0
    return rep


def validate_sds_paper(root: str | Path, datasets="all", decode: bool = True,
                       check_sizes: bool = True, num_workers: int | None = None,
                       max_report: int = 5,
                       splits: tuple[str, ...] = SDS_PAPER_SPLITS) -> ValidationReport:
    """Validate a root of the SDS-LoRA paper's suite (sizes other than the standard
    split's warn; so does a CIFAR-100 file whose md5 is not the official archive's)."""
    t0 = time.time()
    root = Path(root)
    ds_list = resolve_sds_paper_list(datasets)
    check_sds_paper_root(root)
    nw = num_workers or min(16, 2 * (os.cpu_count() or 1))
    rep = ValidationReport("SDS-LoRA paper suite", root, tuple(splits))
    for ds in ds_list:
        s = TaskSummary(ds.name, "sds_paper", ds.num_classes, folder=root / ds.folder)
        rep.tasks.append(s)
        for split in splits:
            try:
                lst = load_sds_paper_split(root, ds, split, verify=True)
            except BenchmarkDataError as e:
                s.errors.append(str(e))
                continue
            exp = ds.sizes[SDS_PAPER_SPLITS.index(split)]
            if check_sizes and len(lst) != exp:
                s.warnings.append(f"{lst.source}: {len(lst)} {split} examples, the standard "
                                  f"split has {exp}")
            _check_listing(s, lst, decode, nw, max_report)
    rep.seconds = time.time() - t0
    return rep


def main(argv=None, prog: str | None = None) -> int:
    """``sds-vision validate ROOT``: print the summary; exit 1 on errors."""
    ap = argparse.ArgumentParser(prog=prog, description="Check a benchmark data root: "
                                 + ", ".join(f"{b.name} ({b.title})" for b in BENCHMARKS.values()))
    ap.add_argument("root", help="data root")
    ap.add_argument("--benchmark", choices=list(BENCHMARKS), default="vtab", help="layout")
    ap.add_argument("--tasks", nargs="+", default=["all"], help="tasks/datasets (default all)")
    ap.add_argument("--expect-sizes", nargs=3, type=int, default=None,
                    metavar=("TR", "VAL", "TRVAL"),
                    help="VTAB only: train800/val200/train800val200 sizes (default 800 200 1000)")
    ap.add_argument("--no-decode", action="store_true", help="check existence only")
    a = ap.parse_args(argv)
    bench = get_benchmark(a.benchmark)
    try:
        options = {"decode": not a.no_decode}
        if a.expect_sizes is not None:
            if not bench.sized_splits:
                raise BenchmarkDataError(f"--expect-sizes applies to VTAB-1k only, not "
                                         f"{a.benchmark}")
            options["sizes"] = SplitSizes(*a.expect_sizes)
        rep = bench.validate(a.root, a.tasks, **options)
    except BenchmarkDataError as e:
        print(f"error: {e}")
        return 2
    print(rep.format())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
