"""Summarise a sweep: per-task accuracy (mean ± std over seeds), group means, the mean of
group means and the mean over all tasks (labelled, partial ones flagged), trainable
parameters, a CSV, and one bar chart per group.

    python benchmarks/vtab/report.py RUNS_DIR [--out DIR] [--anchors] [--best]

Two accuracies per run, each with its own columns and averages: **last** = the last
epoch's top-1 on the evaluation split (what we report); **best** = the maximum over the
evaluated epochs, which in ``final`` mode is selected on the TEST split (what NOAH, FacT,
RepAdapter and V-PETL report; comparable with their tables, not a clean estimate). Best
columns appear when the runs evaluated on a schedule (``run.py --best``) or with
``--best``. ``--anchors`` adds published numbers (benchmarks/vtab/anchors.py): theirs, not
ours, and labelled as not comparable when the runs used another backbone.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.vtab.anchors import (
    ANCHOR_BACKBONE,
    ANCHOR_COLUMNS,
    ANCHOR_ROWS,
    ANCHOR_SETS,
    LORA_ROW,
    anchor_row_for,
)
from benchmarks.vtab.protocol import MODES
from benchmarks.vtab.rundir import RunResult, load_results
from sds_vision import plotting
from sds_vision.data.benchmarks import BenchmarkData, get_benchmark
from sds_vision.fileio import atomic_write_text
from sds_vision.methods import METHODS

__all__ = ["summarise", "Summary", "render_markdown", "write_report", "method_label", "main"]

WHICH = ("last", "best")


def method_label(name: str) -> str:
    """The registry's label of a method (its name for methods this version does not know)."""
    return METHODS[name].label if name in METHODS else name
_LABEL = {"last": "last epoch", "best": "best epoch"}


@dataclass
class Cell:
    values: list[float]            # last epoch, one per seed, sorted by seed
    seeds: list[int]
    best: list[float | None]       # max over the evaluated epochs (None: not evaluated)
    trainable: int | None
    head: int | None
    adapter: int | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:  # sample std (ddof=1); undefined for one seed
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def best_mean(self) -> float | None:
        """Mean best over seeds, only when every seed has one."""
        if not self.best or any(b is None for b in self.best):
            return None
        return statistics.fmean(self.best)

    def score(self, which: str) -> float | None:
        return self.mean if which == "last" else self.best_mean


Avg = tuple[float, int, int]   # (mean, how many present, of how many)


@dataclass
class Summary:
    benchmark: str
    mode: str
    methods: list[str]
    tasks: list[str]                                          # all tasks of the benchmark
    cells: dict[tuple[str, str], Cell]                        # (task, method) -> Cell
    group_means: dict[str, dict[str, dict[str, Avg | None]]]  # which -> m -> g -> avg
    mean_of_groups: dict[str, dict[str, Avg | None]]          # which -> m -> (mean, groups, of)
    mean_all: dict[str, dict[str, Avg | None]]                # which -> m -> (mean, tasks, of)
    settings: dict[str, set]

    @property
    def bench(self) -> BenchmarkData:
        return get_benchmark(self.benchmark)

    @property
    def has_best(self) -> bool:
        return any(c.best_mean is not None for c in self.cells.values())


def _averages(cells: dict, bench: BenchmarkData, methods: list[str], which: str):
    gm: dict[str, dict[str, Avg | None]] = {}
    mog: dict[str, Avg | None] = {}
    mall: dict[str, Avg | None] = {}
    for m in methods:
        gm[m] = {}
        for g, ts in bench.groups.items():
            vals = [v for t in ts if (t, m) in cells
                    and (v := cells[(t, m)].score(which)) is not None]
            gm[m][g] = (statistics.fmean(vals), len(vals), len(ts)) if vals else None
        present = [v[0] for v in gm[m].values() if v]
        mog[m] = (statistics.fmean(present), len(present), len(bench.groups)) if present else None
        vals = [v for t in bench.tasks if (t, m) in cells
                and (v := cells[(t, m)].score(which)) is not None]
        mall[m] = (statistics.fmean(vals), len(vals), len(bench.tasks)) if vals else None
    return gm, mog, mall


