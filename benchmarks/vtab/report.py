"""Summarise a sweep: per-task accuracy (mean ± std over seeds), group means, BOTH the
mean of group means and the mean over all tasks (labelled, partial ones flagged),
trainable parameters, a CSV, and one bar chart per group.

    python benchmarks/vtab/report.py RUNS_DIR [--out DIR] [--anchors] [--best]

Accuracy is the LAST epoch's top-1 on the evaluation split. ``--best`` adds the max
over epochs, which in ``final`` mode is selected on test (labelled so). ``--anchors``
adds published numbers (docs/benchmarks.md): theirs, not ours, several test-selected.
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

from benchmarks.vtab.protocol import MODES, SPLIT_MODES
from benchmarks.vtab.rundir import RunResult, load_results
from sds_vision import plotting
from sds_vision.data.fgvc import FGVC_DATASETS
from sds_vision.data.vtab import VTAB_GROUPS
from sds_vision.fileio import atomic_write_text
from sds_vision.methods import METHODS

__all__ = ["summarise", "Summary", "render_markdown", "write_report", "ANCHORS", "main"]

GROUPS = {"vtab": dict(VTAB_GROUPS), "fgvc": {"fgvc": tuple(FGVC_DATASETS)}}
METHOD_ORDER = list(METHODS)

# Published anchors, ViT-B/16 IN-21k, top-1 % (docs/benchmarks.md). THEIRS, not ours.
ANCHOR_COLS = ("params (M)", "natural", "specialized", "structured", "VTAB mean",
               "mean over 19", "FGVC mean")
ANCHORS: dict[str, tuple] = {  # strings, as printed in the papers (trailing zeros kept)
    "full fine-tuning": ("85.8", "75.9", "83.4", "47.6", "68.97", "65.57", "88.54"),
    "linear probing": ("0.04", "69.1", "77.1", "26.9", "57.68", "52.99", "79.32"),
    "VPT-Deep": ("0.53-0.64", "78.5", "82.4", "55.0", "71.97", "69.43", "89.10"),
    "LoRA r=8 (NOAH's run)": ("0.29", "79.5", "84.6", "59.8", "74.60", "72.25",
                              "84.8-89.5 (sources disagree)"),
    "NOAH": ("0.36-0.43", "80.3", "84.9", "61.3", "75.48", "73.25", None),
    "FacT": ("0.07", "80.6", "85.3", "60.7", "75.55", "73.23", None),
    "SSF (AugReg weights)": ("0.21-0.24", "81.6", "86.6", "59.0", "75.69", "73.10", "90.72"),
    "RepAdapter": ("0.22", "81.6", "85.4", "61.2", "76.09", "73.84", None),
    "SPT-LoRA": (None, "81.9", "85.9", "61.3", "76.4", None, "90.04"),
    "GLoRA": (None, "83.6", "87.0", "63.3", "77.97", "75.77", None),
}
ANCHOR_FOR_METHOD = {"full": "full fine-tuning", "linear": "linear probing",
                     "lora": "LoRA r=8 (NOAH's run)"}


@dataclass
class Cell:
    values: list[float]            # one per seed, sorted by seed
    seeds: list[int]
    best: list[float | None]
    trainable: int | None
    head: int | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:  # sample std (ddof=1); undefined for one seed
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Summary:
    benchmark: str
    mode: str
    methods: list[str]
    tasks: list[str]                                   # all tasks of the benchmark
    cells: dict[tuple[str, str], Cell]                 # (task, method) -> Cell
    group_means: dict[str, dict[str, tuple[float, int, int] | None]]  # m -> g -> (mean, k, n)
    mean_of_groups: dict[str, tuple[float, int, int] | None]          # (mean, groups, of)
    mean_all: dict[str, tuple[float, int, int] | None]                # (mean, tasks, of)
    settings: dict[str, set]


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
    bench = benches.pop()
    groups = GROUPS[bench]
    tasks = [t for ts in groups.values() for t in ts]
    methods = sorted({r.method for r in results},
                     key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
    cells: dict[tuple[str, str], Cell] = {}
    for r in sorted(results, key=lambda r: r.seed):
        if r.task not in tasks:
            raise ValueError(f"{r.path}: task {r.task!r} is not a {bench} task")
        c = cells.setdefault((r.task, r.method), Cell([], [], [], r.trainable, r.head))
        if r.seed in c.seeds:
            raise ValueError(f"{r.path}: seed {r.seed} of {r.task}/{r.method} found twice")
        c.values.append(r.top1)
        c.seeds.append(r.seed)
        c.best.append(r.best_top1)
    gm: dict[str, dict] = {}
    mog: dict[str, tuple | None] = {}
    mall: dict[str, tuple | None] = {}
    for m in methods:
        gm[m] = {}
        for g, ts in groups.items():
            vals = [cells[(t, m)].mean for t in ts if (t, m) in cells]
            gm[m][g] = (statistics.fmean(vals), len(vals), len(ts)) if vals else None
        present = [v[0] for v in gm[m].values() if v]
        mog[m] = (statistics.fmean(present), len(present), len(groups)) if present else None
        vals = [cells[(t, m)].mean for t in tasks if (t, m) in cells]
        mall[m] = (statistics.fmean(vals), len(vals), len(tasks)) if vals else None
    settings = {"model": {r.model for r in results},
                "normalization": {r.normalization for r in results}}
    return Summary(bench, mode, methods, tasks, cells, gm, mog, mall, settings)


def _fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _avg(v: tuple | None, unit: str) -> str:
    if v is None:
        return "–"
    mean, k, n = v
    return f"{mean:.2f}" + ("" if k == n else f" (partial: {k}/{n} {unit})")


def _mog_partial(s: Summary, m: str) -> bool:
    mog, mall = s.mean_of_groups[m], s.mean_all[m]
    return mog is not None and (mog[1] < mog[2] or mall[1] < mall[2])


def _mog(s: Summary, m: str) -> str:
    """Mean of group means; partial when a group is missing OR any group is incomplete."""
    mog, mall = s.mean_of_groups[m], s.mean_all[m]
    if mog is None:
        return "–"
    if not _mog_partial(s, m):
        return f"{mog[0]:.2f}"
    return f"{mog[0]:.2f} (partial: {mog[1]}/{mog[2]} groups, {mall[1]}/{mall[2]} tasks)"


def _group_of(s: Summary, task: str) -> str:
    return next(g for g, ts in GROUPS[s.benchmark].items() if task in ts)


def render_markdown(s: Summary, anchors: bool = False, best: bool = False) -> str:
    vt = s.benchmark == "vtab"
    split = " -> ".join(SPLIT_MODES[s.benchmark][s.mode])
    name = "VTAB-1k" if vt else "FGVC"
    out = io.StringIO()
    w = out.write
    w(f"# {name} results ({s.mode}: {split})\n\n")
    w("Top-1 accuracy (%) at the LAST epoch, mean ± sample std over seeds (n = seeds). ")
    w(f"Models: {', '.join(sorted(map(str, s.settings['model'])))}; normalisation: "
      f"{', '.join(sorted(map(str, s.settings['normalization'])))}.\n\n")
    mixed = [k for k, v in s.settings.items() if len(v) > 1]
    if mixed:
        w(f"**WARNING: these runs mix several {' and '.join(mixed)} settings; "
          "their averages are not one experiment.**\n\n")
    w("## Per-task accuracy\n\n")
    w("| task | group | " + " | ".join(s.methods) + " |\n")
    w("|---|---|" + "---|" * len(s.methods) + "\n")
    for t in s.tasks:
        if not any((t, m) in s.cells for m in s.methods):
            continue
        row = []
        for m in s.methods:
            c = s.cells.get((t, m))
            row.append("–" if c is None else
                       f"{c.mean:.2f} ± {_fmt(c.std)} (n={len(c.values)})")
        w(f"| {t} | {_group_of(s, t)} | " + " | ".join(row) + " |\n")
    ran = sum(1 for t in s.tasks if any((t, m) in s.cells for m in s.methods))
    w("\n## Averages\n\n")
    if ran < len(s.tasks):
        w(f"Only {ran} of {len(s.tasks)} tasks ran: averages marked *partial* are over the "
          "tasks/groups that ran and are NOT comparable to published full-benchmark means.\n\n")
    groups = list(GROUPS[s.benchmark])
    head = ["method"] + (groups if vt else [])
    head += (["mean of group means (most papers)", "mean over 19 tasks (VTAB, V-PETL)"] if vt
             else ["mean over 5 datasets"])
    head += ["trainable params (M, mean over tasks)", "excl. head (M)"]
    if anchors:
        head += ["published " + ("VTAB mean of group means" if vt else "FGVC mean")
                 + " (THEIRS, see below)"]
    w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for m in s.methods:
        row = [m]
        if vt:
            row += [_avg(s.group_means[m][g], "tasks") for g in groups]
            row += [_mog(s, m), _avg(s.mean_all[m], "tasks")]
        else:
            row += [_avg(s.mean_all[m], "datasets")]
        cs = [c for (t, mm), c in s.cells.items() if mm == m and c.trainable is not None]
        tr = statistics.fmean(c.trainable for c in cs) / 1e6 if cs else None
        ex = (statistics.fmean(c.trainable - (c.head or 0) for c in cs) / 1e6 if cs else None)
        row += [_fmt(tr, 3), _fmt(ex, 3)]
        if anchors:
            a = ANCHORS.get(ANCHOR_FOR_METHOD.get(m, ""))
            row += [("–" if a is None else
                     f"{ANCHOR_FOR_METHOD[m]}: {a[4] if vt else a[6]}")]
        w("| " + " | ".join(row) + " |\n")
    if best:
        label = "selected on TEST" if s.mode == "final" else "selected on val"
        w(f"\n## Best epoch (max over epochs, {label}; not the reported number)\n\n")
        w("| task | " + " | ".join(s.methods) + " |\n|---|" + "---|" * len(s.methods) + "\n")
        for t in s.tasks:
            if not any((t, m) in s.cells for m in s.methods):
                continue
            row = []
            for m in s.methods:
                c = s.cells.get((t, m))
                b = [x for x in (c.best if c else []) if x is not None]
                row.append(_fmt(statistics.fmean(b)) if b else "–")
            w(f"| {t} | " + " | ".join(row) + " |\n")
    if anchors:
        w("\n## Published anchors (THEIRS, not ours; ViT-B/16 IN-21k, docs/benchmarks.md)\n\n")
        w("Mean of group means unless noted. NOAH, FacT, RepAdapter and V-PETL report the "
          "max test accuracy over training (selection on test); reproductions commonly land "
          "0.5-2.5 points lower.\n\n")
        w("| method | " + " | ".join(ANCHOR_COLS) + " |\n|---|" + "---|" * len(ANCHOR_COLS) + "\n")
        for k, v in ANCHORS.items():
            w(f"| {k} | " + " | ".join("–" if x is None else str(x) for x in v) + " |\n")
    return out.getvalue()


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _charts(s: Summary, out: Path) -> list[Path]:
    paths = []
    for g, ts in GROUPS[s.benchmark].items():
        ts = [t for t in ts if any((t, m) in s.cells for m in s.methods)]
        if not ts:
            continue
        fig, ax = plotting.figure(figsize=(max(4.0, 1.2 * len(ts) + 1), 3.5))
        width = 0.8 / len(s.methods)
        for i, m in enumerate(s.methods):
            xs = [j + i * width for j, t in enumerate(ts) if (t, m) in s.cells]
            cs = [s.cells[(t, m)] for t in ts if (t, m) in s.cells]
            ax.bar(xs, [c.mean for c in cs], width, yerr=[c.std or 0 for c in cs],
                   label=m, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ts))], ts, rotation=30,
                      ha="right")
        ax.set_ylabel("top-1 % (last epoch)")
        ax.set_title(f"{g} ({s.mode})")
        ax.legend(fontsize=7)
        paths.append(plotting.save(fig, out / f"chart_{g}.png", dpi=100))
    return paths


def write_report(runs_dir: str | Path, out: str | Path | None = None, anchors: bool = False,
                 best: bool = False, mode: str | None = None) -> dict[str, Path]:
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
            b = [x for x in c.best if x is not None]
            rows.append([s.benchmark, s.mode, t, _group_of(s, t), m, len(c.values),
                         " ".join(map(str, c.seeds)), f"{c.mean:.4f}",
                         "" if c.std is None else f"{c.std:.4f}",
                         " ".join(f"{v:.4f}" for v in c.values),
                         f"{statistics.fmean(b):.4f}" if b else "", c.trainable or ""])
    summ = [["method", "average", "value", "n", "of", "partial"]]
    for m in s.methods:
        items = [(g, v) for g, v in s.group_means[m].items()] if s.benchmark == "vtab" else []
        items += [("mean_of_group_means", s.mean_of_groups[m])] if s.benchmark == "vtab" else []
        items += [("mean_over_all_tasks", s.mean_all[m])]
        for name, v in items:
            if v is not None:
                partial = _mog_partial(s, m) if name == "mean_of_group_means" else v[1] < v[2]
                summ.append([m, name, f"{v[0]:.4f}", v[1], v[2], partial])
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
    ap = argparse.ArgumentParser(description="Summarise a VTAB-1k / FGVC sweep.")
    ap.add_argument("runs_dir", help="sweep output folder (searched recursively)")
    ap.add_argument("--out", default=None, help="where to write the report (default: runs_dir)")
    ap.add_argument("--anchors", action="store_true",
                    help="add published numbers from docs/benchmarks.md, marked as theirs")
    ap.add_argument("--best", action="store_true",
                    help="add max-over-epochs accuracy (selected on the eval split)")
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
