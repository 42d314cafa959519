"""Check a benchmark data root before any compute (``--dry-run`` / ``validate``).

Every requested task present, every split file parses, every listed image exists and
decodes, labels are in range, split sizes are as expected (800/200/1000 for VTAB-1k;
test sizes only warn), and a per-task summary is printed. Problems are collected (not
raised one at a time) so a single pass lists them all; ``raise_if_failed`` then raises
a one-line ``BenchmarkDataError`` naming the first one.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sds_vision.data.fgvc import (
    FGVC_SPLITS,
    check_fgvc_root,
    find_fgvc_dir,
    line_of_key,
    load_fgvc,
    resolve_fgvc_list,
)
from sds_vision.data.vtab import (
    SPLIT_FILES,
    BenchmarkDataError,
    check_vtab_root,
    find_task_dir,
    read_split_lines,
    resolve_tasks,
)

__all__ = ["SplitSizes", "TaskSummary", "ValidationReport", "validate_vtab", "validate_fgvc"]


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


def _check_images(items: list[tuple[str, Path]], decode: bool, num_workers: int,
                  max_report: int) -> list[str]:
    """``items`` = (location for the message, image path). Returns error strings."""
    def check(item):
        where, path = item
        if not path.is_file():
            return f"{where}: image listed but missing ({path})"
        if decode:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # PIL raises several types for bad data
                return f"{where}: image {path} cannot be decoded ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(num_workers) as ex:
        errs = [e for e in ex.map(check, items) if e]
    if len(errs) > max_report:
        errs = errs[:max_report] + [f"{items[0][0].split(':')[0]}: "
                                    f"{len(errs) - max_report} more image problem(s)"]
    return errs


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
            s.errors += _check_images([(f"{path}:{n}", s.folder / rel) for n, rel, _ in rows],
                                      decode, nw, max_report)
            if task.name.startswith("dsprites") and rows and decode:
                _check_dsprites_scale(s, path, rows[0][0], s.folder / rows[0][1])
    rep.seconds = time.time() - t0
    return rep


def validate_fgvc(root: str | Path, datasets="all", decode: bool = True,
                  check_sizes: bool = True, num_workers: int | None = None,
                  max_report: int = 5) -> ValidationReport:
    """Validate an FGVC root in the VPT layout (sizes that differ from VPT's by more
    than 5% warn)."""
    t0 = time.time()
    root = Path(root)
    ds_list = resolve_fgvc_list(datasets)
    check_fgvc_root(root)
    nw = num_workers or min(16, 2 * (os.cpu_count() or 1))
    rep = ValidationReport("FGVC", root, FGVC_SPLITS)
    for ds in ds_list:
        s = TaskSummary(ds.name, "fgvc", ds.num_classes)
        rep.tasks.append(s)
        try:
            s.folder = find_fgvc_dir(root, ds)
            loaded = load_fgvc(root, ds)
        except BenchmarkDataError as e:
            s.errors.append(str(e))
            continue
        for i, split in enumerate(FGVC_SPLITS):
            samples = loaded.splits[split]
            path = s.folder / f"{split}.json"
            s.counts[split] = len(samples)
            s.classes_seen[split] = len({lab for _, lab in samples})
            exp = ds.sizes[i]
            if check_sizes and abs(len(samples) - exp) > 0.05 * exp:
                s.warnings.append(f"{path}: {len(samples)} examples, VPT's split has {exp}")
            image_dir = s.folder / ds.image_dir if ds.image_dir else s.folder
            text = path.read_text(encoding="utf-8")
            items = []
            for p, _ in samples:
                rel = p.relative_to(image_dir).as_posix()
                items.append((f"{path}:{line_of_key(text, rel)}: entry {rel!r}", p))
            s.errors += _check_images(items, decode, nw, max_report)
    rep.seconds = time.time() - t0
    return rep


def main(argv=None, prog: str | None = None) -> int:
    """``sds-vision validate ROOT``: print the summary; exit 1 on errors."""
    ap = argparse.ArgumentParser(prog=prog, description="Check a VTAB-1k or FGVC data root.")
    ap.add_argument("root", help="data root")
    ap.add_argument("--benchmark", choices=["vtab", "fgvc"], default="vtab", help="layout")
    ap.add_argument("--tasks", nargs="+", default=["all"], help="tasks/datasets (default all)")
    ap.add_argument("--expect-sizes", nargs=3, type=int, default=[800, 200, 1000],
                    metavar=("TR", "VAL", "TRVAL"), help="VTAB train800/val200/train800val200")
    ap.add_argument("--no-decode", action="store_true", help="check existence only")
    a = ap.parse_args(argv)
    try:
        if a.benchmark == "vtab":
            rep = validate_vtab(a.root, a.tasks, SplitSizes(*a.expect_sizes),
                                decode=not a.no_decode)
        else:
            rep = validate_fgvc(a.root, a.tasks, decode=not a.no_decode)
    except BenchmarkDataError as e:
        print(f"error: {e}")
        return 2
    print(rep.format())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