def summarise(results: list[RunResult], mode: str | None = None) -> Summary:
    """Aggregate runs; every average is over the per-task seed means that exist."""
    if not results:
        raise ValueError("no finished runs (no final_metrics.json) found")
    benches = {r.benchmark for r in results}
    if len(benches) > 1:
        raise ValueError(f"runs of several benchmarks mixed: {sorted(benches)}")
    modes = {r.mode for r in results}
    if mode is None:
        if len(modes) > 1:
            raise ValueError(f"runs of several split modes {sorted(modes)}; pick one with --mode")
        mode = modes.pop()
    results = [r for r in results if r.mode == mode]
    if not results:  # an empty report must not replace a real one
        raise ValueError(f"no finished runs in split mode {mode!r} (there are: "
                         f"{', '.join(sorted(modes))})")
    bench = get_benchmark(benches.pop())
    order = list(METHODS)
    methods = sorted({r.method for r in results},
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    cells: dict[tuple[str, str], Cell] = {}
    for r in sorted(results, key=lambda r: r.seed):
        if r.task not in bench.tasks:
            raise ValueError(f"{r.path}: task {r.task!r} is not a {bench.name} task")
        c = cells.setdefault((r.task, r.method), Cell([], [], [], r.trainable, r.head, r.adapter))
        if r.seed in c.seeds:
            raise ValueError(f"{r.path}: seed {r.seed} of {r.task}/{r.method} found twice")
        c.values.append(r.top1)
        c.seeds.append(r.seed)
        c.best.append(r.best_top1)
    gm, mog, mall = {}, {}, {}
    for which in WHICH:
        gm[which], mog[which], mall[which] = _averages(cells, bench, methods, which)
    settings = {"model": {r.model for r in results},
                "normalization": {r.normalization for r in results},
                "adapter placement": {r.placement for r in results},
                "precision": {r.precision for r in results}}
    return Summary(bench.name, mode, methods, bench.tasks, cells, gm, mog, mall, settings)


def _fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _avg(v: Avg | None, unit: str) -> str:
    if v is None:
        return "–"
    mean, k, n = v
    return f"{mean:.2f}" + ("" if k == n else f" (partial: {k}/{n} {unit})")


def _mog_partial(s: Summary, which: str, m: str) -> bool:
    mog, mall = s.mean_of_groups[which][m], s.mean_all[which][m]
    return mog is not None and (mog[1] < mog[2] or mall[1] < mall[2])


def _mog(s: Summary, which: str, m: str) -> str:
    """Mean of group means; partial when a group is missing OR any group is incomplete."""
    mog, mall = s.mean_of_groups[which][m], s.mean_all[which][m]
    if mog is None:
        return "–"
    if not _mog_partial(s, which, m):
        return f"{mog[0]:.2f}"
    return f"{mog[0]:.2f} (partial: {mog[1]}/{mog[2]} groups, {mall[1]}/{mall[2]} tasks)"


def _best_label(s: Summary) -> str:
    split = s.bench.mode_splits(s.mode)[1]
    return f"selected on {'TEST' if split == 'test' else split}"


def _known(s: Summary, key: str) -> str:
    return ", ".join(sorted(str(v) for v in s.settings[key] if v is not None)) or "not recorded"


def _anchors_comparable(s: Summary) -> bool:
    return s.settings["model"] == {ANCHOR_BACKBONE}


def _per_task_table(s: Summary, which: str) -> str:
    out = "| task | group | " + " | ".join(map(method_label, s.methods)) + " |\n"
    out += "|---|---|" + "---|" * len(s.methods) + "\n"
    for t in s.tasks:
        if not any((t, m) in s.cells for m in s.methods):
            continue
        row = []
        for m in s.methods:
            c = s.cells.get((t, m))
            if c is None:
                row.append("–")
            elif which == "last":
                row.append(f"{c.mean:.2f} ± {_fmt(c.std)} (n={len(c.values)})")
            else:
                row.append(_fmt(c.best_mean) + ("" if c.best_mean is not None
                                                else " (last epoch only evaluated)"))
        out += f"| {t} | {s.bench.group_of(t)} | " + " | ".join(row) + " |\n"
    return out


def render_markdown(s: Summary, anchors: bool = False, best: bool | None = None) -> str:
    """The report; ``best`` None = best columns when the runs have them."""
    bench = s.bench
    show_best = s.has_best if best is None else best
    grouped = len(bench.groups) > 1
    anchor_set = ANCHOR_SETS.get(s.benchmark) if anchors else None
    inline = anchor_set is not None and _anchors_comparable(s)
    out = io.StringIO()
    w = out.write
    w(f"# {bench.title} results ({s.mode}: {' -> '.join(bench.mode_splits(s.mode))})\n\n")
    w("Top-1 accuracy (%), mean ± sample std over seeds (n = seeds). **last** = the LAST "
      "epoch (what we report).")
    if show_best:
        w(f" **best** = the maximum over the evaluated epochs, {_best_label(s)}: comparable "
          "with tables that report the best test epoch (NOAH, FacT, RepAdapter, V-PETL), "
          "not a clean estimate.")
    w(f"\n\nModels: {_known(s, 'model')}; normalisation: {_known(s, 'normalization')}; "
      f"adapter placement: {_known(s, 'adapter placement')}; precision on CUDA: "
      f"{_known(s, 'precision')} (the CPU runs fp32).\n\n")
    mixed = [k for k, v in s.settings.items() if len(v) > 1]
    if mixed:
        w(f"**WARNING: these runs mix several {' and '.join(mixed)} settings; "
          "their averages are not one experiment.**\n\n")
    w("## Per-task accuracy, last epoch\n\n" + _per_task_table(s, "last"))
    if show_best:
        w(f"\n## Per-task accuracy, best epoch ({_best_label(s)})\n\n"
          + _per_task_table(s, "best"))
    ran = sum(1 for t in s.tasks if any((t, m) in s.cells for m in s.methods))
    w("\n## Averages\n\n")
    if ran < len(s.tasks):
        w(f"Only {ran} of {len(s.tasks)} tasks ran: averages marked *partial* are over the "
          "tasks/groups that ran and are NOT comparable to published full-benchmark means.\n\n")
    n = len(s.tasks)
    head = ["method", "epoch"] + (list(bench.groups) if grouped else [])
    head += (["mean of group means (most papers)", f"mean over {n} tasks (VTAB, V-PETL)"]
             if grouped else [f"mean over {n} datasets"])
    head += ["trainable params (M, mean over tasks)", "excl. head (M)"]
    if inline:
        head += ["published row (THEIRS, see below)", f"published: {anchor_set.column}",
                 "published params (M)"]
    w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for m in s.methods:
        cs = [c for (t, mm), c in s.cells.items() if mm == m and c.trainable is not None]
        tr = statistics.fmean(c.trainable for c in cs) / 1e6 if cs else None
        ex = statistics.fmean(c.trainable - (c.head or 0) for c in cs) / 1e6 if cs else None
        for which in WHICH if show_best else ("last",):
            label = _LABEL[which] + (f" ({_best_label(s)})" if which == "best" else " (ours)")
            row = [method_label(m), label]
            if grouped:
                row += [_avg(s.group_means[which][m][g], "tasks") for g in bench.groups]
                row += [_mog(s, which, m), _avg(s.mean_all[which][m], "tasks")]
            else:
                row += [_avg(s.mean_all[which][m], "datasets")]
            row += [_fmt(tr, 3), _fmt(ex, 3)]
            if inline:
                row += _anchor_cells(anchor_set.column, m)
            w("| " + " | ".join(row) + " |\n")
    if anchors:
        w(_anchor_section(s, anchor_set))
    return out.getvalue()


def _anchor_cells(column: str, method: str) -> list[str]:
    label = anchor_row_for(method)
    if label is None:
        return ["–", "–", "–"]
    row = ANCHOR_ROWS[label]
    shown = label if method == "lora" or label != LORA_ROW else f"{label} (the LoRA row)"
    value = row[ANCHOR_COLUMNS.index(column)]
    return [shown, "–" if value is None else value, row[0] or "–"]


def _anchor_section(s: Summary, anchor_set) -> str:
    if anchor_set is None:
        return (f"\n## Published anchors\n\nNone: no published per-task numbers for "
                f"{s.bench.title} are recorded here.\n")
    out = "\n## Published anchors (THEIRS, not ours; ViT-B/16 IN-21k, docs/benchmarks.md)\n\n"
    if not _anchors_comparable(s):
        out += (f"**NOT comparable with the results above: these are numbers for "
                f"{ANCHOR_BACKBONE}; these runs used {_known(s, 'model')}.**\n\n")
    placements = {p for p in s.settings["adapter placement"] if p is not None}
    if anchor_set.placement and placements and placements != {anchor_set.placement}:
        out += (f"The LoRA row's adapter placement is `{anchor_set.placement}`; these runs used "
                f"{', '.join(sorted(placements))}.\n\n")
    out += anchor_set.note + "\n\n"
    out += "| method | " + " | ".join(ANCHOR_COLUMNS) + " |\n|---|"
    out += "---|" * len(ANCHOR_COLUMNS) + "\n"
    for k, v in ANCHOR_ROWS.items():
        out += f"| {k} | " + " | ".join("–" if x is None else str(x) for x in v) + " |\n"
    return out


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _charts(s: Summary, out: Path) -> list[Path]:
    paths = []
    for g, ts in s.bench.groups.items():
        ts = [t for t in ts if any((t, m) in s.cells for m in s.methods)]
        if not ts:
            continue
        fig, ax = plotting.figure(figsize=(max(4.0, 1.2 * len(ts) + 1), 3.5))
        width = 0.8 / len(s.methods)
        for i, m in enumerate(s.methods):
            xs = [j + i * width for j, t in enumerate(ts) if (t, m) in s.cells]
            cs = [s.cells[(t, m)] for t in ts if (t, m) in s.cells]
            ax.bar(xs, [c.mean for c in cs], width, yerr=[c.std or 0 for c in cs],
                   label=method_label(m), capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ts))], ts, rotation=30,
                      ha="right")
        ax.set_ylabel("top-1 % (last epoch)")
        ax.set_title(f"{g} ({s.mode})")
        ax.legend(fontsize=7)
        paths.append(plotting.save(fig, out / f"chart_{g}.png", dpi=100))
    return paths


