"""Layout of a benchmark sweep on disk, shared by the runner and the report.

    <out>/<mode>/<task>/<method>/seed<k>/
        bench.json           what the runner asked for (benchmark, task, method, seed, split
                             mode, backbone) and the resolved protocol: every setting with
                             its source, schedule, adapter placement, precision, evaluation
                             schedule, preprocessing; written first
        config.json, metrics.jsonl, ... final_metrics.json    the engine's run directory
        result.json          the runner's summary; written last, atomically

A run is finished when ``final_metrics.json`` exists (the engine writes it last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sds_vision.train.rundir import BENCH, FINAL, RunDir

__all__ = ["run_dir", "RunResult", "load_results",
           "is_finished"]


def run_dir(out: str | Path, mode: str, task: str, method: str, seed: int) -> Path:
    """``<out>/<mode>/<task>/<method>/seed<k>``: tune and final runs never share a folder."""
    return Path(out) / mode / task / method / f"seed{seed}"


def is_finished(d: str | Path) -> bool:
    return RunDir(d).is_finished()


@dataclass
class RunResult:
    benchmark: str
    task: str
    method: str
    seed: int
    mode: str
    top1: float                 # last epoch, percent
    best_top1: float | None     # max over the evaluated epochs; None if only the last was
    trainable: int | None
    head: int | None
    seconds: float | None
    model: str | None
    normalization: str | None
    path: Path
    adapter: int | None = None  # adapter parameters (0 for full / linear)
    placement: str | None = None
    precision: str | None = None
    eval_every: int | None = None  # None: not recorded (runs of older versions)


def load_results(root: str | Path) -> list[RunResult]:
    """Every finished run under ``root`` (recursively). Task/method/seed come from
    ``bench.json`` when present, else from the path ``.../<task>/<method>/seed<k>``."""
    out = []
    for fm in sorted(Path(root).rglob(FINAL)):
        d = fm.parent
        try:
            m = json.loads(fm.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{fm}:{e.lineno}: invalid JSON ({e.msg})") from None
        bench = {}
        if (d / BENCH).is_file():
            bench = json.loads((d / BENCH).read_text())
        seed_part = d.name[4:] if d.name.startswith("seed") else None
        try:
            seed = int(bench.get("seed", seed_part))
        except (TypeError, ValueError):
            raise ValueError(f"{d}: cannot tell the seed (no bench.json, folder not "
                             "seed<k>)") from None
        if "val_top1" not in m:
            raise ValueError(f"{fm}:1: missing 'val_top1'")
        top1 = float(m["val_top1"])
        if not math.isfinite(top1):
            raise ValueError(f"{fm}:1: non-finite val_top1 {top1}")
        params = m.get("params") or {}
        eval_every = bench.get("eval_every")
        # evaluated on the last epoch only: the "best" epoch is the last one, not a selection
        best = None if eval_every == 0 else m.get("best_val_top1")
        out.append(RunResult(
            benchmark=bench.get("benchmark", "vtab"),
            task=bench.get("task", d.parent.parent.name),
            method=bench.get("method", m.get("method", d.parent.name)),
            seed=seed, mode=bench.get("mode", "final"), top1=top1,
            best_top1=best, trainable=params.get("trainable"),
            head=params.get("head"), seconds=m.get("seconds"),
            model=bench.get("backbone") or m.get("model"),  # resolved timm name + weights tag
            normalization=(bench.get("preprocess") or {}).get("normalization"), path=d,
            adapter=params.get("adapter"),
            placement=(bench.get("adapter") or {}).get("placement"),
            precision=bench.get("precision"), eval_every=eval_every))
    return out