def write_report(runs_dir: str | Path, out: str | Path | None = None, anchors: bool = False,
                 best: bool | None = None, mode: str | None = None) -> dict[str, Path]:
    """Write report.md, report.csv (per task), summary.csv (averages), chart_<group>.png."""
    out = Path(out or runs_dir)
    s = summarise(load_results(runs_dir), mode)
    md = render_markdown(s, anchors, best)
    rows = [["benchmark", "mode", "task", "group", "method", "n_seeds", "seeds", "mean_top1",
             "std_top1", "per_seed_top1", "mean_best_top1_selected_on_eval", "trainable_params"]]
    for t in s.tasks:
        for m in s.methods:
            c = s.cells.get((t, m))
            if c is None:
                continue
            rows.append([s.benchmark, s.mode, t, s.bench.group_of(t), m, len(c.values),
                         " ".join(map(str, c.seeds)), f"{c.mean:.4f}",
                         "" if c.std is None else f"{c.std:.4f}",
                         " ".join(f"{v:.4f}" for v in c.values),
                         "" if c.best_mean is None else f"{c.best_mean:.4f}",
                         c.trainable or ""])
    grouped = len(s.bench.groups) > 1
    summ = [["method", "epoch", "average", "value", "n", "of", "partial"]]
    for which in WHICH:
        for m in s.methods:
            items = list(s.group_means[which][m].items()) if grouped else []
            items += [("mean_of_group_means", s.mean_of_groups[which][m])] if grouped else []
            items += [("mean_over_all_tasks", s.mean_all[which][m])]
            for name, v in items:
                if v is not None:
                    partial = (_mog_partial(s, which, m) if name == "mean_of_group_means"
                               else v[1] < v[2])
                    summ.append([m, which, name, f"{v[0]:.4f}", v[1], v[2], partial])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", _csv_text(rows))
    atomic_write_text(out / "summary.csv", _csv_text(summ))
    paths = {"report.md": out / "report.md", "report.csv": out / "report.csv",
             "summary.csv": out / "summary.csv"}
    for p in _charts(s, out):
        paths[p.name] = p
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Summarise a benchmark sweep.")
    ap.add_argument("runs_dir", help="sweep output folder (searched recursively)")
    ap.add_argument("--out", default=None, help="where to write the report (default: runs_dir)")
    ap.add_argument("--anchors", action="store_true",
                    help="add published numbers, marked as theirs (and as not comparable "
                         "when the backbone differs)")
    ap.add_argument("--best", action=argparse.BooleanOptionalAction, default=None,
                    help="best-epoch columns (selected on the eval split); default: when "
                         "the runs evaluated on a schedule")
    ap.add_argument("--mode", choices=MODES, default=None,
                    help="split mode to report when a folder holds both")
    a = ap.parse_args(argv)
    try:
        paths = write_report(a.runs_dir, a.out, a.anchors, a.best, a.mode)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["report.md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
